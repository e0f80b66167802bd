"""``colocate replay`` as a user runs it: a real process, bundled traces, files on disk."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "traces"
CONTRACT = {
    "recovered_core_hours",
    "recovered_memory_gib_hours",
    "wasted_cost",
    "recovered_cost",
    "faas_invocations_total",
    "faas_invocations_served",
    "faas_invocations_rejected",
    "evictions",
    "interference_violation_hours",
    "replay_seconds",
}


def colocate(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "colocate", "replay", *args],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=cwd,
    )


def test_help_lists_the_options() -> None:
    proc = colocate("--help")
    assert proc.returncode == 0
    for option in ("--jobs", "--faas", "--nodes", "--policy", "--seed", "--out", "--json"):
        assert option in proc.stdout


@pytest.mark.slow
def test_no_arguments_compares_every_policy_on_the_bundled_traces(tmp_path: Path) -> None:
    from policies import POLICIES

    proc = colocate("--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    for name in POLICIES:
        assert name in proc.stdout
    assert "wasted:" in proc.stdout
    assert "\r" not in proc.stderr  # no progress bar when stderr is not a terminal
    for name in (
        "report.json",
        "report.md",
        "harvest.png",
        "money.png",
        "evictions.png",
        "metrics-series.json",
    ):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert (tmp_path / "out" / "harvest.png").read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "out" / "report.md").read_text()
    assert "Measured and modelled" in md and "Citations" in md
    # the what-if history loads into Prometheus under the live agent's metric names
    om = subprocess.run(
        [
            sys.executable,
            "-m",
            "colocate",
            "metrics",
            "openmetrics",
            "--replay-out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert om.returncode == 0, om.stderr
    assert "colocate_recovered_cost" in om.stdout and om.stdout.rstrip().endswith("# EOF")


@pytest.mark.slow
def test_json_output_follows_the_contract() -> None:
    proc = colocate("--json", "--policy", "unallocated", "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert {"cluster", "jobs_trace", "faas_trace", "policies"} <= set(report)
    assert list(report["policies"]) == ["unallocated"]
    assert set(report["policies"]["unallocated"]) >= CONTRACT
    assert report["cluster"]["nodes"] == 120 and report["cluster"]["cores_per_node"] == 2


def test_sacct_history_with_a_cluster_shape(tmp_path: Path) -> None:
    proc = colocate(
        "--jobs", str(FIXTURES / "sacct_22.05_pipe.txt"),
        "--faas", str(Path(__file__).resolve().parents[2] / "traces" / "data" / "azure2019"),
        "--nodes", "2", "--cores-per-node", "8", "--memory-per-node", "32GiB",
        "--policy", "unallocated", "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["jobs_trace"]["format"] == "sacct-pipe"
    assert report["jobs_trace"]["jobs_placed"] == 3


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("--jobs", "/no/such/trace.swf"), "no such file"),
        (("--policy", "nonsense"), "unknown policy nonsense"),
        (("--jobs", str(FIXTURES / "sacct_22.05.json")), "--nodes"),
        (("--faas", str(FIXTURES / "sacct_22.05_pipe.txt")), "not a FaaS trace"),
    ],
)
def test_bad_input_is_one_line_and_exit_1(args: tuple[str, ...], says: str) -> None:
    proc = colocate(*args)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert says in lines[0]
    assert "Traceback" not in proc.stderr


def test_model_settings_come_from_a_toml_file(tmp_path: Path) -> None:
    models = tmp_path / "models.toml"
    models.write_text("[usage]\nramp_fraction = 0.3\n[interference]\nmemory_bound_fraction = 0.2\n")
    proc = colocate("--models", str(models), "--policy", "unallocated", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["models"]["usage"]["ramp_fraction"] == 0.3
    assert report["models"]["interference"]["memory_bound_fraction"] == 0.2
    models.write_text("[usage]\nramp_fraction = 3\n")
    proc = colocate("--models", str(models))
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"colocate replay: error: {models}:usage.ramp_fraction: Input should be less than or equal to 1"
    )


def test_capacity_per_policy_in_report_json_and_a_plot(tmp_path: Path) -> None:
    """`--capacity` on a small SWF: report.json gains each policy's capacity and the curve
    points it was found from; capacity.png is written."""
    rows = [
        f"{i} {i * 600} 0 {3600 + 60 * (i % 5)} 2 {1800 + 300 * (i % 4)} 65536 2 7200 -1 1 1 1 -1 1 1 -1 -1"
        for i in range(1, 40)
    ]
    swf = tmp_path / "small.swf"
    swf.write_text("; MaxNodes: 4\n; MaxProcs: 16\n" + "\n".join(rows) + "\n")
    out = tmp_path / "out"
    proc = colocate(
        "--jobs", str(swf), "--memory-per-node", "8GiB", "--capacity", "--out", str(out)
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    capacity = report["capacity"]
    assert capacity["target_served_share"] == 0.99
    assert set(capacity["capacity_faas_scale"]) == set(report["policies"])
    for name, scale in capacity["capacity_faas_scale"].items():
        assert report["policies"][name]["capacity_faas_scale"] == scale
        curve = capacity["curves"][name]
        served_at = {p["faas_scale"]: p["served_share"] for p in curve}
        if scale > 0:
            assert served_at[scale] >= 0.99
        assert min(p["served_share"] for p in curve) < 0.99  # the search went past it
    assert (out / "capacity.png").stat().st_size > 0
    assert "capacity headroom" in proc.stdout or "headroom" not in report["policies"]


def test_a_bad_capacity_target_is_one_line() -> None:
    proc = colocate("--capacity", "--capacity-target", "2")
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "--capacity-target" in proc.stderr
