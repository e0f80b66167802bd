"""The per-node decision loop of the replay: events in time order, one ``decide`` per node
and minute, leases sized to the FaaS load, interference time counted.

See :mod:`traces.replay` for the whole procedure; this module is its hot loop, so it uses
plain lists, tuples and slots classes.
"""

from __future__ import annotations

import contextlib
import gc
import heapq
import math
import random
from bisect import bisect_right
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from policies import POLICIES
from policies.limits import Limits
from policies.model import EvictionReason, JobView, LeaseView, NodeView, Offer, UsageSample
from traces.demand import STEP_S, Demand
from traces.interference import cpu_pressure
from traces.placement import Cluster, Placement
from traces.usage import JobUsage

Progress = Callable[[int], None]
Events = tuple[
    npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]
]

END, START, TICK, USAGE = 0, 1, 2, 3  # event kinds (USAGE: a job's use steps)


@dataclass(slots=True)
class Piece:
    """Static facts of one running job piece, built at its start (hot loop: plain slots).

    Equal pieces (one job's pieces with the same cores and memory) may be one object (see
    :func:`traces.replay.replay`), so their job views are built once.
    """

    job_id: str
    signature: tuple[int, int, int]  # (job index, core mask, memory): equal pieces decide alike
    cpu_ids: frozenset[int]
    memory_allocated: int
    start_t: float
    step_t: tuple[float, ...]  # usage steps: start times (the first is start_t), ascending
    step_cores: tuple[float, ...]  # busy cores from that time on
    step_memory: tuple[int, ...]  # memory used from that time on, bytes
    sensitivity: float
    views: dict[tuple[int, int], JobView]  # (steps seen, lease cores) -> view, on first use


