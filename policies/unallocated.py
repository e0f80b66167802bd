"""``unallocated``: offer only what Slurm has not allocated (the scavenger / HPC-Whisk baseline)."""

from __future__ import annotations

from policies.eviction import evict_leases
from policies.limits import Limits
from policies.model import Decision, EvictionReason, NodeView, Offer


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
