"""Putting recorded jobs on a modelled cluster: first fit of cores and memory at recorded starts.

Times are snapped to the replay's one-minute grid (rounded to the nearest minute); a job that
rounds to no time (shorter than about a minute) holds its allocation for one grid minute: it
is placed and accounted, and counted under its own note in ``skipped`` (a "(placed)" entry). A job goes on
``nodes`` nodes when the trace says so, else on as few nodes as its cores need, each piece
on the first node with enough free cores and memory, taking the lowest free core ids.
A job that finds no room at its recorded start (the recorded machine packed differently) is
counted and skipped; one whose memory does not fit gets what is free (also counted).
"""

from __future__ import annotations

import heapq
import logging
import math
import operator
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from traces.jobs import JobTrace

log = logging.getLogger(__name__)
STEP_S = 60.0


@dataclass(frozen=True, slots=True)
class Cluster:
    """The modelled machine: ``nodes`` identical nodes. Bytes and cores."""

    nodes: int
    cores_per_node: int
    memory_per_node_bytes: int
    memory_reserved_bytes: int = 0  # per node, never allocated nor offered

    def __post_init__(self) -> None:
        # whole numbers as Python ints (12e9 bytes or a numpy integer are fine), so every
        # replay loop, compiled or not, gets what its types say
        for name in ("nodes", "cores_per_node", "memory_per_node_bytes", "memory_reserved_bytes"):
            value = getattr(self, name)
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            try:
                whole = operator.index(value)
            except TypeError:
                raise ValueError(f"Cluster.{name} must be a whole number, got {value!r}") from None
            object.__setattr__(self, name, whole)

    @property
    def cores(self) -> int:
        return self.nodes * self.cores_per_node

    @property
    def memory_bytes(self) -> int:
        return self.nodes * self.memory_per_node_bytes


@dataclass(frozen=True, slots=True)
class Placement:
    """Job pieces (one per job and node), as arrays indexed by piece.

    ``start``/``end`` are minutes since ``t0`` (epoch seconds of minute 0); ``cpu_mask`` is a
    bitmask of the piece's core ids on its node; ``memory_bytes`` is allocated memory.
    """

    job: npt.NDArray[np.int64]
    node: npt.NDArray[np.int64]
    cores: npt.NDArray[np.int64]
    cpu_mask: list[int]
    memory_bytes: npt.NDArray[np.float64]
    start: npt.NDArray[np.int64]
    end: npt.NDArray[np.int64]
    t0: float
    minutes: int
    jobs_placed: int
    skipped: dict[str, int] = field(default_factory=dict)


def job_memory(trace: JobTrace, cluster: Cluster) -> npt.NDArray[np.float64]:
    """Memory allocated per job: the trace's, else a core-proportional share of node memory."""
    usable = cluster.memory_per_node_bytes - cluster.memory_reserved_bytes
    share = trace.cores / cluster.cores_per_node * usable
    recorded = trace.memory_alloc_bytes
    return np.where(np.isfinite(recorded) & (recorded > 0), recorded, share)


def _first_fit(by_free: list[list[int]], free_c: list[int], need: int) -> int:
    """Lowest node id with at least ``need`` free cores, or -1 (cleans stale heap entries)."""
    best = -1
    for c in range(need, len(by_free)):
        heap = by_free[c]
        while heap and free_c[heap[0]] != c:
            heapq.heappop(heap)
        if heap and (best < 0 or heap[0] < best):
            best = heap[0]
    return best