@dataclass(frozen=True, slots=True)
class PieceSteps:
    """Usage steps of every piece, flat: piece ``p`` has ``offsets[p]:offsets[p + 1]``.

    ``minute`` is on the replay's grid (the first step of a piece is its start), ``cores``
    busy cores and ``memory`` bytes used from that minute on.
    """

    offsets: npt.NDArray[np.int64]
    minute: npt.NDArray[np.int64]
    cores: npt.NDArray[np.float64]
    memory: npt.NDArray[np.float64]

    def delta(self, values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """Change of ``values`` at each step (the first step of a piece: from 0)."""
        out = np.diff(values, prepend=0.0)
        firsts = self.offsets[:-1][self.offsets[:-1] < self.offsets[1:]]
        out[firsts] = values[firsts]
        return out


CORE_QUANTUM = 0.25  # busy cores are followed in quarter cores (the policies' core margin)
MEMORY_QUANTUM = 1 / 64  # memory in 1/64 of the piece's allocation
SHORTEST_STEP_MIN = 30  # a shorter step is kept only when it is a big one
BIG_STEP_CORES = 2.0


def piece_steps(placement: Placement, usage: JobUsage) -> PieceSteps:
    """Each piece's usage steps on the minute grid.

    A job's steps (fractions of its run) land on the minute grid of its piece; steps in one
    minute keep the last; values are rounded to ``CORE_QUANTUM`` cores and ``MEMORY_QUANTUM``
    of the allocation, and a step that changes neither is dropped: it would move no policy
    boundary and only cost a decision.

    A piece's steps depend only on its job, cores, memory and minutes, so they are worked out
    once per distinct (job, cores, memory, start, end), e.g. once for all full nodes of a
    parallel job, and then copied to each piece.
    """
    pj = placement.job
    if not pj.size:
        empty = np.zeros(0, dtype=np.int64)
        return PieceSteps(
            np.zeros(1, dtype=np.int64), empty, empty.astype(float), empty.astype(float)
        )
    fields = (placement.end, placement.start, placement.memory_bytes, placement.cores, pj)
    order = np.lexsort(fields)
    new_class = np.ones(pj.size, dtype=bool)
    new_class[1:] = np.zeros(pj.size - 1, dtype=bool)
    for f in fields:
        fo = f[order]
        new_class[1:] |= fo[1:] != fo[:-1]
    firsts = order[new_class]
    klass = np.empty(pj.size, dtype=np.int64)
    klass[order] = np.cumsum(new_class) - 1
    k_off, minute, cores, memory = _class_steps(
        pj[firsts],
        placement.start[firsts],
        placement.end[firsts],
        placement.cores[firsts],
        placement.memory_bytes[firsts],
        usage,
    )
    counts = (k_off[1:] - k_off[:-1])[klass]
    ends = np.cumsum(counts)
    total = int(ends[-1])
    take = (
        np.repeat(k_off[:-1][klass], counts)
        + np.arange(total, dtype=np.int64)
        - np.repeat(ends - counts, counts)
    )
    offsets = np.concatenate([[0], ends]).astype(np.int64)
    return PieceSteps(offsets, minute[take], cores[take], memory[take])


def _class_steps(
    job_k: npt.NDArray[np.int64],
    start_k: npt.NDArray[np.int64],
    end_k: npt.NDArray[np.int64],
    cores_k: npt.NDArray[np.int64],
    alloc_k: npt.NDArray[np.float64],
    usage: JobUsage,
) -> tuple[
    npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.float64], npt.NDArray[np.float64]
]:
    """The steps of :func:`piece_steps` for each (job, start, end, cores, memory) given:
    (offsets, minute, cores, memory), class ``k`` at ``offsets[k]:offsets[k + 1]``."""
    lo = usage.step_offsets[job_k]
    counts = usage.step_offsets[job_k + 1] - lo
    total = int(counts.sum())
    ends = np.cumsum(counts)
    take = (
        np.repeat(lo, counts) + np.arange(total, dtype=np.int64) - np.repeat(ends - counts, counts)
    )
    piece = np.repeat(np.arange(job_k.size, dtype=np.int64), counts)
    start, end = start_k[piece], end_k[piece]
    minute = np.minimum(
        start + np.rint(usage.step_frac[take] * (end - start)).astype(np.int64), end - 1
    )
    alloc = alloc_k[piece]
    cores = np.rint(usage.step_cpu[take] * cores_k[piece] / CORE_QUANTUM) * CORE_QUANTUM
    memory = np.floor(np.rint(usage.step_memory[take] / MEMORY_QUANTUM) * MEMORY_QUANTUM * alloc)
    # the last step of a minute holds; then drop steps that change nothing
    keep = np.ones(total, dtype=bool)
    keep[:-1] = (piece[1:] != piece[:-1]) | (minute[1:] != minute[:-1])
    piece, minute, cores, memory = piece[keep], minute[keep], cores[keep], memory[keep]
    first = np.ones(piece.size, dtype=bool)
    first[1:] = piece[1:] != piece[:-1]
    minute[first] = start_k[piece[first]]
    same = np.zeros(piece.size, dtype=bool)
    same[1:] = (cores[1:] == cores[:-1]) & (memory[1:] == memory[:-1])
    keep = first | ~same
    piece, minute, cores, memory = piece[keep], minute[keep], cores[keep], memory[keep]
    # A flutter is not a burst: a step that lasts less than SHORTEST_STEP_MIN and moves less
    # than BIG_STEP_CORES (and less than half its memory) is left out, and so is what then
    # changes nothing.
    for _ in range(2):
        if not piece.size:
            break
        nxt = np.empty(piece.size, dtype=np.int64)
        nxt[:-1] = np.where(piece[1:] == piece[:-1], minute[1:], end_k[piece[:-1]])
        nxt[-1] = end_k[piece[-1]]
        first = np.ones(piece.size, dtype=bool)
        first[1:] = piece[1:] != piece[:-1]
        prev_c = np.concatenate([[0.0], cores[:-1]])
        prev_m = np.concatenate([[0.0], memory[:-1]])
        big = (np.abs(cores - prev_c) >= BIG_STEP_CORES) | (np.abs(memory - prev_m) > 0.5 * prev_m)
        keep = first | big | (nxt - minute >= SHORTEST_STEP_MIN)
        piece, minute, cores, memory = piece[keep], minute[keep], cores[keep], memory[keep]
        same = np.zeros(piece.size, dtype=bool)
        same[1:] = (
            (piece[1:] == piece[:-1]) & (cores[1:] == cores[:-1]) & (memory[1:] == memory[:-1])
        )
        piece, minute, cores, memory = piece[~same], minute[~same], cores[~same], memory[~same]
    # A rise in CPU is seen again one sample (a minute) later, as an agent sampling on would
    # see it: the policies confirm growth over consecutive samples before evicting.
    rising = np.zeros(piece.size, dtype=bool)
    rising[1:] = (piece[1:] == piece[:-1]) & (cores[1:] > cores[:-1])
    follows = np.empty(piece.size, dtype=np.int64)
    follows[:-1] = np.where(piece[1:] == piece[:-1], minute[1:], end_k[piece[:-1]])
    if piece.size:
        follows[-1] = end_k[piece[-1]]
    again = np.flatnonzero(rising & (minute + 1 < follows))
    if again.size:
        piece = np.concatenate([piece, piece[again]])
        minute = np.concatenate([minute, minute[again] + 1])
        cores = np.concatenate([cores, cores[again]])
        memory = np.concatenate([memory, memory[again]])
        order = np.lexsort((minute, piece))
        piece, minute, cores, memory = piece[order], minute[order], cores[order], memory[order]
    offsets = np.searchsorted(piece, np.arange(job_k.size + 1)).astype(np.int64)
    return offsets, minute, cores, memory


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
    cores: int  # offered cores
    memory: int  # offered bytes
    draw: float  # the rounding draw of the lease's cores (same minute and first job)
    reason: str  # why the node's lease was evicted ("" if it was not)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector (reference counting still frees everything).

    The replay allocates millions of small acyclic objects (views, offers, states) while it
    keeps large acyclic tables alive; the collector's passes over them cost about a tenth of
    the replay and find nothing. Restores the previous setting on exit.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


