"""A site's interference table (policies.interference) and the places that read it: the
guard's share cap (in the agent as built by open_agent), the replay's model and
`colocate replay --interference`, and the calibration statistics."""

from __future__ import annotations

import contextlib
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from colocate.calibrate.stats import summarize, window_ratio
from colocate.config import AgentConfig, Config, load_interference_table
from colocate.errors import ConfigError
from policies import JobView, NodeView, UsageSample, get_policy
from policies.interference import (
    FORMAT,
    IPDPS24,
    InterferenceTable,
    guarded_limits,
    max_function_share,
)
from policies.limits import Limits
from traces import bundled
from traces.azure import read_azure2019
from traces.interference import InterferenceModel
from traces.placement import Cluster
from traces.replay import replay
from traces.swf import read_swf

GIB = 1024**3


def table(slowdown: float, ci: float = 0.02) -> dict[str, Any]:
    """Every kernel x function cell at ``slowdown`` (ratio), measured on half a node."""
    return {
        "format": FORMAT,
        "function_share": 0.5,
        "cells": [
            {
                "kernel": kernel,
                "kind": kind,
                "function": fn,
                "slowdown": slowdown,
                "ci_low": slowdown - ci,
                "ci_high": slowdown + ci,
                "n": 5,
            }
            for kernel, kind in (
                ("stream", "memory_bandwidth"),
                ("matmul", "compute"),
                ("chase", "cache_latency"),
            )
            for fn in ("compress", "bfs", "image")
        ],
    }


BIG = InterferenceTable.from_mapping(table(1.6))  # functions make jobs 60 % slower
MILD = InterferenceTable.from_mapping(table(1.01))


def test_the_table_round_trips_and_looks_up_cells() -> None:
    data = table(1.2)
    data["cells"][0].update(slowdown=1.5, ci_low=1.4, ci_high=1.6)
    parsed = InterferenceTable.from_mapping(data)
    assert InterferenceTable.from_mapping(parsed.to_mapping()) == parsed
    assert parsed.lookup("stream", "compress").slowdown == 1.5
    assert parsed.lookup("memory_bandwidth", "bfs").slowdown == 1.2
    # an unmeasured function: the kernel's worst cell
    assert parsed.lookup("stream", "video").slowdown == 1.5
    with pytest.raises(KeyError, match="known: cache_latency, chase, compute"):
        parsed.lookup("lulesh")
    assert parsed.class_ranges()["memory_bound"] == pytest.approx((0.18, 0.6))
    assert parsed.class_ranges()["compute_bound"] == pytest.approx((0.18, 0.22))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format": "v0"}, "format 'v0' is not"),
        ({"function_share": 0}, "function_share must be"),
        ({"cells": []}, "cells must be a non-empty list"),
        ({"cell0": {"kind": "gpu"}}, r"cells\[0\].kind: 'gpu' is not one of"),
        ({"cell0": {"slowdown": -1.0}}, r"cells\[0\].slowdown: expected a ratio > 0"),
        ({"cell0": {"ci_low": 1.5}}, r"cells\[0\]: expected ci_low <= slowdown <= ci_high"),
        ({"cell0": {"n": 1.5}}, r"cells\[0\].n: expected a whole number"),
        ({"cell0": {"function": "bfs"}}, r"cells\[1\]: a second cell for kernel 'stream' x 'bfs'"),
    ],
)
def test_a_bad_table_names_the_field(change: dict[str, Any], message: str) -> None:
    data = table(1.1)
    cell = change.pop("cell0", None)
    data.update(change)
    if cell:
        data["cells"][0].update(cell)
    with pytest.raises(ValueError, match=message):
        InterferenceTable.from_mapping(data)


def test_loading_a_bad_file_is_one_config_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"cannot read the interference table.*colocate calibrate"
    ):
        load_interference_table(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**table(1.1), "function_share": 2}))
    with pytest.raises(ConfigError, match=f"^{bad}: function_share must be"):
        load_interference_table(bad)
    good = tmp_path / "good.json"
    good.write_text(json.dumps(table(1.1)))
    assert load_interference_table(good).typical_slowdown() == pytest.approx(0.1)


def test_the_published_figures_are_the_replay_default_and_leave_the_guard_alone() -> None:
    assert InterferenceModel.from_table(IPDPS24) == InterferenceModel()
    assert guarded_limits(Limits(), IPDPS24) == Limits()
    # a big measured slowdown: functions may hold only budget / slowdown of the half node
    assert max_function_share(BIG, 0.05) == pytest.approx(0.05 * 0.5 / 0.6)
    assert max_function_share(InterferenceTable.from_mapping(table(1.0, 0.0)), 0.05) == 1.0


def busy_job(t: float) -> JobView:
    """A 2-core job using one core for 60 s; 8 GiB, peak 1 GiB."""
    history = tuple(UsageSample(s, 1.0, GIB) for s in range(0, int(t) + 1, 5))
    return JobView("A", frozenset({0, 1}), 8 * GIB, GIB, history)


