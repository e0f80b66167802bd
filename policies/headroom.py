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


def recent_samples(job: JobView, limits: Limits, now: float) -> tuple[UsageSample, ...]:
    """Samples of the last ``history_window_s`` seconds; the latest one alone if all are older.

    A monitor that fell silent leaves the job sized by its last known usage.
    """
    history = job.history
    i = bisect_left(history, now - limits.history_window_s, key=_TIME)
    if i == len(history):
        return history[-1:]
    return history[i:] if i else history


def withheld_reason(job: JobView, limits: Limits, now: float) -> EvictionReason | None:
    """Why nothing of ``job`` may be offered (None: it may lend its idle resources)."""
    if not job.colocate:
        return EvictionReason.DENIED
    if not job.history or now - job.start_time < limits.min_history_s:
        return EvictionReason.JOB_START
    return None


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
    for job in node.jobs:
        cpus = job.cpu_ids
        allocated.update(cpus)
        alloc = job.memory_allocated_bytes
        peak = observed_peak(job)
        margin = memory_margin(job, limits)
        reason = withheld_reason(job, limits, now)
        if reason is None:
            recent = recent_samples(job, limits, now)
            cores_demand, memory_demand = sizer(job, recent, limits, now)
            cores_demand = max(cores_demand, recent[-1].cores_used)
            need = max(0, math.ceil(cores_demand + limits.core_margin))
            ordered = sorted(cpus)
            lend = len(ordered) - need
            if lend > 0:
                spare.update(ordered[need:])
                kept_cpus.update(ordered[:need])
            else:
                kept_cpus.update(cpus)
            keep = max(peak, memory_demand) + margin
            memory -= keep if (keep < alloc or peak > alloc) else alloc
            reason = EvictionReason.CPU_GROWTH
        else:
            kept_cpus.update(cpus)
            memory -= alloc if peak <= alloc else peak + margin
            job_started = job_started or reason is EvictionReason.JOB_START
        reasons.append((cpus, reason))
    cpu_ids = node.cpu_ids - allocated
    if spare:
        cpu_ids = cpu_ids | ((spare - kept_cpus) & node.cpu_ids)
    offer = Offer(frozenset(cpu_ids), max(0, memory))
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
