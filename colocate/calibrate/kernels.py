"""Batch-job kernels of three kinds, each timing its own iterations.

``python -m colocate.calibrate.kernels KIND --stop FILE [--scale S]`` runs KIND until FILE
exists (or ``--max-s`` passes), printing one line ``START END CPU`` per iteration, flushed:
``time.time()`` seconds (the node's clock) and the CPU seconds the iteration's thread ran
(without the time it waited for its core while other processes ran there). The runner compares the iterations that fall in a
function's window with those of the idle window next to it.

- ``stream`` (memory-bandwidth bound): the STREAM triad ``a = b + s * c`` over three float64
  arrays of 4 M elements x scale (96 MiB at scale 1: far beyond any cache);
- ``matmul`` (compute bound): a 256 x 256 float64 matrix product (BLAS, one thread: the job
  sets ``OMP_NUM_THREADS=1``), 8 per iteration;
- ``chase`` (cache / latency sensitive): 256 pointer chains advanced together through a
  random permutation of 2 M x scale int64 (16 MiB at scale 1, about L3 size): each step is a
  gather of dependent random loads.

Each iteration is sized once at start to last about ``--iteration-s`` (0.05 s) alone.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

import numpy as np

KERNELS: dict[str, str] = {
    "stream": "memory_bandwidth",
    "matmul": "compute",
    "chase": "cache_latency",
}


def _stream(scale: float) -> Callable[[int], None]:
    n = max(1024, int(4 * 1024**2 * scale))
    b = np.random.default_rng(1).random(n)
    c = np.random.default_rng(2).random(n)
    a = np.empty(n)
    tmp = np.empty(n)

    def run(reps: int) -> None:
        for _ in range(reps):
            np.multiply(c, 3.0, out=tmp)
            np.add(b, tmp, out=a)

    return run


def _matmul(scale: float) -> Callable[[int], None]:
    n = 256
    rng = np.random.default_rng(3)
    x, y = rng.random((n, n)), rng.random((n, n))
    out = np.empty((n, n))

    def run(reps: int) -> None:
        for _ in range(reps):
            np.matmul(x, y, out=out)

    return run


def _chase(scale: float) -> Callable[[int], None]:
    n = max(4096, int(2 * 1024**2 * scale))
    perm = np.random.default_rng(4).permutation(n).astype(np.int64)
    state = {"idx": np.arange(0, n, n // 256, dtype=np.int64)[:256]}

    def run(reps: int) -> None:
        idx = state["idx"]
        for _ in range(reps):
            idx = perm[idx]
        state["idx"] = idx

    return run


BUILDERS: dict[str, Callable[[float], Callable[[int], None]]] = {
    "stream": _stream,
    "matmul": _matmul,
    "chase": _chase,
}


def _size(run: Callable[[int], None], iteration_s: float) -> int:
    """Repetitions per iteration so one iteration lasts about ``iteration_s``."""
    reps = 1
    while True:
        t = time.perf_counter()
        run(reps)
        took = time.perf_counter() - t
        if took >= iteration_s / 4 or reps >= 1 << 24:
            return max(1, int(reps * iteration_s / max(took, 1e-9)))
        reps *= 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m colocate.calibrate.kernels")
    parser.add_argument("kind", choices=sorted(KERNELS))
    parser.add_argument("--stop", required=True, help="run until this file exists")
    parser.add_argument("--scale", type=float, default=1.0, help="working-set scale (default 1)")
    parser.add_argument("--iteration-s", type=float, default=0.05)
    parser.add_argument(
        "--pin", action="store_true", help="run on the first CPU given, leave the others idle"
    )
    parser.add_argument("--max-s", type=float, default=1800.0, help="stop anyway after this")
    args = parser.parse_args(argv)
    if args.pin:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    run = BUILDERS[args.kind](args.scale)
    run(1)  # touch every page before timing
    reps = _size(run, args.iteration_s)
    print(f"# {args.kind} reps={reps} cpus={sorted(os.sched_getaffinity(0))}", flush=True)
    deadline = time.monotonic() + args.max_s
    out = sys.stdout
    while not os.path.exists(args.stop) and time.monotonic() < deadline:
        start, cpu = time.time(), time.thread_time()
        run(reps)
        out.write(f"{start:.6f} {time.time():.6f} {time.thread_time() - cpu:.6f}\n")
        out.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
