"""Capacity search: the scale found is where the served share crosses the target."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from traces.capacity import search, served_share


def summary(share: float) -> dict[str, float]:
    return {
        "faas_invocations_total": 1000.0,
        "faas_invocations_served": 1000.0 * share,
        "recovered_cost": share,
        "evictions": 0.0,
        "interference_violation_hours": 0.0,
    }


def test_capacity_is_where_each_policy_stops_serving_the_target() -> None:
    """A policy with C units of room serves min(1, C / scale) of the load: its capacity at a
    99 % target is C / 0.99; the search must land within its bisection resolution."""
    room = {"small": 3.0, "large": 40.0}
    calls: list[tuple[float, tuple[str, ...]]] = []

    def run_at(scale: float, policies: Sequence[str]) -> dict[str, dict[str, float]]:
        calls.append((scale, tuple(policies)))
        return {n: summary(min(1.0, room[n] / scale)) for n in policies}

    result = search(run_at, list(room), target=0.99, refine=6)
    for name, c in room.items():
        exact = c / 0.99
        assert result.capacity[name] <= exact
        assert result.capacity[name] == pytest.approx(exact, rel=0.12)
        scales = [p[0] for p in result.points[name]]
        assert scales == sorted(scales)
    # the small policy is not replayed again once it fell below the target
    assert all("small" not in names for scale, names in calls if scale > 8)
    curves = result.to_dict()["curves"]["large"]
    assert curves[0]["served_share"] == 1.0 and curves[-1]["served_share"] < 0.99


def test_a_policy_that_never_serves_the_target_has_capacity_zero() -> None:
    result = search(lambda s, ps: {n: summary(0.5) for n in ps}, ["p"], refine=2)
    assert result.capacity == {"p": 0.0}
    assert served_share(result.points["p"][0][1]) == 0.5


def test_a_bad_target_is_refused() -> None:
    with pytest.raises(ValueError, match="target"):
        search(lambda s, ps: {}, ["p"], target=1.5)
