"""The pure decision core: which cores and memory functions may use now, and which leases go.

Nothing here does I/O or reads a clock (a test enforces it): the live agent and the
replay call the very same ``decide``.
"""

from __future__ import annotations

from collections.abc import Callable

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
    UsageSample,
)
from policies.prices import Prices
from policies.unallocated import UnallocatedPolicy

# One line per policy; adding one touches one new module, this dict, and the contract tests.
POLICIES: dict[str, Callable[[], Policy]] = {
    "unallocated": UnallocatedPolicy,
}


def get_policy(name: str) -> Policy:
    """The registered policy ``name``; ValueError naming the known ones otherwise."""
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(sorted(POLICIES))}") from None


__all__ = [
    "POLICIES",
    "Decision",
    "Eviction",
    "EvictionReason",
    "JobView",
    "LeaseView",
    "Limits",
    "NodeView",
    "Offer",
    "Policy",
    "Prices",
    "UsageSample",
    "get_policy",
]
