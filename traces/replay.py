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

import contextlib
import heapq
import logging
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from policies import POLICIES
from policies.limits import Limits
from policies.model import EvictionReason, JobView, LeaseView, NodeView, Offer, UsageSample
from policies.prices import GIB, Prices
from traces.azure import FaasTrace
from traces.demand import STEP_S, Demand, demand
from traces.interference import InterferenceModel, cpu_pressure
from traces.jobs import JobTrace
from traces.placement import Cluster, Placement, job_memory, place
from traces.usage import JobUsage, UsageModel

log = logging.getLogger(__name__)
Floats = npt.NDArray[np.float64]
Progress = Callable[[int], None]

_END, _START, _TICK, _RAMP = 0, 1, 2, 3


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


@dataclass(slots=True)
class _Piece:
    """Static facts of one running job piece, built at its start (hot loop: plain slots)."""

    job_id: str
    signature: tuple[int, int, int]  # (job index, core mask, memory): equal pieces decide alike
    cpu_ids: frozenset[int]
    memory_allocated: int
    start_t: float
    ramp_t: float
    cores_used: float
    ramp_memory: int
    steady_memory: int
    sensitivity: float
    views: dict[tuple[bool, int], JobView]  # (steady phase, lease cores) -> view, on first use


_LeaseOutcome = tuple[LeaseView, int, tuple[frozenset[int], int, float], bool]
"""A node's lease, its jobs above the slowdown budget, the lease's memo key, and whether a
job's modelled pressure reaches the guard's limit."""


@dataclass(slots=True)
class _Memo:
    """One decision of a minute, shared by every node in the same situation."""

    offer: Offer
    new_state: object | None
    evicted: bool
    pressure_evicted: bool
    old_state: object | None  # kept alive so its id is not reused within the minute
    leases: dict[tuple[int, int], _LeaseOutcome]  # (cores, bytes) -> outcome


