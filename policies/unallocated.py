"""``unallocated``: offer only what Slurm has not allocated (the scavenger / HPC-Whisk baseline)."""

from __future__ import annotations

from policies.eviction import evict_leases
from policies.limits import Limits
from policies.model import Decision, Eviction, EvictionReason, NodeView, Offer


class UnallocatedPolicy:
    """The scavenger baseline (HPC-Whisk, Slurm preemptible jobs): no margins needed, since
    nothing a job was given is lent; a job's start takes its cores and memory back at once.
    """

    name = "unallocated"

    def decide(
        self, node: NodeView, limits: Limits, now: float, state: object | None = None
    ) -> Decision:
        allocated_cpus: set[int] = set()
        allocated_mem = 0
        for job in node.jobs:
            allocated_cpus.update(job.cpu_ids)
            allocated_mem += job.memory_allocated_bytes
        cpus = node.cpu_ids - allocated_cpus
        memory = max(0, node.memory_total_bytes - node.memory_reserved_bytes - allocated_mem)
        offer = Offer(frozenset(cpus), memory)
        if not node.leases:
            return Decision(offer)
        reasons = tuple(
            (job.cpu_ids, EvictionReason.JOB_START if job.colocate else EvictionReason.DENIED)
            for job in node.jobs
        )
        return Decision(
            offer, evict_leases(node, offer, now, limits, reasons, EvictionReason.JOB_START)
        )


def evict_outside(node: NodeView, offer: Offer, now: float) -> tuple[Eviction, ...]:
    """Evictions for leases that expired, sit on cores outside the offer, or overflow its memory.

    Leases are kept oldest first, so the newest lease is the one that loses memory.
    """
    evictions: list[Eviction] = []
    memory_left = offer.memory_bytes
    for lease in sorted(node.leases, key=lambda lease: (lease.granted_at, lease.lease_id)):
        if lease.expires_at <= now:
            evictions.append(Eviction(lease.lease_id, EvictionReason.EXPIRED))
        elif not lease.cpu_ids <= offer.cpu_ids:
            evictions.append(Eviction(lease.lease_id, EvictionReason.JOB_START))
        elif lease.memory_bytes > memory_left:
            evictions.append(Eviction(lease.lease_id, EvictionReason.MEMORY_GROWTH))
        else:
            memory_left -= lease.memory_bytes
    return tuple(evictions)
