"""From what the monitor saw to what a policy looks at: ``NodeSnapshot`` + history -> ``NodeView``."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

from monitors.history import UsageHistory
from monitors.sampler import Sampler
from monitors.snapshot import NodeSnapshot
from policies.model import JobView, LeaseView, NodeView


def node_view(
    snapshot: NodeSnapshot,
    history: UsageHistory | None = None,
    leases: Sequence[LeaseView] = (),
    memory_reserved_bytes: int = 0,
    colocate: Mapping[str, bool] | None = None,
    default_colocate: bool = True,
) -> NodeView:
    """The policy's view of a node. A job without CPU ids from Slurm or its cgroup gets none
    (the policy then treats none of its cores as known-idle); ``memory_peak_bytes`` is the
    monitor's peak (kernel high-water mark where available).

    ``colocate`` maps job ids to their ``--colocate`` choice (the prolog hook tells the
    agent); jobs not in it get ``default_colocate`` (the site's default).
    """
    choices = colocate or {}
    jobs = tuple(
        JobView(
            job_id=job.job_id,
            cpu_ids=frozenset(job.cpu_ids),
            memory_allocated_bytes=job.memory_allocated_bytes,
            memory_peak_bytes=job.memory_peak_bytes,
            history=history.samples(job.job_id) if history is not None else (),
            colocate=choices.get(job.job_id, default_colocate),
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

    def __init__(
        self, sampler: Sampler, memory_reserved_bytes: int = 0, default_colocate: bool = True
    ) -> None:
        self.sampler = sampler
        self.node = sampler.node
        self.memory_reserved_bytes = memory_reserved_bytes
        self.default_colocate = default_colocate
        self.colocate: dict[str, bool] = {}  # job id -> its --colocate choice (from the prolog)
        self.last_snapshot: NodeSnapshot | None = None
        self._seen: set[str] = set()

    @classmethod
    def live(
        cls,
        node: str,
        backend: str = "cli",
        *,
        psi_groups: bool = False,
        memory_reserved_bytes: int = 0,
        default_colocate: bool = True,
    ) -> MonitoredNode:
        """This machine's node ``node``: Slurm through ``backend``, usage from its cgroups."""
        from monitors.sampler import default_source
        from slurm_plugin.slurm import make_slurm

        sampler = Sampler(node, make_slurm(backend), default_source(psi_groups=psi_groups))
        return cls(sampler, memory_reserved_bytes, default_colocate)

    def view(self, now: float | None = None) -> NodeView:
        snapshot = self.sampler.sample(
            now if now is not None else time.time(),
            colocate=self.colocate,
            default_colocate=self.default_colocate,
        )
        self.last_snapshot = snapshot
        live = {j.job_id for j in snapshot.jobs}
        # Forget choices of jobs that ended; a choice may arrive (prolog) before its job is seen.
        for job_id in [j for j in self.colocate if j in self._seen and j not in live]:
            del self.colocate[job_id]
        self._seen = live
        return node_view(
            snapshot,
            self.sampler.history,
            memory_reserved_bytes=self.memory_reserved_bytes,
            colocate=self.colocate,
            default_colocate=self.default_colocate,
        )
