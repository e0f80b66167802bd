"""The broker load generator as a user runs it: a real broker, simulated agents on the real
reporting path, the real Client; one JSON object out."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require
from tests.integration.leasing import munged_running

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_load_run_then_a_killed_broker_costs_the_client_errors() -> None:
    require(
        munged_running(), "munged is not running; the Client needs it (colocate dev-cluster up)"
    )
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "broker_load.py"),
            "--nodes",
            "8",
            "--seconds",
            "8",
            "--kill-broker-at",
            "4",
            "--change-every",  # a change every ~4 s (default ~600 s): changes seen in 8 s
            "4",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in (
        "nodes",
        "grant_p50_ms",
        "grant_p99_ms",
        "offer_staleness_p99_s",
        "client_errors",
        "double_grants",
        "broker_cpu_pct",
        "broker_rss_mib",
    ):
        assert key in out
    assert out["nodes"] == 8
    # before the kill: leases granted through the real Client, every core granted once, and
    # the agents' offer changes reached the broker (within seconds on a loaded machine)
    assert out["grants"] > 0 and out["grant_p50_ms"] > 0
    assert out["double_grants"] == 0
    assert out["offer_changes_seen"] > 0 and 0 < out["offer_staleness_p99_s"] < 10
    assert out["reports_per_s"] > 0 and 20 < out["broker_rss_mib"] < 1000
    # after it: one broker is a single point of failure, and the client says so
    assert out["broker_killed_at_s"] is not None
    assert out["client_errors"] > 0 and set(out["client_error_kinds"]) == {"BackendUnavailable"}


@pytest.mark.slow
@pytest.mark.root
def test_two_brokers_one_killed_cost_the_client_nothing() -> None:
    """``--brokers 2``: the agents report to both, the client fails over by itself; the first
    broker (every client's first choice) is SIGKILLed halfway."""
    require(
        munged_running(), "munged is not running; the Client needs it (colocate dev-cluster up)"
    )
    argv = [sys.executable, str(ROOT / "benchmarks" / "broker_load.py"), "--nodes", "8",
            "--seconds", "8", "--brokers", "2", "--kill-broker-at", "4", "--json"]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["brokers"] == 2 and out["broker_killed_at_s"] is not None
    assert out["client_errors"] == 0, out["client_error_kinds"]
    assert out["double_grants"] == 0
    assert out["grants_after_kill"] > 0  # the surviving broker kept granting
    assert out["client_retries"] >= 1 and out["client_most_retries_of_one_call"] <= 1
