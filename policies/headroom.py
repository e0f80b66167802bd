"""``headroom``: unallocated resources plus the idle cores and unused memory inside running jobs.

Follows Borg's reclamation: a job's reservation is its observed usage plus a safety margin,
recomputed every decision, and the rest of its allocation is lent out. Margins:

- memory: a job keeps ``peak + margin`` where ``peak`` is the largest memory it was ever
  seen using (``JobView.memory_peak_bytes`` or any history sample) and
  ``margin = max(limits.memory_margin_bytes, limits.memory_margin_ratio * allocation)``
  (defaults: 256 MiB or 10 %); only ``allocation - peak - margin`` is offered.
- cores: a job keeps ``ceil(max cores_used over limits.history_window_s + limits.core_margin)``
  cores (default margin 0.25 core); the others are offered, highest core ids first.
- a job younger than ``limits.min_history_s`` (default 30 s), with no history, or that said
  ``--colocate=deny`` offers nothing of its own.

The sizing engine here (:func:`harvest`) is shared with ``predictive``; only the per-job
sizing differs.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable
from operator import attrgetter

from policies.eviction import CoreReasons, evict_leases
from policies.limits import Limits
from policies.model import Decision, EvictionReason, JobView, NodeView, Offer, UsageSample

_TIME = attrgetter("t")
_CORES_USED = attrgetter("cores_used")
_MEMORY_USED = attrgetter("memory_used_bytes")

JobSizer = Callable[[JobView, tuple[UsageSample, ...], Limits, float], tuple[float, int]]
"""Per-job sizing: (job, samples in the window, limits, now) -> (cores demanded, memory
demanded in bytes), margins not included. The engine never sizes below the latest sample's
cores nor below the observed memory peak, whatever a sizer says."""


def memory_margin(job: JobView, limits: Limits) -> int:
    """Bytes a job keeps above its peak: the larger of the fixed and the relative margin."""
    return max(
        limits.memory_margin_bytes, int(limits.memory_margin_ratio * job.memory_allocated_bytes)
    )


def observed_peak(job: JobView) -> int:
    """The largest memory the job was seen using, bytes (reported peak or any sample)."""
    if not job.history:
        return job.memory_peak_bytes
    most: int = max(map(_MEMORY_USED, job.history))
    return max(job.memory_peak_bytes, most)


def harvest(node: NodeView, limits: Limits, now: float, sizer: JobSizer) -> Decision:
    """Offer unallocated resources plus what each lending job does not need, per ``sizer``.

    Memory: ``total - reserved - sum of what jobs keep``, where a lending job keeps
    ``min(allocation, max(peak, demand) + margin)`` and any other job its allocation; a job
    seen above its allocation keeps ``peak + margin`` (it eats node memory).
    """
    allocated: set[int] = set()
    spare: set[int] = set()
    kept_cpus: set[int] = set()
    memory = node.memory_total_bytes - node.memory_reserved_bytes
    reasons: list[tuple[frozenset[int], EvictionReason]] = []
    job_started = False
    # Read once: this loop runs about a million times in a replay.
    core_margin = limits.core_margin
    min_history = limits.min_history_s
    since = now - limits.history_window_s
    margin_bytes = limits.memory_margin_bytes
    margin_ratio = limits.memory_margin_ratio
    # eviction reasons matter only when there are leases to evict (most decisions have none)
    leases = bool(node.leases)
    for job in node.jobs:
        cpus = job.cpu_ids
        allocated.update(cpus)
        alloc = job.memory_allocated_bytes
        history = job.history
        # observed_peak(job) and memory_margin(job, limits), inlined (same max() ties)
        peak = job.memory_peak_bytes
        for sample in history:  # a short tuple: a loop beats max(map(...))
            if sample.memory_used_bytes > peak:
                peak = sample.memory_used_bytes
        margin = int(margin_ratio * alloc)
        if not margin > margin_bytes:
            margin = margin_bytes
        # Lends only with history, old enough, and allowed (else its leases go: JOB_START/DENIED).
        if job.colocate and history and now - job.start_time >= min_history:
            # the window; the latest sample alone when the monitor fell silent for longer
            start = bisect_left(history, since, key=_TIME)
            recent = history[start:] if start < len(history) else history[-1:]
            cores_demand, memory_demand = sizer(job, recent, limits, now)
            latest = recent[-1].cores_used
            need = math.ceil((cores_demand if cores_demand > latest else latest) + core_margin)
            lend = len(cpus) - need
            if lend > 0:
                ordered = sorted(cpus)
                spare.update(ordered[need:] if need > 0 else ordered)
                kept_cpus.update(ordered[:need] if need > 0 else ())
            else:
                kept_cpus.update(cpus)
            keep = (peak if peak > memory_demand else memory_demand) + margin
            memory -= keep if (keep < alloc or peak > alloc) else alloc
            if leases:
                reasons.append((cpus, EvictionReason.CPU_GROWTH))
        else:
            kept_cpus.update(cpus)
            memory -= alloc if peak <= alloc else peak + margin
            if job.colocate:
                job_started = True
                if leases:
                    reasons.append((cpus, EvictionReason.JOB_START))
            elif leases:
                reasons.append((cpus, EvictionReason.DENIED))
    cpu_ids = node.cpu_ids - allocated
    if spare:
        cpu_ids = cpu_ids | ((spare - kept_cpus) & node.cpu_ids)
    offer = Offer(frozenset(cpu_ids), memory if memory > 0 else 0)
    if not leases:
        return Decision(offer)
    memory_reason = EvictionReason.JOB_START if job_started else EvictionReason.MEMORY_GROWTH
    core_reasons: CoreReasons = tuple(reasons)
    return Decision(offer, evict_leases(node, offer, now, limits, core_reasons, memory_reason))


def _size_by_recent_max(
    job: JobView, recent: tuple[UsageSample, ...], limits: Limits, now: float
) -> tuple[float, int]:
    cores: float = max(map(_CORES_USED, recent))
    return cores, 0  # memory: the engine keeps peak + margin


class HeadroomPolicy:
    """Borg-style reclamation: lend what a job has not used recently, keeping margins.

    Cores: ``allocated - ceil(max cores_used over the window + core_margin)``, highest ids.
    Memory: ``allocation - observed peak - max(memory_margin_bytes, memory_margin_ratio * allocation)``.
    Plus everything Slurm has not allocated, as ``unallocated`` offers.
    """

    name = "headroom"

    def decide(
        self, node: NodeView, limits: Limits, now: float, state: object | None = None
    ) -> Decision:
        return harvest(node, limits, now, _size_by_recent_max)
