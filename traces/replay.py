"""The replay: recorded jobs on a modelled cluster, a policy deciding per node, FaaS demand on
what it offers, and the money wasted and recovered.

How it runs (all on a one-minute grid, see :mod:`traces.placement`):

1. Jobs are placed first fit at their recorded starts (policy-independent).
2. Each job piece (one job on one node) makes events: start, a history tick
   ``limits.min_history_s`` after start (so a policy may lend from the job), the end of its
   start-up phase (memory steps up, :mod:`traces.usage`), and its end.
3. Per policy, events are processed in time order; every node with an event in a minute gets
   one ``policy.decide(node_view, limits, now, state)`` call, the same call the live agent
   makes. There is no periodic ticking: between events nothing on a node changes. Nodes
   whose views differ only in their name and lease id (the pieces of one parallel job) share
   one call per minute: ``decide`` is pure and, like the policies here, must not depend on
   the node's name. Ticks are added only where the guard needs them: while a job's modelled
   pressure reaches ``limits.cpu_pressure_limit``, the node is decided again every
   ``pressure_grace_s`` (at least a minute), and after a pressure eviction every
   ``reoffer_cooldown_s`` until functions get a lease there again. Under the default limits the modelled pressure stays below
   the limit, so no such tick happens.
4. The node view holds the running jobs with a modelled usage history (piecewise constant)
   and the node's one lease: the functions placed on it. After each decision the lease is
   resized to the node's share of the cluster-wide FaaS load (``offer x utilisation``, cores
   rounded at random so the expected value is right, highest offered core ids); a lease the
   policy evicts is counted as an eviction and its instances as cold starts.
5. FaaS demand (:mod:`traces.demand`) is served as a fluid per minute: the served share is
   ``min(1, offered cores / demanded cores, offered memory / demanded memory)``.
6. Interference (:mod:`traces.interference`): a job on a node whose lease holds a share
   ``f`` of the cores slows down by its sensitivity x ``f``; time spent above
   ``limits.slowdown_budget`` is counted per job and node (violation hours). The agent-visible
   pressure of that slowdown goes into the usage samples the policy sees.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import numpy.typing as npt

from policies import POLICIES
from policies.limits import Limits
from policies.prices import GIB, Prices
from traces import compiled
from traces.azure import FaasTrace
from traces.decisions import (
    Events,
    Piece,
    PieceSteps,
    build_events,
    drive_policy,
    gc_paused,
    heap_kept,
    piece_steps,
)
from traces.demand import STEP_S, Demand, demand
from traces.interference import InterferenceModel
from traces.jobs import JobTrace
from traces.placement import Cluster, Placement, job_memory, place
from traces.usage import JobUsage, UsageModel

log = logging.getLogger(__name__)
Floats = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class PolicySeries:
    """Per-minute series of one policy (arrays of the length of ``ReplayResult.t``).

    Cores and bytes are averages over the minute; costs are in ``Prices.currency`` per
    minute; ``evictions`` and ``cold_starts`` are counts in the minute.
    """

    offered_cores: Floats
    offered_memory_bytes: Floats
    harvested_cores: Floats
    harvested_memory_bytes: Floats
    recovered_cost: Floats
    invocations_served: Floats
    evictions: Floats
    cold_starts: Floats
    summary: dict[str, float] = field(default_factory=dict)
    # why leases were evicted: reason -> {job id -> evictions it caused for that reason}
    eviction_jobs: dict[str, dict[str, int]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ReplayResult:
    """Everything a replay measured, in a simple form for reports and exporters.

    - ``t``: epoch seconds of the start of each minute (float64, length M); ``step_s`` = 60.
    - cluster series (policy-independent, length M): ``allocated_cores``, ``used_cores``,
      ``allocated_memory_bytes``, ``used_memory_bytes`` (averages over the minute);
      ``wasted_idle_cost`` (idle inside allocations) and ``wasted_unallocated_cost`` per
      minute; FaaS ``demand`` (:class:`~traces.demand.Demand`).
    - ``policies``: policy name -> :class:`PolicySeries` (offered and harvested cores and
      bytes, recovered cost, served invocations, evictions, cold starts per minute, and a
      ``summary`` dict with the report.json figures).
    - ``info``: what the report says about inputs and models (paths, counts, assumptions).
    """

    t: Floats
    step_s: float
    cluster: Cluster
    allocated_cores: Floats
    used_cores: Floats
    allocated_memory_bytes: Floats
    used_memory_bytes: Floats
    wasted_idle_cost: Floats
    wasted_unallocated_cost: Floats
    demand: Demand
    policies: dict[str, PolicySeries]
    info: dict[str, object]

    @property
    def wasted_cost(self) -> Floats:
        """Per-minute money wasted: idle inside allocations plus unallocated."""
        return self.wasted_idle_cost + self.wasted_unallocated_cost


def idle_cost_series(prices: Prices, cores: Floats, memory: Floats, cluster: Cluster) -> Floats:
    """``prices.idle_cost`` of holding ``cores`` and ``memory`` bytes for each minute."""
    core_s, mem_s = cores * STEP_S, memory * STEP_S
    if prices.charging == "resources":
        return np.asarray(prices.resource_cost(core_s, mem_s), dtype=np.float64)  # type: ignore[arg-type]
    cpn, mem = cluster.cores_per_node, cluster.memory_per_node_bytes
    return np.fromiter(
        (
            prices.idle_cost(c, m, cpn, mem)
            for c, m in zip(core_s.tolist(), mem_s.tolist(), strict=True)
        ),
        dtype=np.float64,
        count=core_s.size,
    )


def _level(minutes: int, when: npt.NDArray[np.int64], delta: Floats) -> Floats:
    """A step function per minute from changes ``delta`` at minutes ``when``."""
    keep = when < minutes
    changes = np.bincount(when[keep], weights=delta[keep], minlength=minutes).astype(np.float64)
    return np.cumsum(changes)[:minutes]


def _eviction_jobs(reasons: list[str], jobs: list[tuple[str, ...]]) -> dict[str, dict[str, int]]:
    out: dict[str, Counter[str]] = {}
    for reason, ids in zip(reasons, jobs, strict=True):
        out.setdefault(reason, Counter()).update(ids)
    return {reason: dict(counts) for reason, counts in sorted(out.items())}


@heap_kept()
def replay(
    jobs: JobTrace,
    faas: FaasTrace,
    cluster: Cluster,
    policies: Sequence[str] | None = None,
    *,
    limits: Limits | None = None,
    prices: Prices | None = None,
    usage: UsageModel | None = None,
    interference: InterferenceModel | None = None,
    seed: int = 0,
    faas_scale: float = 1.0,
    progress: bool = False,
    prepared: Prepared | None = None,
) -> ReplayResult:
    """Replay ``jobs`` and ``faas`` on ``cluster`` under each policy (default: all registered).

    ``prepared``: the result of :func:`prepare` for the same jobs, FaaS trace, cluster,
    limits, usage and interference models and seed, to replay again without placing and
    modelling again (a capacity search replays one trace at many FaaS scales).
    """
    limits = limits or Limits()
    prices = prices or Prices()
    usage = usage or UsageModel()
    interference = interference or InterferenceModel()
    names = list(policies) if policies else list(POLICIES)
    started = time.perf_counter()
    if prepared is None:
        prep = prepare(jobs, faas, cluster, limits, usage, interference, seed, faas_scale)
    else:
        prep = prepared.at_scale(faas, faas_scale)
    placement, steps, events, dem = prep.placement, prep.steps, prep.events, prep.demand
    pieces_static, job_usage, memory_bound = prep.pieces, prep.job_usage, prep.memory_bound
    minutes = placement.minutes
    t0 = placement.t0
    timings = dict(prep.timings)
    setup_s = time.perf_counter() - started

    # policy-independent cluster series
    start, end = placement.start, placement.end
    alloc_c = _level(
        minutes,
        np.concatenate([start, end]),
        np.concatenate([placement.cores, -placement.cores]).astype(np.float64),
    )
    last = steps.offsets[1:] - 1
    used_c = _level(
        minutes,
        np.concatenate([steps.minute, end]),
        np.concatenate([steps.delta(steps.cores), -steps.cores[last]]),
    )
    alloc_m = _level(
        minutes,
        np.concatenate([start, end]),
        np.concatenate([placement.memory_bytes, -placement.memory_bytes]),
    )
    used_m = _level(
        minutes,
        np.concatenate([steps.minute, end]),
        np.concatenate([steps.delta(steps.memory), -steps.memory[last]]),
    )
    total_c = np.full(minutes, float(cluster.cores))
    total_m = np.full(
        minutes,
        float(cluster.nodes * (cluster.memory_per_node_bytes - cluster.memory_reserved_bytes)),
    )
    wasted_idle = idle_cost_series(prices, alloc_c - used_c, alloc_m - used_m, cluster)
    wasted_unalloc = idle_cost_series(prices, total_c - alloc_c, total_m - alloc_m, cluster)

    timings["cluster_series_s"] = time.perf_counter() - started - setup_s
    setup_s = time.perf_counter() - started
    bar = None
    n_events = int(events[0].size)
    if progress:
        from tqdm import tqdm

        bar = tqdm(
            total=n_events * len(names), unit="event", file=sys.stderr, leave=False, desc="replay"
        )
    series: dict[str, PolicySeries] = {}
    for name in names:
        t_policy = time.perf_counter()
        with gc_paused():
            drive = drive_policy(
                name,
                placement,
                pieces_static,
                events,
                cluster,
                limits,
                dem,
                seed,
                bar.update if bar else None,
            )
        evict_t = drive.evict_t
        violation_h, evicted_cores, decisions = (
            drive.violation_hours,
            drive.evicted_cores,
            drive.decisions,
        )
        timings[f"{name}_loop_s"] = time.perf_counter() - t_policy
        # the drive gives the cluster's offer at the end of each minute with decisions
        when = np.asarray(drive.offer_t, dtype=np.int64)
        off_c = _level(minutes, when, np.diff(drive.offer_c, prepend=0).astype(np.float64))
        off_m = _level(minutes, when, np.diff(drive.offer_m, prepend=0).astype(np.float64))
        with np.errstate(divide="ignore", invalid="ignore"):
            served = np.minimum(
                1.0,
                np.minimum(
                    np.where(dem.cores > 0, off_c / dem.cores, 1.0),
                    np.where(dem.memory_bytes > 0, off_m / dem.memory_bytes, 1.0),
                ),
            )
        served = np.clip(served, 0.0, 1.0)
        harvested_c = served * dem.cores
        harvested_m = served * dem.memory_bytes
        recovered = idle_cost_series(prices, harvested_c, harvested_m, cluster)
        evictions = np.bincount(np.asarray(evict_t, dtype=np.int64), minlength=minutes)[
            :minutes
        ].astype(np.float64)
        inv_served = served * dem.invocations
        cold = served * dem.cold_starts
        elapsed = time.perf_counter() - t_policy + setup_s / len(names)
        total_inv = float(dem.invocations.sum())
        summary = {
            "offered_core_hours": float(off_c.sum() * STEP_S / 3600.0),
            "offered_memory_gib_hours": float(off_m.sum() * STEP_S / 3600.0 / GIB),
            "recovered_core_hours": float(harvested_c.sum() * STEP_S / 3600.0),
            "recovered_memory_gib_hours": float(harvested_m.sum() * STEP_S / 3600.0 / GIB),
            "wasted_cost": float(wasted_idle.sum() + wasted_unalloc.sum()),
            "recovered_cost": float(recovered.sum()),
            "faas_invocations_total": total_inv,
            "faas_invocations_served": float(inv_served.sum()),
            "faas_invocations_rejected": float(total_inv - inv_served.sum()),
            "evictions": float(len(evict_t)),
            "evicted_function_cores": float(evicted_cores),
            "cold_starts": float(cold.sum() + evicted_cores),
            "interference_violation_hours": float(violation_h),
            **{
                f"evictions_{reason}": float(count)
                for reason, count in sorted(Counter(drive.evict_reason).items())
            },
            "events": float(n_events),
            "decisions": float(decisions),
            "replay_seconds": float(elapsed),
        }
        series[name] = PolicySeries(
            offered_cores=off_c,
            offered_memory_bytes=off_m,
            harvested_cores=harvested_c,
            harvested_memory_bytes=harvested_m,
            recovered_cost=recovered,
            invocations_served=inv_served,
            evictions=evictions,
            cold_starts=cold,
            summary=summary,
            eviction_jobs=_eviction_jobs(drive.evict_reason, drive.evict_jobs),
        )
        log.info("policy %s: %d events in %.1f s", name, n_events, elapsed)
    if bar is not None:
        bar.close()
    info = _info(jobs, faas, placement, job_usage, memory_bound, dem, faas_scale, seed, minutes)
    info["timings_s"] = timings
    return ReplayResult(
        t=t0 + np.arange(minutes, dtype=np.float64) * STEP_S,
        step_s=STEP_S,
        cluster=cluster,
        allocated_cores=alloc_c,
        used_cores=used_c,
        allocated_memory_bytes=alloc_m,
        used_memory_bytes=used_m,
        wasted_idle_cost=wasted_idle,
        wasted_unallocated_cost=wasted_unalloc,
        demand=dem,
        policies=series,
        info=info,
    )


@dataclass(slots=True)
class Prepared:
    """The policy-independent part of a replay: placement, usage steps, events, FaaS demand,
    and ``pieces`` (piece index -> its :class:`~traces.decisions.Piece`, built on demand)."""

    placement: Placement
    job_usage: JobUsage
    memory_bound: npt.NDArray[np.bool_]
    steps: PieceSteps
    events: Events
    demand: Demand
    pieces: Callable[[int], Piece]
    timings: dict[str, float]
    faas_scale: float = 1.0

    def at_scale(self, faas: FaasTrace, faas_scale: float) -> Prepared:
        """The same, with ``faas``'s demand multiplied by ``faas_scale``."""
        if faas_scale == self.faas_scale:
            return self
        scaled = demand(faas, self.placement.minutes, faas_scale)
        return replace(self, demand=scaled, timings={}, faas_scale=faas_scale)