def replay_policy(
    name: str,
    placement: Placement,
    pieces_static: Callable[[int], _Piece],
    events: tuple[
        npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]
    ],
    cluster: Cluster,
    limits: Limits,
    dem: Demand,
    seed: int,
    progress: Progress | None = None,
) -> tuple[list[int], list[int], list[int], list[int], float, int, int]:
    """Drive one policy through the events.

    Returns offer-change minutes, core deltas, memory deltas, eviction minutes, violation
    job-node-hours, evicted function cores and the number of ``decide`` calls.
    """
    policy = POLICIES[name]()
    decide = policy.decide
    ev_piece, ev_kind = events[2].tolist(), events[3].tolist()
    n_events = len(ev_kind)
    t0 = placement.t0
    cpn = cluster.cores_per_node
    node_cpus = frozenset(range(cpn))
    mem_total = cluster.memory_per_node_bytes
    reserved = cluster.memory_reserved_bytes
    budget = limits.slowdown_budget
    demand_c = dem.cores.tolist()
    demand_m = dem.memory_bytes.tolist()
    minutes = len(demand_c)
    salt = random.Random(seed).randrange(1 << 30)
    memo: dict[object, _Memo] = {}
    interned: dict[object, object] = {}
    memo_minute = -1
    decisions = 0
    running: list[dict[int, _Piece]] = [{} for _ in range(cluster.nodes)]
    state: list[object | None] = [None] * cluster.nodes
    # per node: its lease outcome (see _LeaseOutcome) or None
    lease: list[_LeaseOutcome | None] = [None] * cluster.nodes
    node_signature: list[tuple[tuple[int, int, int], ...]] = [()] * cluster.nodes
    offer_c = [0] * cluster.nodes
    offer_m = [0] * cluster.nodes
    viol_since = [0.0] * cluster.nodes
    total_c = 0
    total_m = 0
    change_t: list[int] = []
    change_c: list[int] = []
    change_m: list[int] = []
    evict_t: list[int] = []
    violation_s = 0.0
    evicted_cores = 0
    lease_serial = 0
    done_mark = 0
    # "Periodic ticks only if needed": the guard acts on pressure only after a grace period
    # and re-offers after a cooldown, so those moments get a decision of their own.
    guard_on = limits.guard
    grace_min = max(1, math.ceil(limits.pressure_grace_s / STEP_S))
    cooldown_min = max(1, math.ceil(limits.reoffer_cooldown_s / STEP_S))
    limit = limits.cpu_pressure_limit
    pressure_slowdown = (
        limit / (100.0 - limit) if limit < 100.0 else math.inf
    )  # inverse of cpu_pressure
    follow_ups: list[tuple[int, int]] = []  # (minute, node)
    last_decided = [-1] * cluster.nodes
    cooling = [False] * cluster.nodes
    t_arr, node_arr = events[0], events[1]
    first_of_group = np.ones(n_events, dtype=bool)
    first_of_group[1:] = (t_arr[1:] != t_arr[:-1]) | (node_arr[1:] != node_arr[:-1])
    group_start = np.flatnonzero(first_of_group)
    bounds = [*group_start.tolist(), n_events]
    group_minute = t_arr[group_start].tolist()
    group_node = node_arr[group_start].tolist()
    is_change = (events[3] == _START) | (events[3] == _END)
    # per group: 1 = jobs start or end, 2 = a start-up phase ends (the job views change)
    flags = is_change.astype(np.int64) | ((events[3] == _RAMP).astype(np.int64) << 1)
    group_changes = np.bitwise_or.reduceat(flags, group_start).tolist() if n_events else []
    node_views: list[tuple[int, tuple[JobView, ...]] | None] = [None] * cluster.nodes
    n_groups = len(group_minute)
    g = 0
    while g < n_groups or follow_ups:
        if follow_ups and (g >= n_groups or follow_ups[0] < (group_minute[g], group_node[g])):
            minute, node = heapq.heappop(follow_ups)
            if last_decided[node] >= minute:
                continue
            changes = 0
        else:
            minute = group_minute[g]
            node = group_node[g]
            changes = group_changes[g]
            first_event, last_event = bounds[g], bounds[g + 1]
            g += 1
        last_decided[node] = minute
        now = t0 + minute * STEP_S
        jobs_here = running[node]
        held = lease[node]
        # interference time since this node's last decision
        if held is not None and held[1]:
            violation_s += (now - viol_since[node]) * held[1]
        if changes:
            node_views[node] = None
        if changes & 1:  # starts or ends here (ticks and phase ends change no job set)
            for i in range(first_event, last_event):
                kind = ev_kind[i]
                if kind == _START:
                    piece = ev_piece[i]
                    jobs_here[piece] = pieces_static(piece)
                elif kind == _END:
                    del jobs_here[ev_piece[i]]
            node_signature[node] = tuple([p.signature for p in jobs_here.values()])
        current = held[0] if held is not None else None
        old_state = state[node]
        # Nodes in the same situation (the pieces of one parallel job, same lease, same
        # policy state object) get the same decision: decide is pure, so it is asked once a
        # minute. The memo holds the old state, so its id cannot be reused within the minute.
        signature = node_signature[node]
        key = (signature, held[2] if held is not None else None, id(old_state))
        if minute != memo_minute:
            memo.clear()
            interned.clear()
            memo_minute = minute
        entry = memo.get(key)
        if entry is None:
            lease_cores = len(current.cpu_ids) if current is not None else 0
            cached_views = node_views[node]
            if cached_views is not None and cached_views[0] == lease_cores:
                views = cached_views[1]
            else:
                views = tuple(
                    [_job_view(p, now >= p.ramp_t, lease_cores, cpn) for p in jobs_here.values()]
                )
                node_views[node] = (lease_cores, views)
            view = NodeView(
                str(node),
                node_cpus,
                mem_total,
                views,
                (current,) if current is not None else (),
                reserved,
            )
            decision = decide(view, limits, now, old_state)
            evicted = current is not None and any(
                e.lease_id == current.lease_id for e in decision.evictions
            )
            pressure_evicted = evicted and any(
                e.reason is EvictionReason.PRESSURE for e in decision.evictions
            )
            new_state = decision.state
            # equal states become one object, so equal nodes keep meeting in the memo;
            # an unhashable state just does not share
            with contextlib.suppress(TypeError):
                new_state = interned.setdefault(new_state, new_state)
            entry = _Memo(decision.offer, new_state, evicted, pressure_evicted, old_state, {})
            memo[key] = entry
            decisions += 1
        offer = entry.offer
        state[node] = entry.new_state
        if entry.evicted and current is not None:
            evict_t.append(minute)
            evicted_cores += len(current.cpu_ids)
            if entry.pressure_evicted and guard_on:
                cooling[node] = True
        oc = len(offer.cpu_ids)
        om = offer.memory_bytes
        if oc != offer_c[node] or om != offer_m[node]:
            total_c += oc - offer_c[node]
            total_m += om - offer_m[node]
            change_t.append(minute)
            change_c.append(oc - offer_c[node])
            change_m.append(om - offer_m[node])
            offer_c[node] = oc
            offer_m[node] = om
        # the functions this node carries now: its share of the cluster-wide load, cores
        # rounded with a draw shared by equal nodes of a minute, so they stay equal
        cores = 0
        if oc and om and total_c > 0:
            u_c = demand_c[minute] / total_c
            first = signature[0][0] if signature else -1
            draw = (
                (minute * 1_000_003 + first * 7919 + salt) * 2_654_435_761 % 4_294_967_296
            ) / 4_294_967_296
            cores = int(oc * (u_c if u_c < 1.0 else 1.0) + draw)
        if cores > 0:
            u_m = min(1.0, demand_m[minute] / total_m) if total_m > 0 else 0.0
            lease_memory = int(om * u_m)
            outcome = entry.leases.get((cores, lease_memory))
            if outcome is None:
                lease_serial += 1
                ids = frozenset(sorted(offer.cpu_ids)[-cores:])
                share = cores / cpn
                outcome = (
                    LeaseView(str(lease_serial), ids, lease_memory, now, math.inf),
                    sum(1 for p in jobs_here.values() if p.sensitivity * share > budget),
                    (ids, lease_memory, now),
                    any(p.sensitivity * share >= pressure_slowdown for p in jobs_here.values()),
                )
                entry.leases[(cores, lease_memory)] = outcome
            lease[node] = outcome
            cooling[node] = False
            # a job under pressure: the guard needs another decision after its grace period
            # (so while pressure lasts, the node is decided every grace period)
            if outcome[3] and guard_on and minute + grace_min < minutes:
                heapq.heappush(follow_ups, (minute + grace_min, node))
        else:
            lease[node] = None
            if cooling[node] and minute + cooldown_min < minutes:
                # after a pressure eviction: ask again every cooldown period until the guard
                # offers to functions again (its cooldown may grow with repeated evictions)
                heapq.heappush(follow_ups, (minute + cooldown_min, node))
        viol_since[node] = now
        if progress is not None and not g & 4095:
            done = bounds[g]
            progress(done - done_mark)
            done_mark = done
    if progress is not None:
        progress(n_events - done_mark)
    end = t0 + minutes * STEP_S  # violations still running when the trace ends
    violation_s += sum(
        (end - since) * held[1]
        for since, held in zip(viol_since, lease, strict=True)
        if held is not None
    )
    return change_t, change_c, change_m, evict_t, violation_s / 3600.0, evicted_cores, decisions


