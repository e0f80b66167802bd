"""One lease on the agent/executor side of the wire: the value the agent holds for a lease.

The HTTP side describes a lease once in ``colocate.broker.api`` (pydantic, validated at the
door); this side describes it once here (a frozen slots dataclass, no validation cost in the
agent's loop). They meet at two edges only, both in ``colocate.broker.api``:
``StartRequest.lease()`` (a placement arriving at the agent) and ``ReportedLease.of()``
(the agent telling the broker what runs). See ARCHITECTURE.md, "Lease values", for the other
lease-shaped types and why each one stays.

Standard library only at import (``policies`` when a policy view is asked for): the client
imports it through the HTTP schema and must stay light (tests/unit/test_import_budget.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from colocate.owner import Owner

if TYPE_CHECKING:
    from policies.model import LeaseView


@dataclass(frozen=True, slots=True)
class LeaseValue:
    """A lease on one node: ``cpu_ids`` (kernel CPU numbers, sorted, distinct),
    ``memory_bytes``, granted and expiring at ``granted_at``/``expires_at`` (epoch seconds),
    run for ``owner`` (None: the backend's default user). Build it with :meth:`of`."""

    lease_id: str
    cpu_ids: tuple[int, ...]
    memory_bytes: int
    granted_at: float
    expires_at: float
    owner: Owner | None = None

    @classmethod
    def of(
        cls,
        lease_id: str,
        cpu_ids: Iterable[int],
        memory_bytes: int,
        granted_at: float,
        expires_at: float,
        owner: Owner | None = None,
    ) -> LeaseValue:
        """The value with ``cpu_ids`` in their one internal form (a sorted tuple)."""
        return cls(
            lease_id,
            tuple(sorted(set(cpu_ids))),
            int(memory_bytes),
            float(granted_at),
            float(expires_at),
            owner,
        )

    @property
    def cores(self) -> int:
        return len(self.cpu_ids)

    def renewed(self, expires_at: float) -> LeaseValue:
        """The same lease ending at ``expires_at`` (epoch seconds)."""
        return replace(self, expires_at=float(expires_at))

    def same_resources(self, other: LeaseValue) -> bool:
        """Whether ``other`` asks for exactly these cores and this memory (a retried start)."""
        return self.cpu_ids == other.cpu_ids and self.memory_bytes == other.memory_bytes

    def view(self) -> LeaseView:
        """What the policies see of it (``policies.model.LeaseView``)."""
        from policies.model import LeaseView

        return LeaseView(
            self.lease_id,
            frozenset(self.cpu_ids),
            self.memory_bytes,
            self.granted_at,
            self.expires_at,
        )