@heap_kept()
def prepare(
    jobs: JobTrace,
    faas: FaasTrace,
    cluster: Cluster,
    limits: Limits,
    usage: UsageModel,
    interference: InterferenceModel,
    seed: int,
    faas_scale: float,
) -> Prepared:
    """Place the jobs, model their usage and interference, and make the events."""
    started = time.perf_counter()
    memory = job_memory(jobs, cluster)
    with gc_paused():
        placement = place(jobs, cluster, memory)
    job_usage = usage.sample(jobs, memory, seed)
    sensitivity, memory_bound = interference.sensitivity(len(jobs), seed)
    minutes = placement.minutes
    dem = demand(faas, minutes, faas_scale)
    timings = {"place_s": time.perf_counter() - started}
    started = time.perf_counter()

    pj = placement.job
    steps = piece_steps(placement, job_usage)
    history_min = max(1, math.ceil(limits.min_history_s / STEP_S))
    events = build_events(placement, steps, history_min, cluster.nodes)

    t0 = placement.t0
    # Read a piece at a time through memoryviews (an item read makes a Python int or float):
    # lists of every step would hold ~0.5 GB of float objects on RICC-2010-2, fresh pages
    # the kernel zeroes at ~2 s per GB, for values most of which are read once.
    job_ids = jobs.job_id.tolist()
    pj_v = np.ascontiguousarray(pj).data
    masks = placement.cpu_mask
    mem_alloc_v = np.ascontiguousarray(placement.memory_bytes).data
    step_off_v = np.ascontiguousarray(steps.offsets).data
    step_t_v = (t0 + steps.minute * STEP_S).data
    step_c_v = np.ascontiguousarray(steps.cores, dtype=np.float64).data
    step_m_v = steps.memory.astype(np.int64).data
    sens_v = np.ascontiguousarray(sensitivity[pj], dtype=np.float64).data
    cpu_sets: dict[int, frozenset[int]] = {}
    # One job's pieces with the same cores and memory (a parallel job's full nodes) are equal
    # in every field and start in the same minute: they share one Piece and its cached job
    # views. The table only needs the recent starts; it is emptied when it grows large.
    recent: dict[tuple[int, int, float], Piece] = {}

    def pieces_static(p: int) -> Piece:
        mask = masks[p]
        job = pj_v[p]
        mem = mem_alloc_v[p]
        piece = recent.get((job, mask, mem))
        if piece is not None:
            return piece
        if len(recent) >= 4096:
            recent.clear()
        ids = cpu_sets.get(mask)
        if ids is None:
            ids = frozenset(b for b in range(mask.bit_length()) if (mask >> b) & 1)
            cpu_sets[mask] = ids
        lo, hi = step_off_v[p], step_off_v[p + 1]
        piece = Piece(
            str(job_ids[job]),
            (job, mask, int(mem)),
            ids,
            int(mem),
            step_t_v[lo],
            tuple(step_t_v[lo:hi]),
            tuple(step_c_v[lo:hi]),
            tuple(step_m_v[lo:hi]),
            sens_v[p],
            {},
        )
        recent[(job, mask, mem)] = piece
        return piece

    timings["events_s"] = time.perf_counter() - started
    return Prepared(
        placement, job_usage, memory_bound, steps, events, dem, pieces_static, timings, faas_scale
    )


