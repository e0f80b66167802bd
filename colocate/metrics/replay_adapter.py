"""A ``traces.replay.ReplayResult`` as per-interval :class:`ReplaySample` lists per policy.

Duck-typed (the protocols below) so ``colocate.metrics`` does not import ``traces``. What
the replay measures maps onto the live names like this:

- cores/memory ``total``, ``allocated``, ``used_by_jobs``, ``idle_allocated``,
  ``unallocated``: the cluster series (policy-independent, averages over the minute);
- ``offered``: the policy's offer; ``leased`` and ``used_by_functions``: what functions
  harvested (the replay sizes each node's lease to its share of the FaaS load, so the two
  are the same there);
- ``wasted_cost``: idle inside allocations and unallocated; with ``charging="resources"``
  split into cores and memory at ``prices`` (the sum equals the replay's own wasted cost),
  with node charging the replay's figures under resource ``node``; ``recovered_cost`` the
  same way from the harvested resources;
- ``evictions`` (reason ``other``: the series has no reasons), ``invocations`` (result
  ``ok``: served invocations), ``cold_starts``.

Samples are stamped at the end of their interval. ``step_s`` coarsens the series (gauges
averaged, counts and money summed) to keep a months-long replay's OpenMetrics file small.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import numpy as np
import numpy.typing as npt

from colocate.metrics.accounting import IDLE_ALLOCATED, UNALLOCATED
from colocate.metrics.openmetrics import ReplaySample
from policies.prices import Prices

Floats = npt.NDArray[np.float64]

__all__ = ["auto_step_s", "replay_samples"]

#: A series longer than this many points is coarsened by default (Grafana shows ~2000 anyway).
MAX_POINTS = 2000


class ClusterLike(Protocol):
    @property
    def nodes(self) -> int: ...
    @property
    def cores_per_node(self) -> int: ...
    @property
    def memory_per_node_bytes(self) -> int: ...
    @property
    def memory_reserved_bytes(self) -> int: ...


class PolicySeriesLike(Protocol):
    @property
    def offered_cores(self) -> Floats: ...
    @property
    def offered_memory_bytes(self) -> Floats: ...
    @property
    def harvested_cores(self) -> Floats: ...
    @property
    def harvested_memory_bytes(self) -> Floats: ...
    @property
    def recovered_cost(self) -> Floats: ...
    @property
    def invocations_served(self) -> Floats: ...
    @property
    def evictions(self) -> Floats: ...
    @property
    def cold_starts(self) -> Floats: ...


class ReplayResultLike(Protocol):
    @property
    def t(self) -> Floats: ...
    @property
    def step_s(self) -> float: ...
    @property
    def allocated_cores(self) -> Floats: ...
    @property
    def used_cores(self) -> Floats: ...
    @property
    def allocated_memory_bytes(self) -> Floats: ...
    @property
    def used_memory_bytes(self) -> Floats: ...
    @property
    def wasted_idle_cost(self) -> Floats: ...
    @property
    def wasted_unallocated_cost(self) -> Floats: ...

    @property
    def cluster(self) -> ClusterLike: ...
    @property
    def policies(self) -> Mapping[str, PolicySeriesLike]: ...


def _group(values: Floats, k: int, how: str) -> Floats:
    n = values.size // k * k
    if k == 1:
        return np.asarray(values, dtype=np.float64)
    head = values[:n].reshape(-1, k)
    out = head.mean(axis=1) if how == "mean" else head.sum(axis=1)
    if n < values.size:
        tail = values[n:]
        out = np.append(out, tail.mean() if how == "mean" else tail.sum())
    return np.asarray(out, dtype=np.float64)


def auto_step_s(result: ReplayResultLike, max_points: int = MAX_POINTS) -> float:
    """The smallest whole multiple of the replay's step giving at most ``max_points`` samples."""
    k = max(1, -(-int(result.t.size) // max_points))
    return float(k * result.step_s)


def replay_samples(
    result: ReplayResultLike, prices: Prices, *, step_s: float | None = None
) -> dict[str, list[ReplaySample]]:
    """Every policy's samples, coarsened to ``step_s`` (default :func:`auto_step_s`)."""
    k = max(1, round((step_s or auto_step_s(result)) / result.step_s))
    c = result.cluster
    total_c = float(c.nodes * c.cores_per_node)
    total_m = float(c.nodes * (c.memory_per_node_bytes - c.memory_reserved_bytes))

    def mean(v: Floats) -> list[float]:
        return [float(x) for x in _group(np.asarray(v, dtype=np.float64), k, "mean")]

    def total(v: Floats) -> list[float]:
        return [float(x) for x in _group(np.asarray(v, dtype=np.float64), k, "sum")]

    starts = np.asarray(result.t, dtype=np.float64)
    groups = -(-starts.size // k)
    ends = [float(starts[min(i * k + k, starts.size) - 1] + result.step_s) for i in range(groups)]
    alloc_c, used_c = mean(result.allocated_cores), mean(result.used_cores)
    alloc_m, used_m = mean(result.allocated_memory_bytes), mean(result.used_memory_bytes)
    dt = float(result.step_s)
    idle_c = np.asarray(result.allocated_cores) - np.asarray(result.used_cores)
    idle_m = np.asarray(result.allocated_memory_bytes) - np.asarray(result.used_memory_bytes)
    unalloc_c = total_c - np.asarray(result.allocated_cores)
    unalloc_m = total_m - np.asarray(result.allocated_memory_bytes)
    wasted: dict[tuple[str, str], list[float]]
    if prices.charging == "resources":
        wasted = {
            ("cores", IDLE_ALLOCATED): total(idle_c * dt / 3600.0 * prices.core_hour),
            ("memory", IDLE_ALLOCATED): total(idle_m * dt / 2**30 / 3600.0 * prices.gib_hour),
            ("cores", UNALLOCATED): total(unalloc_c * dt / 3600.0 * prices.core_hour),
            ("memory", UNALLOCATED): total(unalloc_m * dt / 2**30 / 3600.0 * prices.gib_hour),
        }
    else:
        wasted = {
            ("node", IDLE_ALLOCATED): total(result.wasted_idle_cost),
            ("node", UNALLOCATED): total(result.wasted_unallocated_cost),
        }
    out: dict[str, list[ReplaySample]] = {}
    for name, ps in result.policies.items():
        off_c, off_m = mean(ps.offered_cores), mean(ps.offered_memory_bytes)
        harv_c, harv_m = mean(ps.harvested_cores), mean(ps.harvested_memory_bytes)
        if prices.charging == "resources":
            recovered = {
                "cores": total(np.asarray(ps.harvested_cores) * dt / 3600.0 * prices.core_hour),
                "memory": total(
                    np.asarray(ps.harvested_memory_bytes) * dt / 2**30 / 3600.0 * prices.gib_hour
                ),
            }
        else:
            recovered = {"node": total(ps.recovered_cost)}
        evictions, served, cold = (
            total(ps.evictions),
            total(ps.invocations_served),
            total(ps.cold_starts),
        )
        samples = []
        for i, t in enumerate(ends):
            samples.append(
                ReplaySample(
                    t=t,
                    cores={
                        "total": total_c,
                        "allocated": alloc_c[i],
                        "used_by_jobs": used_c[i],
                        "idle_allocated": max(0.0, alloc_c[i] - used_c[i]),
                        "unallocated": max(0.0, total_c - alloc_c[i]),
                        "offered": off_c[i],
                        "leased": harv_c[i],
                        "used_by_functions": harv_c[i],
                    },
                    memory_bytes={
                        "total": total_m,
                        "allocated": alloc_m[i],
                        "used_by_jobs": used_m[i],
                        "idle_allocated": max(0.0, alloc_m[i] - used_m[i]),
                        "unallocated": max(0.0, total_m - alloc_m[i]),
                        "offered": off_m[i],
                        "leased": harv_m[i],
                        "used_by_functions": harv_m[i],
                    },
                    wasted_cost={key: series[i] for key, series in wasted.items()},
                    recovered_cost={key: series[i] for key, series in recovered.items()},
                    evictions={"other": evictions[i]},
                    invocations={"ok": served[i]},
                    cold_starts=cold[i],
                )
            )
        out[name] = samples
    return out