def test_the_guard_refuses_to_lend_where_the_table_says_functions_hurt() -> None:
    view = NodeView("n1", frozenset({0, 1}), 16 * GIB, (busy_job(60.0),), ())
    policy = get_policy("headroom")
    default = policy.decide(view, Limits(), 60.0, None)
    assert default.offer.cpu_ids == {1}  # the idle core is lent by default
    mild = policy.decide(view, guarded_limits(Limits(), MILD), 60.0, None)
    assert mild.offer.cpu_ids == {1}
    big = policy.decide(view, guarded_limits(Limits(), BIG), 60.0, None)
    assert big.offer.cpu_ids == frozenset()
    assert big.offer.memory_bytes < default.offer.memory_bytes


def test_the_agent_built_with_a_table_guards_with_it(tmp_path: Path) -> None:
    from slurm_plugin.agent.daemon import open_agent
    from slurm_plugin.agent.node_source import StandaloneNode

    path = tmp_path / "table.json"
    path.write_text(json.dumps(BIG.to_mapping()))
    built = []
    for interference_table in (None, str(path)):
        agent_config = AgentConfig(
            listen="127.0.0.1:0",
            state_dir=str(tmp_path / f"state{len(built)}"),
            interference_table=interference_table,
        )
        with contextlib.ExitStack() as stack:
            source = StandaloneNode("n1", frozenset({0, 1}), 4 * GIB)
            agent, sock, _ = open_agent(
                stack, Config(), agent_config, b"k" * 32, "n1", source, get_policy("headroom")
            )
            stack.callback(sock.close)
            built.append(agent.limits.max_function_share)
    assert built[0] == Limits().max_function_share
    assert built[1] == pytest.approx(max_function_share(BIG, Limits().slowdown_budget))


def violations(model: InterferenceModel, limits: Limits) -> float:
    result = replay(
        read_swf(bundled.HPC2N_EXCERPT),
        read_azure2019(bundled.AZURE2019),
        Cluster(bundled.HPC2N_NODES, bundled.HPC2N_CORES_PER_NODE, bundled.HPC2N_MEMORY_PER_NODE),
        ["headroom"],
        limits=limits,
        interference=model,
        seed=3,
    )
    return float(result.policies["headroom"].summary["interference_violation_hours"])


def test_the_replay_counts_the_harm_a_measured_table_predicts() -> None:
    # Without the guard (what the policies would do unguarded), a table with a big slowdown
    # counts violations where the published figures count fewer; the guard capped by the
    # table then keeps functions off nodes with jobs.
    unguarded = Limits(guard=False)
    default = violations(InterferenceModel(), unguarded)
    big = violations(InterferenceModel.from_table(BIG), unguarded)
    assert big > 2 * default
    assert violations(InterferenceModel.from_table(BIG), guarded_limits(Limits(), BIG)) == 0.0


def test_replay_cli_reads_the_table(tmp_path: Path) -> None:
    path = tmp_path / "table.json"
    path.write_text(json.dumps(BIG.to_mapping()))
    cli = [sys.executable, "-m", "colocate", "replay", "--policy", "headroom", "--json"]
    out = subprocess.run(
        [*cli, "--interference", str(path)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["models"]["interference"]["memory_bound_range"] == pytest.approx([0.58, 0.62])
    assert report["limits"]["max_function_share"] == pytest.approx(0.05 * 0.5 / 0.6)
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    out = subprocess.run(
        [*cli, "--interference", str(bad)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert f"{bad}: not JSON" in out.stderr


def test_window_ratios_use_the_iterations_inside_each_window() -> None:
    # 0.1 s iterations alone in [0, 1], 0.15 s (wall) with the function in [2, 3]; one
    # iteration straddling a window's edge is left out; CPU time grew only 10 %.
    alone = [(0.1 * i, 0.1 * i + 0.1, 0.1) for i in range(10)]
    with_ = [(2.0 + 0.15 * i, 2.0 + 0.15 * i + 0.15, 0.11) for i in range(6)]
    straddle = [(0.95, 2.05, 1.1)]
    iterations = alone + straddle + with_
    assert window_ratio(iterations, (2.0, 3.0), (0.0, 1.0)) == pytest.approx(1.5)
    assert window_ratio(iterations, (2.0, 3.0), (0.0, 1.0), cpu=True) == pytest.approx(1.1)
    assert window_ratio(iterations, (5.0, 6.0), (0.0, 1.0)) is None


def test_summary_is_a_geometric_mean_with_a_t_interval_above_zero() -> None:
    mean, low, high, n = summarize([1.1, 1.2, 1.3])
    assert mean == pytest.approx((1.1 * 1.2 * 1.3) ** (1 / 3))
    logs = [math.log(x) for x in (1.1, 1.2, 1.3)]
    sd = math.sqrt(sum((x - sum(logs) / 3) ** 2 for x in logs) / 2)
    assert high == pytest.approx(mean * math.exp(4.303 * sd / math.sqrt(3)))
    assert 0 < low < 1.1 and high > 1.3 and n == 3
    assert summarize([1.2]) == (pytest.approx(1.2), pytest.approx(1.2), pytest.approx(1.2), 1)
    # two wildly different repeats: a wide interval, never below zero
    assert 0 < summarize([0.5, 3.0])[1] < 0.5