Record = list[tuple[int, int, int, int, bool, int, int]]
"""Per decision point: (minute, node, offered cores, offered bytes, lease evicted, lease
cores, lease bytes), when a caller asks for it (the oracle test)."""


@dataclass(frozen=True, slots=True)
class Drive:
    """What one policy did over the events.

    ``change_t``/``change_c``/``change_m``: minutes the cluster's offer changed and by how many
    cores and bytes; ``evict_t``: minute of each lease eviction; ``violation_hours``:
    job-node-hours above the slowdown budget; ``evicted_cores``: function cores evicted;
    ``decisions``: ``decide`` calls made. Per eviction also ``evict_reason`` (the policy's
    reason) and ``evict_jobs``: the jobs it was for (those that started there at that minute
    for ``job_start``, those whose use changed then for growth, else the node's jobs).
    """

    change_t: list[int]
    change_c: list[int]
    change_m: list[int]
    evict_t: list[int]
    violation_hours: float
    evicted_cores: int
    decisions: int
    evict_reason: list[str] = field(default_factory=list)
    evict_jobs: list[tuple[str, ...]] = field(default_factory=list)


def drive_policy(
    name: str,
    placement: Placement,
    pieces_static: Callable[[int], Piece],
    events: Events,
    cluster: Cluster,
    limits: Limits,
    dem: Demand,
    seed: int,
    progress: Progress | None = None,
    record: Record | None = None,
) -> Drive:
    """Drive one policy through the events (``record``: append each decision point to it)."""
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
    window = limits.history_window_s
    demand_c = dem.cores.tolist()
    demand_m = dem.memory_bytes.tolist()
    minutes = len(demand_c)
    salt = random.Random(seed).randrange(1 << 30)
    memo: dict[object, _Memo] = {}
    interned: dict[object, object] = {}
    memo_minute = -1
    decisions = 0
    running: list[dict[int, Piece]] = [{} for _ in range(cluster.nodes)]
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
    evict_reason: list[str] = []
    evict_jobs: list[tuple[str, ...]] = []
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
    is_change = (events[3] == START) | (events[3] == END)
    # per group: 1 = jobs start or end, 2 = a job's use steps (the job views change)
    flags = is_change.astype(np.int64) | ((events[3] == USAGE).astype(np.int64) << 1)
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
            first_event = last_event = 0
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
                if kind == START:
                    piece = ev_piece[i]
                    jobs_here[piece] = pieces_static(piece)
                elif kind == END:
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
                    [
                        p.views.get((bisect_right(p.step_t, now), lease_cores))
                        or _job_view(p, bisect_right(p.step_t, now), lease_cores, cpn, window)
                        for p in jobs_here.values()
                    ]
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
            evictions = decision.evictions
            evicted = (
                current is not None
                and bool(evictions)
                and any(e.lease_id == current.lease_id for e in evictions)
            )
            pressure_evicted = evicted and any(
                e.reason is EvictionReason.PRESSURE for e in evictions
            )
            reason = (
                next(str(e.reason) for e in evictions if e.lease_id == current.lease_id)
                if evicted and current is not None
                else ""
            )
            new_state = decision.state
            # equal states become one object, so equal nodes keep meeting in the memo;
            # an unhashable state just does not share
            try:
                new_state = interned.setdefault(new_state, new_state)
            except TypeError:
                new_state = decision.state  # (a try costs less than suppress() per call)
            first = signature[0][0] if signature else -1
            entry = _Memo(
                decision.offer,
                new_state,
                evicted,
                pressure_evicted,
                old_state,
                {},
                len(decision.offer.cpu_ids),
                decision.offer.memory_bytes,
                ((minute * 1_000_003 + first * 7919 + salt) * 2_654_435_761 % 4_294_967_296)
                / 4_294_967_296,
                reason,
            )
            memo[key] = entry
            decisions += 1
        offer = entry.offer
        state[node] = entry.new_state
        if entry.evicted and current is not None:
            evict_t.append(minute)
            evicted_cores += len(current.cpu_ids)
            evict_reason.append(entry.reason)
            evict_jobs.append(
                _evicted_for(
                    entry.reason,
                    jobs_here,
                    ev_kind,
                    ev_piece,
                    first_event,
                    last_event,
                )
            )
            if entry.pressure_evicted and guard_on:
                cooling[node] = True
        oc = entry.cores
        om = entry.memory
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
            cores = int(oc * (u_c if u_c < 1.0 else 1.0) + entry.draw)
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
        if record is not None:
            lease_now = lease[node]
            record.append(
                (
                    minute,
                    node,
                    oc,
                    om,
                    entry.evicted,
                    len(lease_now[0].cpu_ids) if lease_now else 0,
                    lease_now[0].memory_bytes if lease_now else 0,
                )
            )
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
    return Drive(
        change_t,
        change_c,
        change_m,
        evict_t,
        violation_s / 3600.0,
        evicted_cores,
        decisions,
        evict_reason,
        evict_jobs,
    )


