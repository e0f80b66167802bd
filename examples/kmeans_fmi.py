"""Distributed k-means over harvested cores, in the style of FMI's ML example.

    .venv/bin/python examples/kmeans_fmi.py --broker http://127.0.0.1:8642 --leases 2 --cores 2

Leases ``--leases`` x ``--cores`` cores (on as many nodes as the broker finds), gathers them
into one FMI group and runs Lloyd's algorithm: every rank draws its own shard of the points
(same seed, so the client can check the answer), assigns them to the nearest centroid, and
one ``allreduce`` of the per-centroid sums and counts per iteration gives every rank the new
centroids. Nothing goes through the client or a store between iterations. The client then
runs the same iterations with numpy on all the points and prints both.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import cloudpickle
import numpy as np

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the nodes need not have this file


def shard(rank: int, size: int, points: int, dims: int, k: int, seed: int) -> np.ndarray:
    """Rank ``rank``'s points: k Gaussian blobs, the same on every machine for a seed."""
    rng = np.random.default_rng(seed)
    centers = rng.uniform(-10, 10, size=(k, dims))
    per = points // size + (rank < points % size)
    local = np.random.default_rng([seed, rank])
    labels = local.integers(0, k, per)
    return centers[labels] + local.standard_normal((per, dims))


def lloyd_step(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-centroid sums and counts of the points nearest to each centroid."""
    d = ((x[:, None, :] - centroids[None, :, :]) ** 2).sum(axis=2)
    nearest = d.argmin(axis=1)
    k = len(centroids)
    sums = np.zeros_like(centroids)
    np.add.at(sums, nearest, x)
    return sums, np.bincount(nearest, minlength=k).astype(np.float64)


def update(centroids: np.ndarray, sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    return np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], centroids)


def kmeans_rank(comm: Any, points: int, dims: int, k: int, iters: int, seed: int) -> dict[str, Any]:
    """What every rank runs: its shard, then ``iters`` rounds of assign + allreduce."""
    x = shard(comm.rank, comm.size, points, dims, k, seed)
    centroids = comm.bcast(x[:k].copy() if comm.rank == 0 else None, root=0)
    t0 = time.perf_counter()
    for _ in range(iters):
        sums, counts = lloyd_step(x, centroids)
        packed = comm.allreduce(np.concatenate([sums.ravel(), counts]))  # one message per round
        centroids = update(centroids, packed[: k * dims].reshape(k, dims), packed[k * dims :])
    return {"centroids": centroids, "points": len(x), "seconds": time.perf_counter() - t0}


def kmeans_local(size: int, points: int, dims: int, k: int, iters: int, seed: int) -> np.ndarray:
    """The same computation on one machine (the check)."""
    x = np.concatenate([shard(r, size, points, dims, k, seed) for r in range(size)])
    centroids = shard(0, size, points, dims, k, seed)[:k].copy()
    for _ in range(iters):
        centroids = update(centroids, *lloyd_step(x, centroids))
    return centroids


def main() -> None:
    from colocate import Client
    from colocate.client.spmd import Group

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--broker", default="http://127.0.0.1:8642")
    parser.add_argument("--leases", type=int, default=2)
    parser.add_argument("--cores", type=int, default=1)
    parser.add_argument("--points", type=int, default=200_000)
    parser.add_argument("--dims", type=int, default=8)
    parser.add_argument("--k", type=int, default=6)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    ns = parser.parse_args()
    with Client(ns.broker) as client:
        leases = [
            client.lease(cores=ns.cores, memory="1GiB", duration="10m") for _ in range(ns.leases)
        ]
        try:
            group = Group([lease.executor() for lease in leases])
            print(f"{group.size} ranks on {', '.join(lease.node for lease in leases)}")
            t0 = time.perf_counter()
            results = group.spmd(kmeans_rank, ns.points, ns.dims, ns.k, ns.iters, ns.seed)
            wall = time.perf_counter() - t0
        finally:
            for lease in leases:
                lease.release()
    want = kmeans_local(group.size, ns.points, ns.dims, ns.k, ns.iters, ns.seed)
    got = results[0]["centroids"]
    same = all(np.allclose(r["centroids"], got) for r in results)
    print(
        f"every rank has the same centroids: {same}; max difference from numpy on one machine: "
        f"{np.abs(got - want).max():.2e}"
    )
    print(
        f"{ns.iters} iterations over {ns.points} points: {wall:.2f} s for the call, "
        f"{max(r['seconds'] for r in results):.2f} s in the iterations"
    )


if __name__ == "__main__":
    main()
