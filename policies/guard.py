"""The interference guard: wraps any policy and takes leases back when a job suffers.

Follows kubelet's node-pressure eviction loop, as a pipeline of pure steps with ``now``
passed in (thresholds met -> held by hysteresis -> grace period -> rank -> evict one),
with Heracles' rule of not growing best-effort work while the primary is under pressure:

1. **Thresholds with hysteresis**: a job is *under pressure* once its latest PSI
   (``cpu_pressure`` or ``memory_pressure``, some avg10 %) exceeds ``limits.cpu_pressure_limit``
   or ``limits.memory_pressure_limit`` (defaults 20 % and 5 %), and stays so until both
   fall below half their limit (Heracles' 85 %/80 % band, wider because PSI is noisy).
2. **Grace period**: only pressure that lasted ``limits.pressure_grace_s`` (5 s) evicts.
3. **One eviction per cycle**: the most pressured job (pressure / limit) loses one lease:
   the one holding most of its cores (memory pressure: most memory), newest on ties. Its
   grace timer restarts, so the next eviction for it waits another grace period.
4. **Re-offer cooldown**: after a pressure eviction nothing new of that job is offered for
   ``limits.reoffer_cooldown_s`` (60 s) and until its pressure is below half the limits (leases
   still on it are kept, only not replaced). Each further pressure eviction of the same job
   multiplies its cooldown by ``limits.reoffer_backoff`` (default 2, at most
   ``limits.reoffer_cooldown_max_s``): a job that suffers from every co-location, and whose
   pressure vanishes as soon as the functions go, is left alone for longer and longer.
5. **No growth under pressure**: while any job is under pressure the offer never grows.
6. **Minimum reclaim**: the offer grows back only in steps of ``limits.min_reclaim_bytes``
   (64 MiB) and ``limits.min_reclaim_cores`` (1), so it does not flap around a boundary; it shrinks at once.
7. **Share cap**: on a node where batch jobs run, functions never hold more than
   ``limits.max_function_share`` of the node's cores and memory (default 50 %); leases beyond
   it are evicted (``SHARE_CAP``), newest first. An idle node is not capped.

The guard only ever takes away from the wrapped policy's offer, never adds to it.
Pressure evictions get ``limits.eviction_grace_s``; so do share-cap evictions.

The guard's memory is an immutable :class:`GuardState` carried in ``Decision.state``; the
caller passes it back on the next call for the same node. With ``limits.guard`` False the
inner policy decides alone.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace

from policies.eviction import eviction_grace, leases_oldest_first
from policies.limits import Limits
from policies.model import (
    Decision,
    Eviction,
    EvictionReason,
    JobView,
    LeaseView,
    NodeView,
    Offer,
    Policy,
    value,
)

logger = logging.getLogger(__name__)

PRESSURE_CLEAR_RATIO = 0.5  # pressure must fall below half its limit to count as gone


@value
class GuardState:
    """What the guard remembers between decisions for one node (immutable, comparable).

    ``pressure_since``: job id -> time (s) its pressure crossed the limit (hysteresis held);
    ``cooldown_until``: job id -> time (s) before which nothing new of it is offered;
    ``offer``: the previous offer; ``inner``: the wrapped policy's own state;
    ``strikes``: job id -> pressure evictions so far (sets the next cooldown's length).
    """

    inner: object | None = None
    pressure_since: tuple[tuple[str, float], ...] = ()
    cooldown_until: tuple[tuple[str, float], ...] = ()
    offer: Offer | None = None
    strikes: tuple[tuple[str, int], ...] = ()


def pressure_ratio(job: JobView, limits: Limits) -> tuple[float, float]:
    """(cpu, memory) pressure of the job's latest sample relative to its limit (1.0 = at it)."""
    if not job.history:
        return 0.0, 0.0
    sample = job.history[-1]
    return (
        _ratio(sample.cpu_pressure, limits.cpu_pressure_limit),
        _ratio(sample.memory_pressure, limits.memory_pressure_limit),
    )


def _ratio(value: float | None, limit: float) -> float:
    if not value or value <= 0.0:
        return 0.0
    return value / limit if limit > 0 else math.inf


class InterferenceGuard:
    """Wraps ``inner``; see the module docstring for the rules. Pure: state comes back in."""

    def __init__(self, inner: Policy) -> None:
        self.inner = inner
        self.name = inner.name

    def decide(
        self, node: NodeView, limits: Limits, now: float, state: object | None = None
    ) -> Decision:
        previous = state if isinstance(state, GuardState) else GuardState(inner=state)
        if not limits.guard:
            return self.inner.decide(node, limits, now, previous.inner)
        full = self.inner.decide(node, limits, now, previous.inner)
        notes: list[str] = []

        # 1. thresholds and hysteresis
        since = dict(previous.pressure_since) if previous.pressure_since else {}
        ratios: dict[str, float] = {}
        cpu_limit = limits.cpu_pressure_limit
        memory_limit = limits.memory_pressure_limit
        for job in node.jobs:
            ratio = 0.0
            if job.history:
                sample = job.history[-1]
                if sample.cpu_pressure or sample.memory_pressure:  # most samples: calm or none
                    ratio = max(
                        _ratio(sample.cpu_pressure, cpu_limit),
                        _ratio(sample.memory_pressure, memory_limit),
                    )
            ratios[job.job_id] = ratio
            if ratio > 1.0:
                since.setdefault(job.job_id, now)
            elif since and ratio < PRESSURE_CLEAR_RATIO:
                since.pop(job.job_id, None)
        if since:
            since = {job_id: t for job_id, t in since.items() if job_id in ratios}
        cooldown = (
            {
                job_id: until
                for job_id, until in previous.cooldown_until
                if job_id in ratios and (now < until or ratios[job_id] >= PRESSURE_CLEAR_RATIO)
            }
            if previous.cooldown_until
            else {}
        )

        strikes: dict[str, int] | None = None  # None: unchanged from the previous state
        evictions = full.evictions
        kept: list[LeaseView] = []
        if node.leases:
            evicted = {e.lease_id for e in evictions}
            kept = [
                lease for lease in leases_oldest_first(node.leases) if lease.lease_id not in evicted
            ]

        # 2.-3. grace period, rank, evict at most one lease
        if since and kept:
            due = [
                (-ratios[job_id], job_id)
                for job_id, t in since.items()
                if now - t >= limits.pressure_grace_s
            ]
            if due:
                _, job_id = min(due)
                job = next(j for j in node.jobs if j.job_id == job_id)
                victim = _pressure_victim(kept, job, limits)
                kept.remove(victim)
                reason = EvictionReason.PRESSURE
                evictions = (
                    *evictions,
                    Eviction(victim.lease_id, reason, eviction_grace(reason, limits)),
                )
                since[job_id] = now
                strikes = dict(previous.strikes)
                struck = strikes.get(job_id, 0)
                strikes[job_id] = struck + 1
                cooldown[job_id] = now + min(
                    limits.reoffer_cooldown_s * limits.reoffer_backoff ** min(struck, 64),
                    limits.reoffer_cooldown_max_s,
                )
                notes.append(
                    f"pressure: job {job_id} at {ratios[job_id]:.2f}x its limit for "
                    f"{limits.pressure_grace_s:g} s: evicted lease {victim.lease_id}"
                )

        held_cpus: frozenset[int] = frozenset()
        held_memory = 0
        for lease in kept:
            held_cpus = held_cpus | lease.cpu_ids
            held_memory += lease.memory_bytes
        cpu_ids = full.offer.cpu_ids
        memory = full.offer.memory_bytes

        # 4. cooldown: offer the job's resources only as far as leases still hold them
        if cooldown:
            cooled = replace(
                node,
                jobs=tuple(
                    replace(j, colocate=False) if j.job_id in cooldown else j for j in node.jobs
                ),
            )
            without = self.inner.decide(cooled, limits, now, previous.inner).offer
            cpu_ids = cpu_ids & (without.cpu_ids | held_cpus)
            memory = min(memory, max(without.memory_bytes, held_memory))

        last = previous.offer
        if last is not None:
            # 5. no growth while any job is under pressure
            if since:
                cpu_ids = cpu_ids & (last.cpu_ids | held_cpus)
                memory = min(memory, max(last.memory_bytes, held_memory))
            # 6. grow back only in steps of the minimum reclaim
            if last.memory_bytes < memory < last.memory_bytes + limits.min_reclaim_bytes:
                memory = max(last.memory_bytes, held_memory)
            if not cpu_ids <= last.cpu_ids:
                added = cpu_ids - last.cpu_ids - held_cpus
                if added and len(added) < limits.min_reclaim_cores:
                    cpu_ids = cpu_ids - added

        # 7. share cap, only where batch jobs run: an empty node has nobody to protect, and
        # capping it would halve the scavenger baseline on idle nodes.
        share = limits.max_function_share
        if node.jobs:
            cap_cores = math.floor(share * len(node.cpu_ids) + 1e-9)
            if len(cpu_ids) > cap_cores:
                cpu_ids = _trim_cores(cpu_ids, cap_cores, kept)
            memory = min(memory, int(share * node.memory_total_bytes))
        if kept and node.jobs:
            memory_left = memory
            over: list[Eviction] = []
            for lease in kept:
                if lease.cpu_ids <= cpu_ids and lease.memory_bytes <= memory_left:
                    memory_left -= lease.memory_bytes
                    continue
                reason = EvictionReason.SHARE_CAP
                over.append(Eviction(lease.lease_id, reason, eviction_grace(reason, limits)))
                notes.append(f"share cap: lease {lease.lease_id} over {share:.0%} of the node")
            if over:
                evictions = (*evictions, *over)

        offer = (
            full.offer
            if memory == full.offer.memory_bytes and cpu_ids is full.offer.cpu_ids
            else Offer(frozenset(cpu_ids), max(0, memory))
        )
        new_state = GuardState(
            full.state,
            tuple(sorted(since.items())) if since else (),
            tuple(sorted(cooldown.items())) if cooldown else (),
            offer,
            _strikes(previous.strikes if strikes is None else strikes, ratios),
        )
        return Decision(offer, evictions, new_state, (*full.notes, *notes) if notes else full.notes)


def _strikes(
    strikes: tuple[tuple[str, int], ...] | dict[str, int], on_node: dict[str, float]
) -> tuple[tuple[str, int], ...]:
    """Strikes of the jobs still on the node, sorted (a job that ended is forgotten)."""
    if not strikes:
        return ()
    items = strikes.items() if isinstance(strikes, dict) else strikes
    return tuple(sorted((job_id, n) for job_id, n in items if job_id in on_node))


def _pressure_victim(kept: list[LeaseView], job: JobView, limits: Limits) -> LeaseView:
    """The lease whose eviction relieves ``job`` most; newest, then smallest id, on ties.

    Memory pressure above cpu pressure (relative to their limits) ranks by memory held first.
    """
    cpu, mem = pressure_ratio(job, limits)
    memory_first = mem > cpu

    def relief(lease: LeaseView) -> tuple[int, int, float, str]:
        on_job = len(lease.cpu_ids & job.cpu_ids)
        if memory_first:
            return (-lease.memory_bytes, -on_job, -lease.granted_at, lease.lease_id)
        return (-on_job, -lease.memory_bytes, -lease.granted_at, lease.lease_id)

    return min(kept, key=relief)


def _trim_cores(cpu_ids: frozenset[int], cap: int, kept: list[LeaseView]) -> frozenset[int]:
    """At most ``cap`` of ``cpu_ids``: cores of the oldest leases first, then highest ids."""
    chosen: set[int] = set()
    for lease in kept:
        if lease.cpu_ids <= cpu_ids and len(chosen | lease.cpu_ids) <= cap:
            chosen |= lease.cpu_ids
    for cpu in sorted(cpu_ids - chosen, reverse=True):
        if len(chosen) >= cap:
            break
        chosen.add(cpu)
    return frozenset(chosen)
