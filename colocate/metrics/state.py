"""What the metrics read: small plain classes the agent (or the broker) fills once per cycle.

The agent builds one :class:`NodeState` per sampling cycle from what it has anyway (the
monitor's ``NodeSnapshot``, the policy's ``Offer``, its leases and executors) and hands it to
``NodeCollector.update``. Nothing here does I/O. Units: cores, bytes, seconds (epoch).

Lease and executor states are bounded label values: anything outside ``LEASE_STATES`` or
``EXECUTOR_STATES`` is exported as ``other`` so a typo can never grow the series count.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from monitors.snapshot import NodeSnapshot
from policies.model import Offer

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