def _evicted_for(
    reason: str,
    jobs_here: dict[int, Piece],
    ev_kind: list[int],
    ev_piece: list[int],
    first_event: int,
    last_event: int,
) -> tuple[str, ...]:
    """The jobs an eviction was for: those that started here now (``job_start``), those whose
    use changed now (growth), else every job on the node."""
    wanted = START if reason == EvictionReason.JOB_START else USAGE
    if reason in (
        EvictionReason.JOB_START,
        EvictionReason.CPU_GROWTH,
        EvictionReason.MEMORY_GROWTH,
    ):
        ids = {
            jobs_here[ev_piece[i]].job_id
            for i in range(first_event, last_event)
            if ev_kind[i] == wanted and ev_piece[i] in jobs_here
        }
        if ids:
            return tuple(sorted(ids))
    return tuple(sorted({p.job_id for p in jobs_here.values()}))


def _job_view(p: Piece, seen: int, lease_cores: int, cpn: int, window: float) -> JobView:
    """The job as the agent would report it after its first ``seen`` usage steps, next to
    ``lease_cores`` function cores (built once per piece and situation).

    Usage is piecewise constant, so the history holds one sample per step; a denser one would
    say the same. Samples older than the window before the latest step are left out (a
    policy never looks further back; the peak they held is ``memory_peak_bytes``). The
    latest sample carries the pressure the node's functions cause.
    """
    key = (seen, lease_cores)
    view = p.views.get(key)
    if view is not None:
        return view
    seen = max(seen, 1)
    pressure = cpu_pressure(p.sensitivity * lease_cores / cpn) if lease_cores else None
    times = p.step_t
    first = bisect_right(times, times[seen - 1] - window, 0, seen - 1)
    if first:
        first -= 1  # the sample in force at the window's start
    older = [
        UsageSample(times[i], p.step_cores[i], p.step_memory[i]) for i in range(first, seen - 1)
    ]
    latest = UsageSample(times[seen - 1], p.step_cores[seen - 1], p.step_memory[seen - 1], pressure)
    history = (*older, latest)
    peak = max(p.step_memory[:seen])
    view = JobView(p.job_id, p.cpu_ids, p.memory_allocated, peak, history, True, p.start_t)
    p.views[key] = view
    return view


def build_events(
    placement: Placement, steps: PieceSteps, history_minutes: int, nodes: int
) -> Events:
    """Events (minute, node, piece, kind) sorted by minute, then node.

    Per piece: its start, its end, a tick ``history_minutes`` after its start (unless a usage
    step comes first) and its later usage steps. Every node also gets a tick at minute 0, so
    idle nodes offer from the start.
    """
    n = placement.job.size
    idx = np.arange(n, dtype=np.int64)
    start, end = placement.start, placement.end
    later = np.ones(steps.minute.size, dtype=bool)
    later[steps.offsets[:-1][steps.offsets[:-1] < steps.minute.size]] = False
    step_piece = np.repeat(idx, np.diff(steps.offsets))
    second = np.where(
        np.diff(steps.offsets) > 1,
        steps.minute[np.minimum(steps.offsets[:-1] + 1, steps.minute.size - 1)],
        end,
    )
    tick = start + history_minutes
    has_tick = (tick < end) & (tick < second)
    t = np.concatenate([end, start, tick[has_tick], steps.minute[later]])
    piece = np.concatenate([idx, idx, idx[has_tick], step_piece[later]])
    kind = np.concatenate(
        [
            np.full(n, END),
            np.full(n, START),
            np.full(int(has_tick.sum()), TICK),
            np.full(int(later.sum()), USAGE),
        ]
    ).astype(np.int64)
    node = np.concatenate([placement.node[piece], np.arange(nodes, dtype=np.int64)])
    t = np.concatenate([t, np.zeros(nodes, dtype=np.int64)])
    piece = np.concatenate([piece, np.full(nodes, -1, dtype=np.int64)])
    kind = np.concatenate([kind, np.full(nodes, TICK, dtype=np.int64)])
    order = np.argsort(t * (int(node.max()) + 1 if node.size else 1) + node, kind="stable")
    return t[order], node[order], piece[order], kind[order]
