"""Replay sweeps, the pure parts: expanding a grid, trial JSON, comparing rows, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from colocate.cli.sweep import parse_limits, parse_seeds
from colocate.cli.tune import parse_space
from colocate.errors import ConfigError
from traces.sweep import Grid, Trial, comparable, expand

TRACE = {
    "jobs": "/data/a.swf",
    "jobs_format": "swf",
    "faas": "/data/azure",
    "faas_format": "azure2019",
    "nodes": 4,
    "cores_per_node": 2,
    "memory_per_node_bytes": 2 * 1024**3,
}


def test_every_combination_is_one_trial_in_a_fixed_order() -> None:
    grid = Grid(
        traces=[TRACE, {**TRACE, "jobs": "/data/b.swf"}],
        policies=["headroom", "unallocated"],
        seeds=[0, 1],
        limits={"max_function_share": [0.25, 0.5], "core_noise": [0.1]},
        fixed_limits={"history_window_s": 600.0},
    )
    trials = expand(grid)
    assert len(trials) == 2 * 2 * 2 * 2
    assert trials[0].jobs == "/data/a.swf" and trials[-1].jobs == "/data/b.swf"
    assert [t.seed for t in trials[:4]] == [0, 0, 1, 1]
    assert dict(trials[1].limits) == {
        "core_noise": 0.1,
        "history_window_s": 600.0,
        "max_function_share": 0.5,
    }
    assert len(set(trials)) == len(trials)
    assert (
        trials[1].label()
        == "a headroom seed=0 core_noise=0.1 history_window_s=600 max_function_share=0.5"
    )


def test_a_trial_survives_json_unchanged() -> None:
    trial = expand(
        Grid(traces=[TRACE], policies=["predictive"], seeds=[7], limits={"guard": [False]})
    )[0]
    again = Trial.from_dict(json.loads(json.dumps(trial.to_dict())))
    assert again == trial
    assert dict(again.limits) == {"guard": False}


def test_rows_compare_without_timings_only() -> None:
    row = {
        "trial": TRACE,
        "summary": {"recovered_cost": 1.5, "replay_seconds": 2.0, "trial_wall_s": 3.0},
    }
    slower = {
        "trial": TRACE,
        "summary": {"recovered_cost": 1.5, "replay_seconds": 9.0, "trial_wall_s": 9.0},
    }
    other = {
        "trial": TRACE,
        "summary": {"recovered_cost": 1.5000001, "replay_seconds": 2.0, "trial_wall_s": 3.0},
    }
    assert comparable([row]) == comparable([slower])
    assert comparable([row]) != comparable([other])


@pytest.mark.parametrize(
    ("limits", "says"),
    [
        ({"max_function_shares": [0.5]}, "unknown limit 'max_function_shares'"),
        ({"max_function_share": [2.0]}, "bad limit value"),
    ],
)
def test_bad_limits_name_the_problem(limits: dict[str, list[float]], says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        expand(Grid(traces=[TRACE], policies=["headroom"], seeds=[0], limits=limits))


def test_unknown_policy_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"known: .*headroom"):
        expand(Grid(traces=[TRACE], policies=["greedy"], seeds=[0]))


def test_seed_and_limit_lists() -> None:
    assert parse_seeds("0-2,5", 9) == [0, 1, 2, 5]
    assert parse_seeds(None, 9) == [9]
    with pytest.raises(ConfigError, match="bad seed list"):
        parse_seeds("a-b", 0)
    assert parse_limits(["max_function_share=0.25,0.5", "guard=false"]) == {
        "max_function_share": [0.25, 0.5],
        "guard": [False],
    }
    with pytest.raises(ConfigError, match="bad --limit"):
        parse_limits(["max_function_share"])


def test_tune_search_space() -> None:
    assert parse_space(["history_window_s=60:1800:log"]) == {
        "history_window_s": (60.0, 1800.0, True)
    }
    for bad, says in (
        ("max_function_share=1:0.1", "need LO < HI"),
        ("nope=0:1", "unknown limit 'nope'"),
        ("max_function_share=0..1", "bad --param"),
    ):
        with pytest.raises(ConfigError, match=says):
            parse_space([bad])


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["replay", "--sweep", "--limit", "bogus=1"], "unknown limit 'bogus'"),
        (["replay", "--sweep", "--seeds", "x"], "bad seed list"),
        (["tune", "--param", "max_function_share=2:1"], "need LO < HI"),
        (["tune", "--policy", "greedy"], "unknown policy greedy"),
    ],
)
def test_bad_input_is_one_line(argv: list[str], says: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "colocate", *argv], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], proc.stderr
