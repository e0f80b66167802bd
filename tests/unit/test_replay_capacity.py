"""Capacity search: the scale found is where the served share crosses the target."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from traces import bundled
from traces.azure import read_azure2019
from traces.capacity import (
    ESTIMATE,
    ScaledReplay,
    capacity_estimate,
    search,
    search_guided,
    served_share,
)
from traces.demand import Demand
from traces.placement import Cluster
from traces.replay import replay
from traces.swf import read_swf


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


def test_the_estimate_is_where_a_fixed_offer_stops_serving_the_target() -> None:
    """8 cores offered against 2 cores of demand every minute: the load may grow 4 / 0.99
    times before 1 % of it goes unserved; memory to spare does not change that."""
    minutes = 100
    dem = Demand(
        invocations=np.full(minutes, 50.0),
        cores=np.full(minutes, 2.0),
        memory_bytes=np.full(minutes, 1e9),
        cold_starts=np.zeros(minutes),
        repeats=1.0,
    )
    offered_c, offered_m = np.full(minutes, 8.0), np.full(minutes, 1e12)
    factor = capacity_estimate(offered_c, offered_m, dem, 0.99)
    assert factor == pytest.approx(4.0 / 0.99, rel=1e-3)
    # half the minutes offer nothing: at most half the load is ever served
    offered_c[::2] = 0.0
    assert capacity_estimate(offered_c, offered_m, dem, 0.99) == 0.0
    assert capacity_estimate(offered_c, offered_m, dem, 0.4) == pytest.approx(5.0, rel=1e-3)


@pytest.mark.parametrize("bias", [1.0, 1.4, 0.6])
def test_guided_search_brackets_the_capacity_within_its_tolerance(bias: float) -> None:
    """With an estimate off by ``bias`` the search still lands within the tolerance, below the
    exact capacity, in a few replays (exact estimate: three)."""
    room = 37.0
    calls: list[float] = []

    def run_at(scale: float, policies: Sequence[str]) -> dict[str, dict[str, float]]:
        calls.append(scale)
        return {
            n: {**summary(min(1.0, room / scale)), ESTIMATE: bias * room / 0.99} for n in policies
        }

    result = search_guided(run_at, ["p"], target=0.99, tolerance=0.05)
    exact = room / 0.99
    assert result.capacity["p"] <= exact
    assert result.capacity["p"] >= exact / 1.05
    assert len(calls) <= (3 if bias == 1.0 else 12)
    shares = [served_share(s) for _, s in result.points["p"]]
    assert shares[-1] < 0.99 <= shares[0]  # sorted by scale: both sides were seen


def test_guided_search_without_estimates_bisects() -> None:
    room = 5.0
    result = search_guided(
        lambda s, ps: {n: summary(min(1.0, room / s)) for n in ps},
        ["p"],
        tolerance=0.05,
        max_runs=30,
    )
    assert room / 0.99 / 1.05 <= result.capacity["p"] <= room / 0.99


def test_scaled_replay_capacity_holds_on_a_real_replay() -> None:
    """On a bundled trace, replayed once placed: at the capacity found the policy serves the
    target, just past it (the tolerance) it does not, and the replays reused one placement."""
    cluster = Cluster(
        bundled.HPC2N_NODES, bundled.HPC2N_CORES_PER_NODE, bundled.HPC2N_MEMORY_PER_NODE
    )
    jobs = read_swf(bundled.HPC2N_EXCERPT).head(400)
    faas = read_azure2019(bundled.AZURE2019)
    run_at = ScaledReplay(jobs, faas, cluster, target=0.99)
    result = search_guided(run_at, ["headroom"], target=0.99, tolerance=0.05)
    cap = result.capacity["headroom"]
    assert cap > 1.0  # the excerpt's idle cores serve more than the Azure slice
    assert run_at.runs == len(result.points["headroom"]) <= 8
    at = {s: served_share(summ) for s, summ in result.points["headroom"]}
    assert at[cap] >= 0.99
    above = min(s for s in at if s > cap)
    assert at[above] < 0.99 and above / cap <= 1.05
    # the same numbers as a replay from scratch at that scale
    fresh = replay(jobs, faas, cluster, ["headroom"], faas_scale=cap, seed=0)
    assert fresh.policies["headroom"].summary["recovered_cost"] == pytest.approx(
        dict(result.points["headroom"])[cap]["recovered_cost"], rel=1e-12
    )


def test_parallel_pairs_bracket_in_one_round_after_the_first_replay() -> None:
    """With ``run_many`` the probes either side of a right estimate go out together: the
    first replay and one pair bracket the capacity."""
    room = 37.0
    rounds: list[list[float]] = []

    def one(scale: float) -> dict[str, float]:
        return {**summary(min(1.0, room / scale)), ESTIMATE: room / 0.99}

    def run_many(scales: Sequence[float], name: str) -> list[dict[str, float]]:
        rounds.append(list(scales))
        return [one(s) for s in scales]

    result = search_guided(
        lambda s, ps: {n: one(s) for n in ps}, ["p"], tolerance=0.05, run_many=run_many
    )
    assert rounds and len(rounds[0]) == 2 and len(rounds) == 1
    assert room / 0.99 / 1.05 <= result.capacity["p"] <= room / 0.99


def test_scaled_replay_many_equals_one_by_one() -> None:
    """Replays in forked processes give the same summaries as in this one."""
    cluster = Cluster(
        bundled.HPC2N_NODES, bundled.HPC2N_CORES_PER_NODE, bundled.HPC2N_MEMORY_PER_NODE
    )
    run_at = ScaledReplay(
        read_swf(bundled.HPC2N_EXCERPT).head(300), read_azure2019(bundled.AZURE2019), cluster
    )
    together = run_at.many([2.0, 5.0], "headroom")
    alone = [run_at(s, ["headroom"])["headroom"] for s in (2.0, 5.0)]
    for a, b in zip(together, alone, strict=True):
        assert {k: v for k, v in a.items() if k != "replay_seconds"} == {
            k: v for k, v in b.items() if k != "replay_seconds"
        }


def test_pairs_converge_when_estimates_lean_with_the_scale() -> None:
    """As on RICC: a replay at a higher scale sees more evictions, so its estimate is lower
    (here ``c * (c / s) ** 0.015``, equal to ``s`` only at the capacity ``c``: RICC's
    estimates were 32.05 at scale 1 and 30.36 at 31.28); the pair just past the first
    estimate then lands both below the target, and the next pair brackets it."""
    c = 30.7
    rounds: list[list[float]] = []

    def one(scale: float) -> dict[str, float]:
        return {**summary(0.99 * min(1.0, c / scale) ** 0.5), ESTIMATE: c * (c / scale) ** 0.015}

    def run_many(scales: Sequence[float], name: str) -> list[dict[str, float]]:
        rounds.append(list(scales))
        return [one(s) for s in scales]

    result = search_guided(
        lambda s, ps: {n: one(s) for n in ps}, ["p"], tolerance=0.05, run_many=run_many
    )
    assert len(rounds) == 2
    assert all(served_share(one(s)) < 0.99 for s in rounds[0])
    assert c / 1.05 <= result.capacity["p"] <= c