def _job_view(p: _Piece, steady: bool, lease_cores: int, cpn: int) -> JobView:
    """The job as the agent would report it, in its start-up or steady phase, next to
    ``lease_cores`` function cores (built once per piece and situation).

    Usage is piecewise constant, so the history holds one sample per phase (start, end of
    the start-up phase); a denser one would say the same. The latest sample carries the
    pressure the node's functions cause.
    """
    key = (steady, lease_cores)
    view = p.views.get(key)
    if view is not None:
        return view
    pressure = cpu_pressure(p.sensitivity * lease_cores / cpn) if lease_cores else None
    if steady:
        memory = p.steady_memory
        history: tuple[UsageSample, ...] = (
            UsageSample(p.start_t, p.cores_used, p.ramp_memory),
            UsageSample(p.ramp_t, p.cores_used, memory, pressure),
        )
    else:
        memory = p.ramp_memory
        history = (UsageSample(p.start_t, p.cores_used, memory, pressure),)
    view = JobView(p.job_id, p.cpu_ids, p.memory_allocated, memory, history, True, p.start_t)
    p.views[key] = view
    return view


def build_events(
    placement: Placement, ramp_minutes: npt.NDArray[np.int64], history_minutes: int, nodes: int
) -> tuple[
    npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]
]:
    """Events (minute, node, piece, kind) sorted by minute, then node.

    Every node also gets a tick at minute 0, so idle nodes offer from the start.
    """
    n = placement.job.size
    idx = np.arange(n, dtype=np.int64)
    start, end = placement.start, placement.end
    ramp_end = start + ramp_minutes
    tick = start + history_minutes
    has_tick = (tick < end) & (tick < ramp_end)
    has_ramp = (ramp_end > start) & (ramp_end < end)
    t = np.concatenate([end, start, tick[has_tick], ramp_end[has_ramp]])
    piece = np.concatenate([idx, idx, idx[has_tick], idx[has_ramp]])
    kind = np.concatenate(
        [
            np.full(n, _END),
            np.full(n, _START),
            np.full(int(has_tick.sum()), _TICK),
            np.full(int(has_ramp.sum()), _RAMP),
        ]
    ).astype(np.int64)
    node = np.concatenate([placement.node[piece], np.arange(nodes, dtype=np.int64)])
    t = np.concatenate([t, np.zeros(nodes, dtype=np.int64)])
    piece = np.concatenate([piece, np.full(nodes, -1, dtype=np.int64)])
    kind = np.concatenate([kind, np.full(nodes, _TICK, dtype=np.int64)])
    order = np.argsort(t * (int(node.max()) + 1 if node.size else 1) + node, kind="stable")
    return t[order], node[order], piece[order], kind[order]


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
) -> ReplayResult:
    """Replay ``jobs`` and ``faas`` on ``cluster`` under each policy (default: all registered)."""
    limits = limits or Limits()
    prices = prices or Prices()
    usage = usage or UsageModel()
    interference = interference or InterferenceModel()
    names = list(policies) if policies else list(POLICIES)
    started = time.perf_counter()
    memory = job_memory(jobs, cluster)
    placement = place(jobs, cluster, memory)
    job_usage = usage.sample(jobs, memory, seed)
    sensitivity, memory_bound = interference.sensitivity(len(jobs), seed)
    minutes = placement.minutes
    dem = demand(faas, minutes, faas_scale)
    setup_s = time.perf_counter() - started

    pj = placement.job
    cores_used = placement.cores * job_usage.cpu_share[pj]
    steady = placement.memory_bytes * job_usage.memory_share[pj]
    ramp_memory = steady * job_usage.ramp_memory_level
    ramp_min = np.ceil(job_usage.ramp_s[pj] / STEP_S).astype(np.int64)
    history_min = max(1, math.ceil(limits.min_history_s / STEP_S))
    events = build_events(placement, ramp_min, history_min, cluster.nodes)
    timings = {"place_s": setup_s}

    t0 = placement.t0
    job_ids = jobs.job_id.tolist()
    pj_l = pj.tolist()
    masks = placement.cpu_mask
    mem_alloc_l = placement.memory_bytes.tolist()
    start_l = placement.start.tolist()
    ramp_l = (placement.start + ramp_min).tolist()
    cores_used_l = cores_used.tolist()
    ramp_mem_l = ramp_memory.tolist()
    steady_l = steady.tolist()
    sens_l = sensitivity[pj].tolist()
    cpu_sets: dict[int, frozenset[int]] = {}

    def pieces_static(p: int) -> _Piece:
        mask = masks[p]
        ids = cpu_sets.get(mask)
        if ids is None:
            ids = frozenset(b for b in range(mask.bit_length()) if (mask >> b) & 1)
            cpu_sets[mask] = ids
        return _Piece(
            str(job_ids[pj_l[p]]),
            (pj_l[p], mask, int(mem_alloc_l[p])),
            ids,
            int(mem_alloc_l[p]),
            t0 + start_l[p] * STEP_S,
            t0 + ramp_l[p] * STEP_S,
            cores_used_l[p],
            int(ramp_mem_l[p]),
            int(steady_l[p]),
            sens_l[p],
            {},
        )

    # policy-independent cluster series
    start, end = placement.start, placement.end
    ramp_end = np.minimum(start + ramp_min, end)
    alloc_c = _level(
        minutes,
        np.concatenate([start, end]),
        np.concatenate([placement.cores, -placement.cores]).astype(np.float64),
    )
    used_c = _level(
        minutes, np.concatenate([start, end]), np.concatenate([cores_used, -cores_used])
    )
    alloc_m = _level(
        minutes,
        np.concatenate([start, end]),
        np.concatenate([placement.memory_bytes, -placement.memory_bytes]),
    )
    used_m = _level(
        minutes,
        np.concatenate([start, ramp_end, end]),
        np.concatenate([ramp_memory, steady - ramp_memory, -steady]),
    )
    total_c = np.full(minutes, float(cluster.cores))
    total_m = np.full(
        minutes,
        float(cluster.nodes * (cluster.memory_per_node_bytes - cluster.memory_reserved_bytes)),
    )
    wasted_idle = idle_cost_series(prices, alloc_c - used_c, alloc_m - used_m, cluster)
    wasted_unalloc = idle_cost_series(prices, total_c - alloc_c, total_m - alloc_m, cluster)

    timings["events_and_cluster_series_s"] = time.perf_counter() - started - setup_s
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
        change_t, change_c, change_m, evict_t, violation_h, evicted_cores, decisions = (
            replay_policy(
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
        )
        timings[f"{name}_loop_s"] = time.perf_counter() - t_policy
        when = np.asarray(change_t, dtype=np.int64)
        off_c = _level(minutes, when, np.asarray(change_c, dtype=np.float64))
        off_m = _level(minutes, when, np.asarray(change_m, dtype=np.float64))
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
