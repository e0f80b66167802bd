"""The functions ``colocate calibrate`` runs on a job's idle core, by reference
(``colocate.calibrate.functions:compress``): each works for ``seconds`` and returns
``(start, end, iterations)``, ``time.time()`` of the node once its input is built.

- ``compress``: zlib (level 6) then lzma (preset 1) of 1 MiB of half-compressible bytes;
- ``bfs``: breadth-first search over a random graph of 100,000 vertices and 400,000 edges
  (adjacency lists in Python: pointer-heavy, like graph analytics functions);
- ``image``: a 3 x 3 box blur and a 2x downscale of a 1024 x 1024 float32 image (numpy);
- ``idle``: sleeps: the job's alone window, stamped with the same clock.
"""

from __future__ import annotations

import collections
import lzma
import random
import time
import zlib

import numpy as np

FUNCTIONS = ("compress", "bfs", "image")


def idle(seconds: float) -> tuple[float, float, int]:
    start = time.time()
    time.sleep(seconds)
    return start, time.time(), 0


def compress(seconds: float) -> tuple[float, float, int]:
    rng = random.Random(5)
    words = [bytes(rng.choices(b"abcdefghij", k=8)) for _ in range(512)]
    data = b" ".join(rng.choice(words) + rng.randbytes(4) for _ in range(1024**2 // 13))
    start = time.time()
    deadline = start + seconds
    n = 0
    while time.time() < deadline:
        zlib.compress(data, 6)
        lzma.compress(data[: 256 * 1024], preset=1)
        n += 1
    return start, time.time(), n


def bfs(seconds: float) -> tuple[float, float, int]:
    rng = random.Random(6)
    vertices = 100_000
    adjacency: list[list[int]] = [[] for _ in range(vertices)]
    for _ in range(400_000):
        u, v = rng.randrange(vertices), rng.randrange(vertices)
        adjacency[u].append(v)
        adjacency[v].append(u)
    start = time.time()
    deadline = start + seconds
    n = 0
    while time.time() < deadline:
        seen = bytearray(vertices)
        root = rng.randrange(vertices)
        seen[root] = 1
        queue = collections.deque([root])
        while queue:
            for w in adjacency[queue.popleft()]:
                if not seen[w]:
                    seen[w] = 1
                    queue.append(w)
        n += 1
    return start, time.time(), n


def image(seconds: float) -> tuple[float, float, int]:
    img = np.random.default_rng(7).random((1024, 1024), dtype=np.float32)
    start = time.time()
    deadline = start + seconds
    n = 0
    while time.time() < deadline:
        padded = np.pad(img, 1, mode="edge")
        blur = np.zeros_like(img)
        for i in range(3):
            for j in range(3):
                blur += padded[i : i + 1024, j : j + 1024]
        blur /= 9.0
        small = blur.reshape(512, 2, 512, 2).mean(axis=(1, 3))
        img = np.repeat(np.repeat(small, 2, axis=0), 2, axis=1).astype(np.float32)
        n += 1
    return start, time.time(), n
