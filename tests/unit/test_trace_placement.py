"""First-fit placement at recorded start times."""

from __future__ import annotations

import numpy as np

from traces.jobs import JobTrace
from traces.placement import Cluster, job_memory, place

GIB = 1024**3


def trace(rows: list[tuple[float, float, int]], memory: list[float] | None = None) -> JobTrace:
    """Jobs from (start s, end s, cores)."""
    n = len(rows)
    nan = np.full(n, np.nan)
    return JobTrace(
        path="t",
        format="swf",
        job_id=np.arange(1, n + 1, dtype=np.int64),
        submit_s=np.array([r[0] for r in rows]),
        start_s=np.array([r[0] for r in rows]),
        end_s=np.array([r[1] for r in rows]),
        cores=np.array([r[2] for r in rows], dtype=np.int64),
        nodes=np.full(n, -1, dtype=np.int64),
        memory_alloc_bytes=np.array(memory) if memory else nan.copy(),
        cpu_used_ratio=nan.copy(),
        memory_used_bytes=nan.copy(),
    )


def test_first_fit_lowest_node_and_lowest_cores() -> None:
    t = trace([(0, 3600, 3), (0, 3600, 2), (0, 3600, 4), (60, 3600, 1)])
    cluster = Cluster(3, 4, 8 * GIB)
    p = place(t, cluster, job_memory(t, cluster))
    assert p.node.tolist() == [0, 1, 2, 0]  # the 1-core job fits the first node's last core
    assert p.cpu_mask == [0b0111, 0b0011, 0b1111, 0b1000]
    assert p.memory_bytes.tolist() == [
        6 * GIB,
        4 * GIB,
        8 * GIB,
        2 * GIB,
    ]  # core share of node memory


def test_parallel_jobs_take_whole_idle_nodes_and_free_them_at_the_end() -> None:
    t = trace([(0, 600, 1), (0, 1200, 8), (1200, 1800, 8)])
    cluster = Cluster(4, 4, 8 * GIB)
    p = place(t, cluster, job_memory(t, cluster))
    # the parallel job skips the half-used node 0; at 20 min nodes 0 and 1 are idle again
    assert p.node.tolist() == [0, 1, 2, 0, 1]
    assert p.cpu_mask[1:] == [0b1111] * 4
    assert p.start.tolist() == [0, 0, 0, 20, 20]
    assert p.end.tolist() == [10, 20, 20, 30, 30]


def test_jobs_that_cannot_be_placed_are_counted_and_short_ones_are_placed() -> None:
    t = trace([(0, 20, 1), (0, 3600, 9), (0, 3600, 8), (60, 3600, 1)])
    cluster = Cluster(2, 4, 8 * GIB)
    p = place(t, cluster, job_memory(t, cluster))
    assert p.skipped == {
        "larger than the cluster": 1,
        "no room at recorded start": 1,
        "shorter than a minute, held for one grid minute (placed)": 1,
    }
    assert p.jobs_placed == 2
    # the 20-second job holds its core for the first grid minute
    assert (p.start[0], p.end[0], p.cores[0]) == (0, 1, 1)


def test_requested_memory_is_kept_per_node() -> None:
    t = trace([(0, 600, 8)], memory=[4 * GIB])
    cluster = Cluster(2, 4, 8 * GIB)
    p = place(t, cluster, job_memory(t, cluster))
    assert p.memory_bytes.tolist() == [2 * GIB, 2 * GIB]
