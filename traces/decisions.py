"""The per-node decision loop of the replay: events in time order, one ``decide`` per node
and minute, leases sized to the FaaS load, interference time counted.

See :mod:`traces.replay` for the whole procedure; this module is its hot loop, so it uses
plain lists, tuples and slots classes.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import heapq
import math
import random
import sys
from bisect import bisect_right
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import accumulate

import numpy as np
import numpy.typing as npt

from policies import POLICIES
from policies.limits import Limits
from policies.model import (
    Decision,
    EvictionReason,
    JobView,
    LeaseView,
    NodeView,
    Offer,
    UsageSample,
)
from traces.demand import STEP_S, Demand
from traces.interference import cpu_pressure
from traces.placement import Cluster, Placement
from traces.usage import JobUsage, chunks

Progress = Callable[[int], None]
Ints = Sequence[int]  # read item by item in the loop (lists, or memoryviews of numpy arrays)
Events = tuple[
    npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]
]

END, START, TICK, USAGE, RISE = 0, 1, 2, 3, 4  # event kinds (USAGE: a job's use steps)
# RISE: a use step whose rise the job's next sample, a minute later, shows again (an "echo"
# step with no event of its own; see :func:`build_events` and :func:`drive_policy`)


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
    views: dict[int, JobView]  # steps seen * (cores per node + 1) + lease cores -> view
    samples: list[UsageSample] = field(default_factory=list)  # one per step, on first use
    peaks: list[int] = field(default_factory=list)  # memory peak up to each step, with samples


@dataclass(frozen=True, slots=True)
class PieceSteps:
    """Usage steps of every piece, flat: piece ``p`` has ``offsets[p]:offsets[p + 1]``.

    ``minute`` is on the replay's grid (the first step of a piece is its start), ``cores``
    busy cores and ``memory`` bytes used from that minute on; ``echo``: the step repeats the
    rise of the step before it one minute later (the confirming sample; it is a sample of
    the job's history but not an event, see :func:`build_events`).
    """

    offsets: npt.NDArray[np.int64]
    minute: npt.NDArray[np.int64]
    cores: npt.NDArray[np.float64]
    memory: npt.NDArray[np.float64]
    echo: npt.NDArray[np.bool_]

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
            np.zeros(1, dtype=np.int64),
            empty,
            empty.astype(float),
            empty.astype(float),
            empty.astype(bool),
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
    k_off, minute, cores, memory, echo = _class_steps(
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
    return PieceSteps(offsets, minute[take], cores[take], memory[take], echo[take])


_ClassSteps = tuple[
    npt.NDArray[np.int64],
    npt.NDArray[np.int64],
    npt.NDArray[np.float64],
    npt.NDArray[np.float64],
    npt.NDArray[np.bool_],
]
"""Steps of job classes: (offsets per class, minute, cores, memory, echo)."""


def _class_steps(
    job_k: npt.NDArray[np.int64],
    start_k: npt.NDArray[np.int64],
    end_k: npt.NDArray[np.int64],
    cores_k: npt.NDArray[np.int64],
    alloc_k: npt.NDArray[np.float64],
    usage: JobUsage,
) -> _ClassSteps:
    """:func:`_class_steps_of` a chunk of classes at a time: a whole trace's temporaries
    (RICC: 15 M job steps, a dozen arrays) would take about 1 GB of fresh pages, which the
    kernel zeroes at more cost than the work itself. Each class's steps are its own, so the
    chunks give the same steps as one pass."""
    parts = [
        _class_steps_of(
            job_k[lo:hi], start_k[lo:hi], end_k[lo:hi], cores_k[lo:hi], alloc_k[lo:hi], usage
        )
        for lo, hi in chunks(usage.step_offsets[job_k + 1] - usage.step_offsets[job_k])
    ]
    if len(parts) == 1:
        return parts[0]
    shift = np.cumsum([0] + [part[0][-1] for part in parts[:-1]])
    offsets = np.concatenate(
        [[0], *(part[0][1:] + base for part, base in zip(parts, shift, strict=True))]
    ).astype(np.int64)
    minute, cores, memory, echo = (np.concatenate([part[i] for part in parts]) for i in range(1, 5))
    return offsets, minute, cores, memory, echo


def _class_steps_of(
    job_k: npt.NDArray[np.int64],
    start_k: npt.NDArray[np.int64],
    end_k: npt.NDArray[np.int64],
    cores_k: npt.NDArray[np.int64],
    alloc_k: npt.NDArray[np.float64],
    usage: JobUsage,
) -> _ClassSteps:
    """The steps of :func:`piece_steps` for each (job, start, end, cores, memory) given:
    (offsets, minute, cores, memory, echo), class ``k`` at ``offsets[k]:offsets[k + 1]``."""
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
    # the last step of a minute holds (values are worked out for those steps only: most
    # shape steps of a long job share a minute); then drop steps that change nothing
    keep = np.ones(total, dtype=bool)
    keep[:-1] = (piece[1:] != piece[:-1]) | (minute[1:] != minute[:-1])
    piece, minute, take = piece[keep], minute[keep], take[keep]
    alloc = alloc_k[piece]
    cores = np.rint(usage.step_cpu[take] * cores_k[piece] / CORE_QUANTUM) * CORE_QUANTUM
    memory = np.floor(np.rint(usage.step_memory[take] / MEMORY_QUANTUM) * MEMORY_QUANTUM * alloc)
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
    # The echo is a sample, not an event: it can only confirm growth into lent cores, so the
    # replay decides at it only where a lease held the node at the rise or after (drive_policy).
    again = np.flatnonzero(rising & (minute + 1 < follows))
    echo = np.zeros(piece.size, dtype=bool)
    if again.size:
        piece = np.concatenate([piece, piece[again]])
        minute = np.concatenate([minute, minute[again] + 1])
        cores = np.concatenate([cores, cores[again]])
        memory = np.concatenate([memory, memory[again]])
        echo = np.concatenate([echo, np.ones(again.size, dtype=bool)])
        order = np.lexsort((minute, piece))
        piece, minute, cores, memory = piece[order], minute[order], cores[order], memory[order]
        echo = echo[order]
    offsets = np.searchsorted(piece, np.arange(job_k.size + 1)).astype(np.int64)
    return offsets, minute, cores, memory, echo


@dataclass(slots=True)
class Lease:
    """The functions' lease on a node after a decision (one object for equal nodes of a minute).

    ``token`` names the lease's value (cores, memory, grant minute): equal leases of a minute
    share it, so the nodes that hold them meet in the memo. ``violating``: jobs on the node
    above the slowdown budget next to it; ``pressured``: a job's modelled pressure reaches
    the guard's limit (the guard needs a follow-up decision).
    """

    view: LeaseView
    token: int
    violating: int
    pressured: bool


@dataclass(slots=True)
class _Memo:
    """One decision of a minute, shared by every node in the same situation."""

    offer: Offer
    new_state: object | None
    evicted: bool
    pressure_evicted: bool
    old_state: object | None  # kept alive so its id is not reused within the minute
    leases: dict[tuple[int, int], Lease]  # (cores, bytes) -> the lease of that size
    cores: int  # offered cores
    memory: int  # offered bytes
    draw: float  # the rounding draw of the lease's cores (same minute and first job)
    reason: str  # why the node's lease was evicted ("" if it was not)


class Interner:
    """Small ids for equal values (job sets, leases): a tuple of ids hashes faster than the
    values. Ids are never reused, so forgetting (``clear``) only costs sharing, never mixes
    two values up."""

    __slots__ = ("ids", "next_id")

    def __init__(self) -> None:
        self.ids: dict[object, int] = {}
        self.next_id = 1  # 0: nothing (no lease)

    def id_of(self, value: object) -> int:
        found = self.ids.get(value)
        if found is None:
            found = self.ids[value] = self.next_id
            self.next_id += 1
        return found

    def clear(self) -> None:
        self.ids.clear()


@dataclass(slots=True)
class NodeTrack:
    """What the replay follows for one node between its decisions.

    ``running``: piece index -> piece; ``jobs``: id of the running pieces' signatures
    (equal job sets, equal id; see :class:`Interner`); ``first_job``: job index of the first
    running piece (seeds the lease's rounding draw), -1 on an idle node; ``state``: the
    policy's state for the node; ``lease``: the functions' lease now, if any;
    ``offer_cores``/``offer_memory``: the policy's last offer; ``since``: time of the last
    decision (interference is counted up to it); ``decided``: its minute; ``cooling``: the
    guard evicted for pressure and has not re-offered yet; ``views``: the job views of the
    last decision (valid until an event changes a job) and the lease cores they were made for.
    """

    running: dict[int, Piece] = field(default_factory=dict)
    jobs: int = 0
    first_job: int = -1
    state: object | None = None
    lease: Lease | None = None
    offer_cores: int = 0
    offer_memory: int = 0
    since: float = 0.0
    decided: int = -1
    cooling: bool = False
    views: tuple[JobView, ...] | None = None
    views_lease_cores: int = -1
    views_until: float = math.inf  # a running job's next use step (the views stale from then)
    rising: tuple[str, ...] = ()  # jobs whose use rose at the last rise (growth at its echo)
    echo_minute: int = -1  # minute of the last rise's echo

    def start_and_end(
        self,
        kinds: Ints,
        pieces: Ints,
        lo: int,
        hi: int,
        pieces_static: Callable[[int], Piece],
        job_sets: Interner,
    ) -> None:
        """Apply the starts and ends of events ``lo:hi`` (this node's, this minute)."""
        running = self.running
        for i in range(lo, hi):
            kind = kinds[i]
            if kind == START:
                running[pieces[i]] = pieces_static(pieces[i])
            elif kind == END:
                del running[pieces[i]]
        signature = tuple([p.signature for p in running.values()])
        self.jobs = job_sets.id_of(signature)
        self.first_job = signature[0][0] if signature else -1

    def job_views(
        self, now: float, lease_cores: int, cpn: int, window: float
    ) -> tuple[JobView, ...]:
        """The running jobs as the agent would report them at ``now`` next to ``lease_cores``
        function cores (the last ones again while no event changed a job and no quiet step,
        one with no event of its own, came: ``views_until``)."""
        views = self.views
        if views is not None and self.views_lease_cores == lease_cores:
            return views
        out = []
        until = math.inf
        stride = cpn + 1  # view key: seen * stride + lease_cores (see Piece.views)
        for p in self.running.values():
            step_t = p.step_t
            seen = bisect_right(step_t, now)
            view = p.views.get(seen * stride + lease_cores)
            out.append(view if view is not None else _job_view(p, seen, lease_cores, cpn, window))
            if seen < len(step_t) and step_t[seen] < until:
                until = step_t[seen]
        views = tuple(out)
        self.views = views
        self.views_lease_cores = lease_cores
        self.views_until = until
        return views


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


# glibc's mallopt parameters and their defaults (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
_MALLOPT_DEFAULTS = (
    (_M_MMAP_MAX, 65536),
    (_M_TRIM_THRESHOLD, 128 * 1024),
    (_M_TOP_PAD, 128 * 1024),
)
_heap_depth = 0


def _mallopt() -> Callable[[int, int], int] | None:
    if sys.platform != "linux":
        return None
    try:
        fn: Callable[[int, int], int] | None = getattr(ctypes.CDLL(None), "mallopt", None)
    except OSError:
        return None
    return fn


@contextlib.contextmanager
def heap_kept() -> Iterator[None]:
    """Keep freed memory in the process (glibc) while the replay runs; usable as a decorator.

    The replay's numpy passes make and drop arrays of tens of millions of elements, and glibc
    maps each large block afresh and unmaps it on free, so every pass pays the kernel again
    for zeroed pages: about a fifth of RICC-2010-2's CPU time was page faults (system time).
    Here large blocks come from the heap and freed ones stay there for the next pass (peak
    RSS grows by about a quarter, 2.6 -> 3.2 GB on RICC). Results cannot change. Defaults
    come back when the outermost use ends; elsewhere than glibc on Linux this does nothing.
    """
    global _heap_depth
    mallopt = _mallopt() if _heap_depth == 0 else None
    if mallopt is not None:
        mallopt(_M_MMAP_MAX, 0)
        mallopt(_M_TRIM_THRESHOLD, 1 << 40)
        mallopt(_M_TOP_PAD, 256 << 20)
    _heap_depth += 1
    try:
        yield
    finally:
        _heap_depth -= 1
        if mallopt is not None:
            for param, value in _MALLOPT_DEFAULTS:
                mallopt(param, value)


Record = list[tuple[int, int, int, int, bool, int, int]]
"""Per decision point: (minute, node, offered cores, offered bytes, lease evicted, lease
cores, lease bytes), when a caller asks for it (the oracle test)."""


@dataclass(frozen=True, slots=True)
class Drive:
    """What one policy did over the events.

    ``offer_t``/``offer_c``/``offer_m``: the cluster's offered cores and bytes at the end of
    each minute with a decision point (ascending minutes; it holds until the next);
    ``evict_t``: minute of each lease eviction; ``violation_hours``: job-node-hours above
    the slowdown budget; ``evicted_cores``: function cores evicted;
    ``decisions``: ``decide`` calls made. Per eviction also ``evict_reason`` (the policy's
    reason) and ``evict_jobs``: the jobs it was for (those that started there at that minute
    for ``job_start``, those whose use changed then for growth, else the node's jobs).
    """

    offer_t: list[int]
    offer_c: list[int]
    offer_m: list[int]
    evict_t: list[int]
    violation_hours: float
    evicted_cores: int
    decisions: int
    evict_reason: list[str] = field(default_factory=list)
    evict_jobs: list[tuple[str, ...]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _Groups:
    """The events cut into decision points: group ``g`` is events ``bounds[g]:bounds[g + 1]``,
    all on node ``node[g]`` in minute ``minute[g]``; ``changes[g]``: bit 1 if jobs start or
    end there, bit 2 if a job's use steps (either way the job views change), bit 4 if a use
    step rises and its echo follows a minute later; ``key[g]``: ``minute[g] * nodes +
    node[g]``, the order of decision points.

    Memoryviews of numpy arrays, not lists: on RICC-2010-2 lists of these (and of the
    events) held about 0.9 GB of int objects, fresh pages the kernel had to zero (about 2 s);
    an item read makes one short-lived int instead.
    """

    minute: Ints
    node: Ints
    bounds: Ints
    changes: Ints
    key: Ints


def _groups(events: Events, nodes: int) -> _Groups:
    t_arr, node_arr, kind = events[0], events[1], events[3]
    n_events = int(t_arr.size)
    first = np.ones(n_events, dtype=bool)
    first[1:] = (t_arr[1:] != t_arr[:-1]) | (node_arr[1:] != node_arr[:-1])
    start = np.flatnonzero(first)
    flags = (
        ((kind == START) | (kind == END)).astype(np.int64)
        | (((kind == USAGE) | (kind == RISE)).astype(np.int64) << 1)
        | ((kind == RISE).astype(np.int64) << 2)
    )
    changes = np.bitwise_or.reduceat(flags, start) if n_events else np.zeros(0, np.int64)
    minute, node = t_arr[start], node_arr[start]
    return _Groups(
        np.ascontiguousarray(minute).data,
        np.ascontiguousarray(node).data,
        np.append(start, n_events).data,
        np.ascontiguousarray(changes, dtype=np.int64).data,
        (minute * nodes + node).data,
    )


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
    """Drive one policy through the events (``record``: append each decision point to it).

    Each decision point is a node with events in a minute, or a guard follow-up. Nodes in
    the same situation in a minute (same running pieces, same lease, same policy state
    object: the pieces of one parallel job) share one ``decide`` call: it is pure.
    """
    decide = POLICIES[name]().decide
    ev_piece = np.ascontiguousarray(events[2]).data
    ev_kind = events[3].astype(np.int8).data
    n_events = len(ev_kind)
    groups = _groups(events, cluster.nodes)
    group_minute, group_node, bounds, group_changes, group_key = (
        groups.minute,
        groups.node,
        groups.bounds,
        groups.changes,
        groups.key,
    )
    n_groups = len(group_minute)
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
    nodes = [NodeTrack() for _ in range(cluster.nodes)]
    job_sets = Interner()
    lease_values = Interner()  # (cores, bytes) of leases granted this minute
    memo: dict[tuple[int, int, int], _Memo] = {}
    # equal states -> one object, kept across minutes (a node decided again later meets the
    # nodes that reached the same state before it: about 4 % fewer decide calls on RICC)
    interned: dict[object, object] = {}
    memo_minute = -1
    decisions = 0
    total_c = 0
    total_m = 0
    # the cluster's offer at the end of each minute with decisions (one entry a minute, not
    # one a change: most decision points change a node's offer)
    offer_t: list[int] = []
    offer_c: list[int] = []
    offer_m: list[int] = []
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
    # follow-ups and decision points ordered by (minute, node), as one int: minute * N + node
    n_nodes = cluster.nodes
    follow_ups: list[int] = []  # minute * n_nodes + node
    g = 0
    while g < n_groups or follow_ups:
        if follow_ups and (g >= n_groups or follow_ups[0] < group_key[g]):
            minute, n = divmod(heapq.heappop(follow_ups), n_nodes)
            node = nodes[n]
            if node.decided >= minute:
                continue
            changes = 0
            first_event = last_event = 0
        else:
            minute = group_minute[g]
            n = group_node[g]
            node = nodes[n]
            changes = group_changes[g]
            first_event, last_event = bounds[g], bounds[g + 1]
            g += 1
        node.decided = minute
        now = t0 + minute * STEP_S
        held = node.lease
        # interference time since this node's last decision
        if held is not None and held.violating:
            violation_s += (now - node.since) * held.violating
        if changes or now >= node.views_until:
            node.views = None
            if changes & 1:  # starts or ends (ticks and use steps change no job set)
                node.start_and_end(
                    ev_kind, ev_piece, first_event, last_event, pieces_static, job_sets
                )
        old_state = node.state
        if minute != memo_minute:
            if memo_minute >= 0:
                offer_t.append(memo_minute)
                offer_c.append(total_c)
                offer_m.append(total_m)
            memo.clear()
            lease_values.clear()
            if len(job_sets.ids) > 1 << 16:
                job_sets.clear()
            if len(interned) > 1 << 16:
                interned.clear()
            memo_minute = minute
        # the memo holds the old state, so its id cannot be reused within the minute
        key = (node.jobs, held.token if held is not None else 0, id(old_state))
        entry = memo.get(key)
        if entry is None:
            entry = _decide_once(
                decide, node, held, n, minute, now, cpn, node_cpus, mem_total, reserved, limits,
                window, interned, salt,
            )  # fmt: skip
            memo[key] = entry
            decisions += 1
        node.state = entry.new_state
        if entry.evicted and held is not None:
            evict_t.append(minute)
            evicted_cores += len(held.view.cpu_ids)
            evict_reason.append(entry.reason)
            evict_jobs.append(
                _evicted_for(entry.reason, node.running, ev_kind, ev_piece, first_event, last_event)
                if first_event < last_event or node.echo_minute != minute
                else node.rising
            )
            if entry.pressure_evicted and guard_on:
                node.cooling = True
        oc = entry.cores
        om = entry.memory
        if oc != node.offer_cores or om != node.offer_memory:
            total_c += oc - node.offer_cores
            total_m += om - node.offer_memory
            node.offer_cores, node.offer_memory = oc, om
        # the functions this node carries now: its share of the cluster-wide load, cores
        # rounded with a draw shared by equal nodes of a minute, so they stay equal
        cores = 0
        if oc and om and total_c > 0:
            u_c = demand_c[minute] / total_c
            cores = int(oc * (u_c if u_c < 1.0 else 1.0) + entry.draw)
        if cores > 0:
            u_m = min(1.0, demand_m[minute] / total_m) if total_m > 0 else 0.0
            lease_memory = int(om * u_m)
            lease = entry.leases.get((cores, lease_memory))
            if lease is None:
                lease_serial += 1
                lease = _new_lease(
                    str(lease_serial), entry.offer, cores, lease_memory, now, node, cpn, budget,
                    pressure_slowdown, lease_values,
                )  # fmt: skip
                entry.leases[(cores, lease_memory)] = lease
            node.lease = lease
            node.cooling = False
            # a job under pressure: the guard needs another decision after its grace period
            # (so while pressure lasts, the node is decided every grace period)
            if lease.pressured and guard_on and minute + grace_min < minutes:
                heapq.heappush(follow_ups, (minute + grace_min) * n_nodes + n)
        else:
            node.lease = None
            if node.cooling and minute + cooldown_min < minutes:
                # after a pressure eviction: ask again every cooldown period until the guard
                # offers to functions again (its cooldown may grow with repeated evictions)
                heapq.heappush(follow_ups, (minute + cooldown_min) * n_nodes + n)
        if changes & 4:
            # A rise whose echo (the same use one sample later) comes next minute. The echo
            # can only confirm growth into lent cores: on a node no lease held at the rise or
            # holds now it changes no sizing (same peak), so the echo is decided on only
            # where one did (a job keeps only its unlent cores until its growth is confirmed,
            # so the offer made at the rise may hold busy cores, given back at the echo).
            # Otherwise the next decision sees it (views_until), and no lease is there at
            # the echo to evict, so the rising jobs (what an eviction at it is for) are only
            # named where a lease is.
            node.echo_minute = minute + 1
            if held is not None or node.lease is not None:
                node.rising = tuple(
                    sorted(
                        {
                            node.running[ev_piece[i]].job_id
                            for i in range(first_event, last_event)
                            if ev_kind[i] == RISE and ev_piece[i] in node.running
                        }
                    )
                )
                if minute + 1 < minutes:
                    heapq.heappush(follow_ups, (minute + 1) * n_nodes + n)
            else:
                node.rising = ()
        node.since = now
        if record is not None:
            now_lease = node.lease
            record.append(
                (
                    minute,
                    n,
                    oc,
                    om,
                    entry.evicted,
                    len(now_lease.view.cpu_ids) if now_lease else 0,
                    now_lease.view.memory_bytes if now_lease else 0,
                )
            )
        if progress is not None and not g & 4095:
            done = bounds[g]
            progress(done - done_mark)
            done_mark = done
    if progress is not None:
        progress(n_events - done_mark)
    if memo_minute >= 0:
        offer_t.append(memo_minute)
        offer_c.append(total_c)
        offer_m.append(total_m)
    end = t0 + minutes * STEP_S  # violations still running when the trace ends
    violation_s += sum(
        (end - node.since) * node.lease.violating for node in nodes if node.lease is not None
    )
    return Drive(
        offer_t,
        offer_c,
        offer_m,
        evict_t,
        violation_s / 3600.0,
        evicted_cores,
        decisions,
        evict_reason,
        evict_jobs,
    )


def _decide_once(
    decide: Callable[[NodeView, Limits, float, object | None], Decision],
    node: NodeTrack,
    held: Lease | None,
    n: int,
    minute: int,
    now: float,
    cpn: int,
    node_cpus: frozenset[int],
    mem_total: int,
    reserved: int,
    limits: Limits,
    window: float,
    interned: dict[object, object],
    salt: int,
) -> _Memo:
    """Ask the policy about ``node`` at ``now``: the decision every node in the same
    situation this minute shares."""
    current = held.view if held is not None else None
    lease_cores = len(current.cpu_ids) if current is not None else 0
    old_state = node.state
    view = NodeView(
        str(n),
        node_cpus,
        mem_total,
        node.job_views(now, lease_cores, cpn, window),
        (current,) if current is not None else (),
        reserved,
    )
    decision = decide(view, limits, now, old_state)
    reason = ""
    pressure_evicted = False
    if current is not None:
        for e in decision.evictions:
            if e.lease_id == current.lease_id:
                reason = reason or str(e.reason)
            if e.reason is EvictionReason.PRESSURE:
                pressure_evicted = True
    evicted = bool(reason)
    # equal states become one object, so equal nodes keep meeting in the memo;
    # an unhashable state just does not share
    new_state = decision.state
    try:
        new_state = interned.setdefault(new_state, new_state)
    except TypeError:
        new_state = decision.state
    first = node.first_job
    return _Memo(
        decision.offer,
        new_state,
        evicted,
        evicted and pressure_evicted,
        old_state,
        {},
        len(decision.offer.cpu_ids),
        decision.offer.memory_bytes,
        ((minute * 1_000_003 + first * 7919 + salt) * 2_654_435_761 % 4_294_967_296)
        / 4_294_967_296,
        reason,
    )


def _new_lease(
    lease_id: str,
    offer: Offer,
    cores: int,
    memory: int,
    now: float,
    node: NodeTrack,
    cpn: int,
    budget: float,
    pressure_slowdown: float,
    lease_values: Interner,
) -> Lease:
    """The lease of ``cores`` (the highest offered ids) and ``memory`` bytes granted at
    ``now``, and what it does to the node's jobs."""
    ids = frozenset(sorted(offer.cpu_ids)[-cores:])
    share = cores / cpn
    jobs = node.running.values()
    return Lease(
        LeaseView(lease_id, ids, memory, now, math.inf),
        lease_values.id_of((ids, memory)),
        sum(1 for p in jobs if p.sensitivity * share > budget),
        any(p.sensitivity * share >= pressure_slowdown for p in jobs),
    )


def _evicted_for(
    reason: str,
    jobs_here: dict[int, Piece],
    ev_kind: Ints,
    ev_piece: Ints,
    first_event: int,
    last_event: int,
) -> tuple[str, ...]:
    """The jobs an eviction was for: those that started here now (``job_start``), those whose
    use changed now (growth), else every job on the node."""
    wanted = (START,) if reason == EvictionReason.JOB_START else (USAGE, RISE)
    if reason in (
        EvictionReason.JOB_START,
        EvictionReason.CPU_GROWTH,
        EvictionReason.MEMORY_GROWTH,
    ):
        ids = {
            jobs_here[ev_piece[i]].job_id
            for i in range(first_event, last_event)
            if ev_kind[i] in wanted and ev_piece[i] in jobs_here
        }
        if ids:
            return tuple(sorted(ids))
    return tuple(sorted({p.job_id for p in jobs_here.values()}))


def _job_view(p: Piece, seen: int, lease_cores: int, cpn: int, window: float) -> JobView:
    """The job as the agent would report it after its first ``seen`` usage steps, next to
    ``lease_cores`` function cores (built once per piece and situation: the caller looks in
    ``p.views`` first).

    Usage is piecewise constant, so the history holds one sample per step; a denser one would
    say the same. Samples older than the window before the latest step are left out (a
    policy never looks further back; the peak they held is ``memory_peak_bytes``). The
    latest sample carries the pressure the node's functions cause.
    """
    key = seen * (cpn + 1) + lease_cores
    seen = max(seen, 1)
    samples = p.samples
    if not samples:
        samples.extend(map(UsageSample, p.step_t, p.step_cores, p.step_memory))
        p.peaks.extend(accumulate(p.step_memory, max))
    times = p.step_t
    first = bisect_right(times, times[seen - 1] - window, 0, seen - 1)
    if first:
        first -= 1  # the sample in force at the window's start
    latest = samples[seen - 1]
    if lease_cores:
        pressure = cpu_pressure(p.sensitivity * lease_cores / cpn)
        latest = UsageSample(latest.t, latest.cores_used, latest.memory_used_bytes, pressure)
    history = (*samples[first : seen - 1], latest)
    peak = p.peaks[seen - 1]
    view = JobView(p.job_id, p.cpu_ids, p.memory_allocated, peak, history, True, p.start_t)
    p.views[key] = view
    return view


def build_events(
    placement: Placement, steps: PieceSteps, history_minutes: int, nodes: int
) -> Events:
    """Events (minute, node, piece, kind) sorted by minute, then node.

    Per piece: its start, its end, a tick ``history_minutes`` after its start (unless a usage
    step comes first) and its later usage steps that can change a decision then. Every node
    also gets a tick at minute 0, so idle nodes offer from the start.

    An echo step (a rise seen again one sample later) is a sample of the job's history but
    no event: the ``RISE`` event before it asks for a decision at it only where a lease held
    the node at the rise or after it (:func:`drive_policy`); elsewhere the next decision on
    the node sees it (``NodeTrack.views_until``).
    """
    n = placement.job.size
    idx = np.arange(n, dtype=np.int64)
    start, end = placement.start, placement.end
    firsts = steps.offsets[:-1][steps.offsets[:-1] < steps.minute.size]
    later = ~steps.echo
    later[firsts] = False
    rises = np.zeros(steps.minute.size, dtype=bool)
    rises[:-1] = steps.echo[1:]
    step_piece = np.repeat(idx, np.diff(steps.offsets))
    # the first later step that is an event (the tick is left out when one comes first)
    second = end.copy()
    at = np.flatnonzero(later)
    first_of_piece = np.ones(at.size, dtype=bool)
    first_of_piece[1:] = step_piece[at[1:]] != step_piece[at[:-1]]
    second[step_piece[at[first_of_piece]]] = steps.minute[at[first_of_piece]]
    tick = start + history_minutes
    has_tick = (tick < end) & (tick < second)
    t = np.concatenate([end, start, tick[has_tick], steps.minute[later]])
    piece = np.concatenate([idx, idx, idx[has_tick], step_piece[later]])
    kind = np.concatenate(
        [
            np.full(n, END),
            np.full(n, START),
            np.full(int(has_tick.sum()), TICK),
            np.where(rises[later], RISE, USAGE),
        ]
    ).astype(np.int64)
    node = np.concatenate([placement.node[piece], np.arange(nodes, dtype=np.int64)])
    t = np.concatenate([t, np.zeros(nodes, dtype=np.int64)])
    piece = np.concatenate([piece, np.full(nodes, -1, dtype=np.int64)])
    kind = np.concatenate([kind, np.full(nodes, TICK, dtype=np.int64)])
    order = np.argsort(t * (int(node.max()) + 1 if node.size else 1) + node, kind="stable")
    return t[order], node[order], piece[order], kind[order]