def _info(
    jobs: JobTrace,
    faas: FaasTrace,
    placement: Placement,
    job_usage: JobUsage,
    memory_bound: npt.NDArray[np.bool_],
    dem: Demand,
    faas_scale: float,
    seed: int,
    minutes: int,
) -> dict[str, object]:
    placed = np.zeros(len(jobs), dtype=bool)
    placed[placement.job] = True
    return {
        "seed": seed,
        "replay_loop": compiled.running(),  # "compiled" (mypyc) or "source"
        "span_days": minutes * STEP_S / 86400.0,
        "jobs_in_trace": len(jobs),
        "jobs_placed": placement.jobs_placed,
        "job_pieces": int(placement.job.size),
        "jobs_skipped_by_reader": dict(jobs.skipped),
        "jobs_skipped_by_placement": dict(placement.skipped),
        "cpu_use_measured_jobs": int((job_usage.cpu_measured & placed).sum()),
        "memory_use_measured_jobs": int((job_usage.memory_measured & placed).sum()),
        "memory_bound_jobs": int((memory_bound & placed).sum()),
        "faas_functions": len(faas.function_ids),
        "faas_trace_minutes": faas.minutes,
        "faas_repeats": dem.repeats,
        "faas_scale": faas_scale,
        "faas_notes": list(faas.notes),
        "jobs_notes": list(jobs.notes),
    }
