"""Values the policies read and return: :func:`value` classes, built per decision, so they
must be cheap (the replay of RICC-2010-2 builds about ten million of them).

Units everywhere: seconds, bytes, cores. Core ids are the kernel's CPU numbers.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol, TypeVar, dataclass_transform

from policies.limits import Limits

_T = TypeVar("_T")


@dataclass_transform(frozen_default=True, field_specifiers=(field,))
def value(cls: type[_T]) -> type[_T]:
    """A value type: a slots dataclass compared and hashed by its fields, immutable to the type
    checker (``mypy --strict`` rejects any assignment to a field, as for ``frozen=True``).

    Not frozen at run time, on purpose: a frozen dataclass sets each field through
    ``object.__setattr__``, which makes building one about 4x slower (a ``UsageSample``: 580
    against 133 ns), and the replay builds millions per trace (``benchmarks/replay.py``).
    """
    return dataclass(slots=True, unsafe_hash=True)(cls)


@value
class UsageSample:
    """One observation of a job; ``cores_used`` is CPU-seconds per second over the sample window.

    Pressure is the PSI ``some avg10`` share in percent (0..100), None where unavailable.
    ``cpu_busy``: (CPU id, busy share 0..1) for each of the job's CPUs over the same window;
    empty where the monitor has no per-CPU accounting (then only the total is known).
    ``cores_waiting``: cores' worth of time the job's threads were runnable but waited for a
    CPU; ``cores_used + cores_waiting`` (:attr:`cores_wanted`) is what it wants, which on a
    CPU shared with other work is more than it gets.
    """

    t: float
    cores_used: float
    memory_used_bytes: int
    cpu_pressure: float | None = None
    memory_pressure: float | None = None
    cpu_busy: tuple[tuple[int, float], ...] = ()
    cores_waiting: float = 0.0

    @property
    def cores_wanted(self) -> float:
        return self.cores_used + self.cores_waiting


@value
class JobView:
    """A running batch job on one node, as the policy sees it.

    ``history`` is oldest first and may be empty (a job that just started: nothing of it
    may be offered). ``colocate`` is False when the job asked ``--colocate=deny``.
    """

    job_id: str
    cpu_ids: frozenset[int]
    memory_allocated_bytes: int
    memory_peak_bytes: int = 0
    history: tuple[UsageSample, ...] = ()
    colocate: bool = True
    start_time: float = 0.0


@value
class LeaseView:
    """A lease currently held by functions on this node."""

    lease_id: str
    cpu_ids: frozenset[int]
    memory_bytes: int
    granted_at: float
    expires_at: float


@value
class NodeView:
    """Everything a policy may look at for one node at one instant."""

    node: str
    cpu_ids: frozenset[int]
    memory_total_bytes: int
    jobs: tuple[JobView, ...] = ()
    leases: tuple[LeaseView, ...] = ()
    memory_reserved_bytes: int = 0  # OS, slurmd, agent: never offered


@value
class Offer:
    """What functions may occupy on the node now, leases already held included.

    A lease survives a decision only if its cores are inside ``cpu_ids``; the memory of all
    surviving leases together never exceeds ``memory_bytes``.
    """

    cpu_ids: frozenset[int] = frozenset()
    memory_bytes: int = 0

    @property
    def cores(self) -> int:
        return len(self.cpu_ids)


class EvictionReason(enum.StrEnum):
    """Why a lease ends: one set from the policies through the agent to the metrics.

    Policies decide the first eight; the agent adds the last three on its own account.
    """

    JOB_START = "job_start"  # a job was given the lease's cores or memory
    MEMORY_GROWTH = "memory_growth"  # a job's memory grew toward the leased memory
    CPU_GROWTH = "cpu_growth"  # a job started using the leased cores
    PRESSURE = "pressure"  # a job's PSI crossed the interference limit
    SHARE_CAP = "share_cap"  # functions hold more of the node than allowed
    EXPIRED = "expired"  # the lease ran past its expiry
    RELEASED = "released"  # the client or broker gave it back
    DENIED = "denied"  # the job said --colocate=deny
    EXECUTOR_LOST = "executor_lost"  # a worker exited on its own
    AGENT_STOPPED = "agent_stopped"  # the agent shut down and took every lease back
    REVOKED = "revoked"  # the broker asked the agent to take it back


@value
class Eviction:
    """Take ``lease_id`` back; the executor gets ``grace_s`` seconds before it is killed."""

    lease_id: str
    reason: EvictionReason
    grace_s: float = 0.0


@value
class Decision:
    """A policy's answer; ``state`` must be passed back on the next call for the same node."""

    offer: Offer
    evictions: tuple[Eviction, ...] = ()
    state: object | None = None
    notes: tuple[str, ...] = field(default=())  # why, for logs and reports


class Policy(Protocol):
    """Pure: no I/O, no clock. The same (node, limits, now, state) gives the same Decision."""

    name: str

    def decide(
        self, node: NodeView, limits: Limits, now: float, state: object | None = None
    ) -> Decision: ...
