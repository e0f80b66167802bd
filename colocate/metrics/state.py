"""What the metrics read: small plain classes the agent (or the broker) fills once per cycle.

The agent builds one :class:`NodeState` per sampling cycle from what it has anyway (the
monitor's ``NodeSnapshot``, the policy's ``Offer``, its leases and executors) and hands it to
``NodeCollector.update``. Nothing here does I/O. Units: cores, bytes, seconds (epoch).

Lease and executor states are bounded label values: anything outside ``LEASE_STATES`` or
``EXECUTOR_STATES`` is exported as ``other`` so a typo can never grow the series count.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from monitors.snapshot import JobSnapshot, NodeSnapshot
from policies.model import LeaseView, NodeView, Offer

#: States of ``colocate_node_cores`` / ``colocate_node_memory_bytes``; they overlap:
#: allocated = used_by_jobs + idle_allocated, total = allocated + unallocated, leased <= offered.
NODE_STATES: tuple[str, ...] = (
    "total",
    "allocated",
    "used_by_jobs",
    "idle_allocated",
    "unallocated",
    "offered",
    "leased",
    "used_by_functions",
)
LEASE_STATES: tuple[str, ...] = ("starting", "active", "evicting")
EXECUTOR_STATES: tuple[str, ...] = ("starting", "idle", "busy", "stopping")
OTHER = "other"


@dataclass(frozen=True, slots=True)
class LeaseState:
    """A lease on this node: ``cores`` (count) and ``memory_bytes`` it holds, in ``state``.

    ``state``: ``starting`` (granted, executor not up yet), ``active``, ``evicting`` (told
    to go, within its grace period). ``expires_at`` is epoch seconds, None if unknown.
    """

    lease_id: str
    cores: int
    memory_bytes: int
    state: str = "active"
    granted_at: float | None = None
    expires_at: float | None = None

    @classmethod
    def from_view(cls, lease: LeaseView, state: str = "active") -> LeaseState:
        """The metrics' view of a policy ``LeaseView``."""
        return cls(
            lease.lease_id,
            len(lease.cpu_ids),
            lease.memory_bytes,
            state,
            lease.granted_at,
            lease.expires_at,
        )


@dataclass(frozen=True, slots=True)
class ExecutorState:
    """An executor process serving a lease, and what it uses now.

    ``cores_used`` is CPU-seconds per second over the agent's last window (like
    ``JobSnapshot.cores_used``); ``memory_used_bytes`` its resident memory.
    ``state``: ``starting``, ``idle`` (warm, waiting), ``busy`` (running a call),
    ``stopping``.
    """

    executor_id: str
    lease_id: str
    state: str = "idle"
    cores_used: float = 0.0
    memory_used_bytes: int = 0


@dataclass(frozen=True, slots=True)
class NodeState:
    """One node at ``snapshot.t``: its jobs, what the policy offers, leases, executors."""

    snapshot: NodeSnapshot
    offer: Offer = field(default_factory=Offer)
    leases: tuple[LeaseState, ...] = ()
    executors: tuple[ExecutorState, ...] = ()

    @property
    def cores_leased(self) -> int:
        return sum(lease.cores for lease in self.leases)

    @property
    def memory_leased_bytes(self) -> int:
        return sum(lease.memory_bytes for lease in self.leases)

    @property
    def cores_used_by_functions(self) -> float:
        return sum(ex.cores_used for ex in self.executors)

    @property
    def memory_used_by_functions_bytes(self) -> int:
        return sum(ex.memory_used_bytes for ex in self.executors)


def bounded_state(value: str, known: tuple[str, ...]) -> str:
    """``value`` if it is one of ``known``, else ``other`` (keeps label values bounded)."""
    return value if value in known else OTHER


def snapshot_from_view(view: NodeView, now: float, *, slurm_ok: bool = True) -> NodeSnapshot:
    """A ``NodeSnapshot`` of what a policy ``NodeView`` knows, for agents without a monitor.

    A job's use is its newest history sample (0 without history); its user is unknown
    (empty). Unallocated cores: node cores no job holds; unallocated memory: total minus
    reserved minus job allocations (never negative).
    """
    jobs: list[JobSnapshot] = []
    held: set[int] = set()
    allocated_memory = 0
    for job in view.jobs:
        last = job.history[-1] if job.history else None
        held.update(job.cpu_ids)
        allocated_memory += job.memory_allocated_bytes
        jobs.append(
            JobSnapshot(
                job_id=job.job_id,
                user="",
                cores_allocated=len(job.cpu_ids),
                cpu_ids=tuple(sorted(job.cpu_ids)),
                cores_used=last.cores_used if last else 0.0,
                memory_allocated_bytes=job.memory_allocated_bytes,
                memory_used_bytes=last.memory_used_bytes if last else 0,
                memory_peak_bytes=job.memory_peak_bytes,
                cpu_pressure=last.cpu_pressure if last else None,
                memory_pressure=last.memory_pressure if last else None,
                colocate=job.colocate,
                start_time=job.start_time or None,
            )
        )
    return NodeSnapshot(
        node=view.node,
        t=now,
        cores_total=len(view.cpu_ids),
        cpu_ids=tuple(sorted(view.cpu_ids)),
        memory_total_bytes=view.memory_total_bytes,
        cores_unallocated=len(view.cpu_ids - held),
        memory_unallocated_bytes=max(
            0, view.memory_total_bytes - view.memory_reserved_bytes - allocated_memory
        ),
        jobs=tuple(jobs),
        slurm_ok=slurm_ok,
    )
