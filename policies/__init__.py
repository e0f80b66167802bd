"""The pure decision core: which cores and memory functions may use now, and which leases go.

Nothing here does I/O or reads a clock (a test enforces it): the live agent and the
replay call the very same ``decide``.

Every registered policy comes wrapped in the interference guard (:mod:`policies.guard`),
which acts only when ``Limits.guard`` is True (the default).
"""

from __future__ import annotations

from collections.abc import Callable

from policies.eviction import evict_leases, eviction_grace
from policies.guard import GuardState, InterferenceGuard
from policies.headroom import HeadroomPolicy, harvest, memory_margin, observed_peak
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
from policies.predictive import PredictivePolicy
from policies.prices import Prices
from policies.unallocated import UnallocatedPolicy


def _guarded(inner: Callable[[], Policy]) -> Callable[[], Policy]:
    def build() -> Policy:
        return InterferenceGuard(inner())

    return build


# One line per policy; adding one touches one new module, this dict, and the contract tests.
POLICIES: dict[str, Callable[[], Policy]] = {
    "unallocated": _guarded(UnallocatedPolicy),
    "headroom": _guarded(HeadroomPolicy),
    "predictive": _guarded(PredictivePolicy),
}


def get_policy(name: str) -> Policy:
    """The registered policy ``name`` (guard included); ValueError naming the known ones otherwise."""
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(sorted(POLICIES))}") from None


__all__ = [
    "POLICIES",
    "Decision",
    "Eviction",
    "EvictionReason",
    "GuardState",
    "HeadroomPolicy",
    "InterferenceGuard",
    "JobView",
    "LeaseView",
    "Limits",
    "NodeView",
    "Offer",
    "Policy",
    "PredictivePolicy",
    "Prices",
    "UnallocatedPolicy",
    "UsageSample",
    "evict_leases",
    "eviction_grace",
    "get_policy",
    "harvest",
    "memory_margin",
    "observed_peak",
]
