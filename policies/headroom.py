"""``headroom``: unallocated resources plus the idle cores and unused memory inside running jobs.

Follows Borg's reclamation: a job's reservation is its observed usage plus a safety margin,
recomputed every decision, and the rest of its allocation is lent out. Margins:

- memory: a job keeps ``peak + margin`` where ``peak`` is the largest memory it was ever
  seen using (``JobView.memory_peak_bytes`` or any history sample) and
  ``margin = max(limits.memory_margin_bytes, limits.memory_margin_ratio * allocation)``
  (defaults: 256 MiB or 10 %); only ``allocation - peak - margin`` is offered.
- cores (:func:`cores_to_keep`): a job keeps the whole cores it *wants*, at least one:
  ``ceil(peak cores_wanted over limits.history_window_s + core_margin - core_noise)``, where
  ``cores_wanted`` is CPU time used plus time its threads waited for a CPU (on a CPU shared
  with other work a job gets less than it wants) and demand within ``core_noise`` (0.15) of
  whole cores is noise. So a job that keeps exactly k of its n cores busy lends n - k (the
  old ``ceil(use + 0.25)`` lent one core fewer: nothing at all when one core was idle). The
  peak leaves out one-reading spikes (:func:`sustained_peak`). Where the monitor has per-core
  busy shares (cgroup v1 ``cpuacct.usage_percpu``), a job keeps no more cores than it kept
  busier than ``idle_core_busy`` (0.2), and lends its idle cores first (:func:`lend_order`),
  not blindly the highest ids; threads that float over all cores lend what the total allows.
- growth is a trend, not a sample (:func:`growth_confirmed`): a core held by a lease is
  taken back (``CPU_GROWTH``) only when what the job wants stayed above the cores it kept
  plus ``cpu_growth_margin`` (0.3) for ``cpu_growth_samples`` (2) samples in a row, or once
  while its CPU pressure is over ``cpu_pressure_limit``. A noisy steady job keeps its lease;
  a job that turns a lent core on gets it back within two samples, and the agent takes the
  second one a quarter interval after the first when :func:`growth_suspected` says so.
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
_NONE: frozenset[int] = frozenset()

JobSizer = Callable[[JobView, tuple[UsageSample, ...], Limits, float], tuple[float, int]]
"""Per-job sizing: (job, samples in the window, limits, now) -> (cores demanded, memory
demanded in bytes), margins not included. The engine never sizes below the latest sample's
cores nor below the observed memory peak, whatever a sizer says."""


def memory_margin(job: JobView, limits: Limits) -> int:
    """Bytes a job keeps above its peak: the larger of the fixed and the relative margin."""
    relative = int(limits.memory_margin_ratio * job.memory_allocated_bytes)
    fixed = limits.memory_margin_bytes
    return relative if relative > fixed else fixed


def observed_peak(job: JobView) -> int:
    """The largest memory the job was seen using, bytes (reported peak or any sample)."""
    peak = job.memory_peak_bytes
    for sample in job.history:  # a short tuple: a plain loop beats max(map(...))
        if sample.memory_used_bytes > peak:
            peak = sample.memory_used_bytes
    return peak


def cores_for_total(used: float, limits: Limits) -> int:
    """Whole cores a job using ``used`` cores needs: ``ceil(used + core_margin - core_noise)``,
    at least one (a running job always keeps a core for its threads to wake up on)."""
    need = math.ceil(used + limits.core_margin - limits.core_noise)
    return need if need > 1 else 1


def sustained_peak(recent: tuple[UsageSample, ...], limits: Limits) -> float:
    """The most cores the job wanted (used + waiting) over the samples, where demand seen in
    fewer than ``cpu_growth_samples`` consecutive readings less than ``cpu_spike_s`` apart
    is a spike and counts at the level around it (a shell forking, the job's start-up: the
    growth rule ignores them too). Sparse samples (the replay's) each count in full."""
    n = limits.cpu_growth_samples
    if len(recent) == 1:  # the common case (the replay's sparse samples): no pass needed
        return recent[0].cores_used + recent[0].cores_waiting
    if n <= 1 or len(recent) < n:
        return max(sample.cores_used + sample.cores_waiting for sample in recent)
    spike_s = limits.cpu_spike_s
    if n == 2:
        return _sustained_peak_of_pairs(recent, spike_s)
    wanted = [sample.cores_used + sample.cores_waiting for sample in recent]
    peak = 0.0
    covered = bytearray(len(wanted))  # 1: inside a run of n close readings
    for j in range(len(wanted) - n + 1):
        if recent[j + n - 1].t - recent[j].t <= spike_s:
            level = min(wanted[j : j + n])  # the level held over the whole run
            if level > peak:
                peak = level
            covered[j : j + n] = b"\x01" * n
    for i, value in enumerate(wanted):
        if not covered[i] and value > peak:
            peak = value  # a reading with no close neighbours stands for itself
    return peak


def _sustained_peak_of_pairs(recent: tuple[UsageSample, ...], spike_s: float) -> float:
    """:func:`sustained_peak` for runs of two readings (the default), in one pass."""
    first = recent[0]
    prev_t, prev_w, prev_covered = first.t, first.cores_used + first.cores_waiting, False
    peak = 0.0
    for sample in recent[1:]:
        w = sample.cores_used + sample.cores_waiting
        if sample.t - prev_t <= spike_s:
            level = w if w < prev_w else prev_w
            if level > peak:
                peak = level
            covered = True
        else:
            if not prev_covered and prev_w > peak:
                peak = prev_w
            covered = False
        prev_t, prev_w, prev_covered = sample.t, w, covered
    if not prev_covered and prev_w > peak:
        peak = prev_w
    return peak


def cpu_peaks(recent: tuple[UsageSample, ...]) -> dict[int, float] | None:
    """Each CPU's highest busy share over the samples, or None without per-core accounting."""
    if not recent[-1].cpu_busy:
        return None
    peaks: dict[int, float] = {}
    for sample in recent:
        for cpu, busy in sample.cpu_busy:
            if busy > peaks.get(cpu, -1.0):
                peaks[cpu] = busy
    return peaks


def growth_confirmed(recent: tuple[UsageSample, ...], kept: int, limits: Limits) -> bool:
    """True when a job that kept ``kept`` cores really grew past them: what it wants (used +
    waiting for a CPU) exceeded ``kept + cpu_growth_margin`` in each of the last
    ``cpu_growth_samples`` samples, or in the latest one while its CPU pressure is over
    ``cpu_pressure_limit`` (the kernel confirms it waits)."""
    over = kept + limits.cpu_growth_margin
    latest = recent[-1]
    if latest.cores_used + latest.cores_waiting <= over:
        return False
    if latest.cpu_pressure is not None and latest.cpu_pressure > limits.cpu_pressure_limit:
        return True
    n = limits.cpu_growth_samples
    return len(recent) >= n and all(s.cores_used + s.cores_waiting > over for s in recent[-n:])


def growth_suspected(node: NodeView, limits: Limits, now: float) -> bool:
    """True when a job on ``node`` whose cores leases hold wants, in its latest sample, more
    than the cores it has left plus ``cpu_growth_margin`` while :func:`growth_confirmed` does
    not yet say so: the next sample may confirm it, and the agent takes it sooner (the rule
    itself is unchanged: it still needs ``cpu_growth_samples`` samples in a row). Only jobs
    :func:`harvest` lends from count (history, older than ``min_history_s``, allowed)."""
    if not node.leases:
        return False
    leased = frozenset().union(*(lease.cpu_ids for lease in node.leases))
    over_margin = limits.cpu_growth_margin
    since = now - limits.history_window_s
    for job in node.jobs:
        held = job.cpu_ids & leased
        history = job.history
        if (
            not held
            or not history
            or not job.colocate
            or now - job.start_time < limits.min_history_s
        ):
            continue
        left = len(job.cpu_ids) - len(held)
        latest = history[-1]
        if latest.cores_used + latest.cores_waiting <= left + over_margin:
            continue
        start = bisect_left(history, since, key=_TIME)
        recent = history[start:] if start < len(history) else history[-1:]
        if not growth_confirmed(recent, left, limits):
            return True
    return False


def cores_to_keep(
    recent: tuple[UsageSample, ...],
    used: float,
    cpus: frozenset[int],
    held: frozenset[int],
    limits: Limits,
) -> int:
    """How many of its ``cpus`` a lending job keeps, given its sized use ``used`` (cores),
    its samples in the window and the cores of it that leases hold now (``held``).

    The total's whole cores (:func:`cores_for_total`), no more than the cores it kept busy
    where per-core shares are known; and while leases hold some of its cores, no more than
    it has left unless its growth is confirmed (:func:`growth_confirmed`).
    """
    keep = cores_for_total(used, limits)
    # per-core shares show what the job gets; while it waits for CPU they understate it
    peaks = cpu_peaks(recent) if recent[-1].cores_waiting <= limits.cpu_growth_margin else None
    if peaks is not None:
        busy = sum(1 for cpu in cpus if peaks.get(cpu, 0.0) > limits.idle_core_busy)
        if busy < keep:
            keep = busy if busy > 1 else 1
    if held:
        left = len(cpus) - len(held)
        if keep > left and not growth_confirmed(recent, left, limits):
            keep = left
    return keep


def lend_order(
    cpus: frozenset[int], recent: tuple[UsageSample, ...], held: frozenset[int]
) -> list[int]:
    """A job's CPUs in the order they are lent: those leases hold now first (a lease keeps
    its cores while it lasts), then the least busy over the window, then the highest ids."""
    peaks = cpu_peaks(recent)
    if peaks is None and not held:
        return sorted(cpus, reverse=True)
    busy = peaks or {}
    return sorted(cpus, key=lambda cpu: (cpu not in held, busy.get(cpu, 0.0), -cpu))


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
    since = now - limits.history_window_s
    # eviction reasons matter only when there are leases to evict (most decisions have none)
    leases = bool(node.leases)
    leased_cpus = frozenset().union(*(lease.cpu_ids for lease in node.leases)) if leases else _NONE
    for job in node.jobs:
        cpus = job.cpu_ids
        allocated.update(cpus)
        alloc = job.memory_allocated_bytes
        history = job.history
        peak = observed_peak(job)
        margin = memory_margin(job, limits)
        # Lends only with history, old enough, and allowed (else its leases go: JOB_START/DENIED).
        if job.colocate and history and now - job.start_time >= limits.min_history_s:
            # the window; the latest sample alone when the monitor fell silent for longer
            recent: tuple[UsageSample, ...]
            if len(history) == 1:
                recent = history  # what the window below gives one sample, without a search
            else:
                start = bisect_left(history, since, key=_TIME)
                recent = history[start:] if start < len(history) else history[-1:]
            cores_demand, memory_demand = sizer(job, recent, limits, now)
            held = cpus & leased_cpus if leases else _NONE
            if len(cpus) == 1 and not held:
                # a job keeps at least one core (cores_to_keep): a serial job lends none
                keep_n = 1
            else:
                latest = recent[-1].cores_used + recent[-1].cores_waiting
                keep_n = cores_to_keep(
                    recent, cores_demand if cores_demand > latest else latest, cpus, held, limits
                )
            if keep_n < len(cpus):
                order = lend_order(cpus, recent, held)
                lent = len(cpus) - keep_n
                spare.update(order[:lent])
                kept_cpus.update(order[lent:])
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
    return sustained_peak(recent, limits), 0  # memory: the engine keeps peak + margin


class HeadroomPolicy:
    """Borg-style reclamation: lend what a job has not used recently, keeping margins.

    Cores: a job keeps ``ceil(max cores_used over the window + core_margin - core_noise)``
    (at least one, no more than its busy cores), lends the rest, idle ones first.
    Memory: ``allocation - observed peak - max(memory_margin_bytes, memory_margin_ratio * allocation)``.
    Plus everything Slurm has not allocated, as ``unallocated`` offers.
    """

    name = "headroom"

    def decide(
        self, node: NodeView, limits: Limits, now: float, state: object | None = None
    ) -> Decision:
        return harvest(node, limits, now, _size_by_recent_max)