def place(trace: JobTrace, cluster: Cluster, memory: npt.NDArray[np.float64]) -> Placement:
    """First-fit placement of every job at its recorded start (see the module docstring)."""
    cpn = cluster.cores_per_node
    usable = cluster.memory_per_node_bytes - cluster.memory_reserved_bytes
    t0 = math.floor(float(trace.start_s.min()) / STEP_S) * STEP_S if len(trace) else 0.0
    start_q = np.rint((trace.start_s - t0) / STEP_S).astype(np.int64)
    end_q = np.rint((trace.end_s - t0) / STEP_S).astype(np.int64)
    # A job that rounds to no time at all still ran: it holds its cores and memory for one
    # grid minute (placed, and counted in the report), never dropped for being short.
    short = end_q <= start_q
    n_short = int(np.count_nonzero(short))
    end_q = np.where(short, start_q + 1, end_q)
    skipped = {
        "larger than the cluster": 0,
        "no room at recorded start": 0,
    }
    clipped = 0
    # Scalars live in Python lists (fast item access); heaps per free-core count give the
    # first fit of one-node pieces; the numpy copies serve the rarer multi-node scans.
    free_c = [cpn] * cluster.nodes
    free_m = [float(usable)] * cluster.nodes
    # numpy copies for the multi-node scans, rebuilt from the lists only when a scan needs
    # them after a change (element-wise numpy writes on every start and end cost more)
    free_c_np = np.full(cluster.nodes, cpn, dtype=np.int64)
    free_m_np = np.full(cluster.nodes, float(usable))
    stale = False
    # by_free[c]: min-heap of nodes with c free cores (lazy: an entry counts only while the
    # node still has exactly c free); by_free[cpn] holds the idle nodes
    by_free: list[list[int]] = [[] for _ in range(cpn + 1)]
    by_free[cpn] = list(range(cluster.nodes))
    idle = by_free[cpn]
    full_mask = (1 << cpn) - 1
    masks = [0] * cluster.nodes
    out_job: list[int] = []
    out_node: list[int] = []
    out_cores: list[int] = []
    out_mask: list[int] = []
    out_mem: list[float] = []
    # end minute << 32 | a job's first piece: ordered as (end minute, piece); a job's pieces
    # are consecutive and end together, so one entry frees them all (pieces_of: how many)
    ends: list[int] = []
    pieces_of: dict[int, int] = {}
    order = np.argsort(start_q, kind="stable")
    cores_all = trace.cores.tolist()
    nodes_all = trace.nodes.tolist()
    start_l = start_q.tolist()
    end_l = end_q.tolist()
    mem_l = memory.tolist()
    heappush, heappop = heapq.heappush, heapq.heappop
    for j in order.tolist():
        s, e = start_l[j], end_l[j]
        while ends and ends[0] >> 32 <= s:
            first = heappop(ends) & 0xFFFFFFFF
            for p in range(first, first + pieces_of.pop(first)):
                n = out_node[p]
                fc = free_c[n] + out_cores[p]
                free_c[n] = fc
                free_m[n] = free_m[n] + out_mem[p]
                masks[n] &= ~out_mask[p]
                heappush(by_free[fc], n)
            stale = True
        c = cores_all[j]
        n_nodes = nodes_all[j] if nodes_all[j] > 0 else -(-c // cpn)
        if c > cluster.cores or n_nodes > cluster.nodes or -(-c // n_nodes) > cpn:
            skipped["larger than the cluster"] += 1
            continue
        base, extra = divmod(c, n_nodes)
        sizes = [base + 1] * extra + [base] * (n_nodes - extra)
        mem_per_core = min(mem_l[j] / c, usable / cpn)
        need_c, need_m = sizes[0], mem_per_core * sizes[0]
        chosen: list[int] = []
        if need_c == cpn:
            while idle and len(chosen) < n_nodes:
                n = heappop(idle)
                if free_c[n] == cpn and (not chosen or chosen[-1] != n):
                    chosen.append(n)
            if len(chosen) < n_nodes:
                for n in chosen:
                    heappush(idle, n)
                skipped["no room at recorded start"] += 1
                continue
        elif (
            n_nodes == 1 and (k := _first_fit(by_free, free_c, need_c)) >= 0 and free_m[k] >= need_m
        ):
            chosen = [k]
        else:
            if stale:
                free_c_np = np.array(free_c, dtype=np.int64)
                free_m_np = np.array(free_m, dtype=np.float64)
                stale = False
            fits = (free_c_np >= need_c) & (free_m_np >= need_m)
            chosen = np.flatnonzero(fits)[:n_nodes].tolist()
            if len(chosen) < n_nodes:
                chosen = np.flatnonzero(free_c_np >= need_c)[:n_nodes].tolist()
                if len(chosen) < n_nodes:
                    skipped["no room at recorded start"] += 1
                    continue
                clipped += 1
        first = len(out_job)
        for n, k in zip(chosen, sizes, strict=True):
            mask = masks[n]
            if k == cpn:
                bits = full_mask
            else:
                bits = 0
                got = 0
                b = 0
                while got < k:
                    if not (mask >> b) & 1:
                        bits |= 1 << b
                        got += 1
                    b += 1
            fm = free_m[n]
            mem = mem_per_core * k
            if mem > fm:
                mem = fm
            masks[n] = mask | bits
            fc = free_c[n] - k
            free_c[n] = fc
            if fc:
                heappush(by_free[fc], n)
            free_m[n] = fm - mem
            out_job.append(j)
            out_node.append(n)
            out_cores.append(k)
            out_mask.append(bits)
            out_mem.append(mem)
        stale = True
        heappush(ends, e << 32 | first)
        pieces_of[first] = len(chosen)
    if clipped:
        skipped["memory cut to what was free (placed)"] = clipped
    if n_short:
        skipped["shorter than a minute, held for one grid minute (placed)"] = n_short
    job = np.array(out_job, dtype=np.int64)
    log.info("placed %d job pieces; %s", job.size, skipped)
    return Placement(
        job=job,
        node=np.array(out_node, dtype=np.int64),
        cores=np.array(out_cores, dtype=np.int64),
        cpu_mask=out_mask,
        memory_bytes=np.array(out_mem, dtype=np.float64),
        start=start_q[job] if job.size else np.zeros(0, dtype=np.int64),
        end=end_q[job] if job.size else np.zeros(0, dtype=np.int64),
        t0=t0,
        minutes=int(end_q.max()) + 1 if len(trace) else 1,
        jobs_placed=int(np.count_nonzero(np.bincount(job))) if job.size else 0,
        skipped={k: v for k, v in skipped.items() if v},
    )
