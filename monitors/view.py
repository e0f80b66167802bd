"""From what the monitor saw to what a policy looks at: ``NodeSnapshot`` + history -> ``NodeView``."""

from __future__ import annotations

import time
from collections.abc import Sequence

from monitors.history import UsageHistory
from monitors.sampler import Sampler
from monitors.snapshot import NodeSnapshot
from policies.model import JobView, LeaseView, NodeView


def node_view(
    snapshot: NodeSnapshot,
    history: UsageHistory | None = None,
    leases: Sequence[LeaseView] = (),
    memory_reserved_bytes: int = 0,
) -> NodeView:
    """The policy's view of a node. A job without CPU ids from Slurm or its cgroup gets none
    (the policy then treats none of its cores as known-idle); ``memory_peak_bytes`` is the
    monitor's peak (kernel high-water mark where available)."""
    jobs = tuple(
        JobView(
            job_id=job.job_id,
            cpu_ids=frozenset(job.cpu_ids),
            memory_allocated_bytes=job.memory_allocated_bytes,
            memory_peak_bytes=job.memory_peak_bytes,
            history=history.samples(job.job_id) if history is not None else (),
            colocate=job.colocate,
            start_time=job.start_time or 0.0,
        )
        for job in snapshot.jobs
    )
    return NodeView(
        node=snapshot.node,
        cpu_ids=frozenset(snapshot.cpu_ids),
        memory_total_bytes=snapshot.memory_total_bytes,
        jobs=jobs,
        leases=tuple(leases),
        memory_reserved_bytes=memory_reserved_bytes,
    )


class MonitoredNode:
    """A node described by the live monitor (the agent's Slurm-integrated node source).

    ``view(now)`` takes a sample and returns the NodeView without leases; the snapshot it
    came from stays in ``last_snapshot`` (for metrics and ``colocate monitor``).
    """

    def __init__(self, sampler: Sampler, memory_reserved_bytes: int = 0) -> None:
        self.sampler = sampler
        self.node = sampler.node
        self.memory_reserved_bytes = memory_reserved_bytes
        self.last_snapshot: NodeSnapshot | None = None

    def view(self, now: float | None = None) -> NodeView:
        snapshot = self.sampler.sample(now if now is not None else time.time())
        self.last_snapshot = snapshot
        return node_view(
            snapshot, self.sampler.history, memory_reserved_bytes=self.memory_reserved_bytes
        )
