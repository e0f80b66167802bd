"""Which leases an offer no longer holds, and why (shared by every harvesting policy).

A lease survives a decision when it has not expired, its cores all sit inside the offer and
its memory still fits in what the offer has left after older leases (oldest kept first, so
the newest lease is the one that loses memory).

Grace periods follow kubelet's hard/soft split: a job that needs its memory or cores *now*
(``JOB_START``, ``MEMORY_GROWTH``, ``DENIED``) gets them at once (0 s: memory cannot be
throttled, Borg kills at once on memory shortage); the others are soft and give the
executor ``limits.eviction_grace_s`` to finish.
"""

from __future__ import annotations

from policies.limits import Limits
from policies.model import Eviction, EvictionReason, LeaseView, NodeView, Offer

HARD_REASONS = frozenset(
    {EvictionReason.JOB_START, EvictionReason.MEMORY_GROWTH, EvictionReason.DENIED}
)

# When a lease's missing cores carry several reasons, the most severe one is reported.
_SEVERITY = {
    EvictionReason.DENIED: 0,
    EvictionReason.JOB_START: 1,
    EvictionReason.PRESSURE: 2,
    EvictionReason.SHARE_CAP: 3,
    EvictionReason.CPU_GROWTH: 4,
}

CoreReasons = tuple[tuple[frozenset[int], EvictionReason], ...]
"""Why cores are not offered: (core ids, reason) pairs; a core in none of them is JOB_START."""


def eviction_grace(reason: EvictionReason, limits: Limits) -> float:
    """Seconds an evicted executor gets before it is killed: 0 for hard reasons."""
    return 0.0 if reason in HARD_REASONS else limits.eviction_grace_s


def leases_oldest_first(leases: tuple[LeaseView, ...]) -> tuple[LeaseView, ...]:
    """Leases ordered by grant time, then id (the order in which they keep memory)."""
    if len(leases) < 2:
        return leases
    return tuple(sorted(leases, key=lambda lease: (lease.granted_at, lease.lease_id)))


def core_reason(missing: frozenset[int], core_reasons: CoreReasons) -> EvictionReason:
    """The most severe reason among the holders of ``missing`` cores (JOB_START if none)."""
    candidates: list[EvictionReason] = []
    uncovered = missing
    for cpus, reason in core_reasons:
        hit = missing & cpus
        if hit:
            candidates.append(reason)
            uncovered = uncovered - hit
    if uncovered or not candidates:
        # A core no job holds and the offer left out: a job or the node took it back.
        candidates.append(EvictionReason.JOB_START)
    return min(candidates, key=lambda r: _SEVERITY.get(r, 9))


def evict_leases(
    node: NodeView,
    offer: Offer,
    now: float,
    limits: Limits,
    core_reasons: CoreReasons,
    memory_reason: EvictionReason,
) -> tuple[Eviction, ...]:
    """Evictions for the leases of ``node`` that expired or no longer fit ``offer``.

    ``core_reasons`` says why cores outside the offer are withheld; ``memory_reason`` is
    given to leases whose memory no longer fits.
    """
    if not node.leases:
        return ()
    evictions: list[Eviction] = []
    memory_left = offer.memory_bytes
    offered = offer.cpu_ids
    for lease in leases_oldest_first(node.leases):
        if lease.expires_at <= now:
            reason = EvictionReason.EXPIRED
        elif not lease.cpu_ids <= offered:
            reason = core_reason(lease.cpu_ids - offered, core_reasons)
        elif lease.memory_bytes > memory_left:
            reason = memory_reason
        else:
            memory_left -= lease.memory_bytes
            continue
        evictions.append(Eviction(lease.lease_id, reason, eviction_grace(reason, limits)))
    return tuple(evictions)
