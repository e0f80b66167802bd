"""``colocate dev-cluster`` on this machine: status, an idempotent fast ``up``, hooks wired.

``down`` is not exercised here: other tests share the running cluster.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_plugin.devcluster import DEFAULT_STATE_DIR
from tests.integration.conftest import JobSubmitter, SlurmCluster, slurm

pytestmark = pytest.mark.slurm


def colocate(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "colocate.cli", "dev-cluster", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def status() -> dict[str, object]:
    proc = colocate("status", "--json")
    assert proc.returncode == 0, proc.stderr
    data: dict[str, object] = json.loads(proc.stdout)
    return data


def test_status_shows_every_daemon_running(slurm_cluster: SlurmCluster) -> None:
    data = status()
    daemons = {d["name"]: d for d in data["daemons"]}  # type: ignore[attr-defined, index]
    assert {"munged", "slurmctld"} <= set(daemons)
    assert all(d["running"] for d in daemons.values())
    assert set(data["nodes"]) >= set(slurm_cluster.nodes)  # type: ignore[arg-type]
    assert "n1" in str(data["sinfo"])


def test_up_again_is_fast_and_restarts_nothing(slurm_cluster: SlurmCluster) -> None:
    before = status()
    t0 = time.monotonic()
    proc = colocate("up", "--nodes", str(len(before["nodes"])), "--json")  # type: ignore[arg-type]
    took = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    after = json.loads(proc.stdout)
    pids = lambda s: {d["name"]: d["pid"] for d in s["daemons"]}  # noqa: E731
    assert pids(after) == pids(before)
    assert took < 5.0


def test_slurm_runs_the_hook_wrappers_and_they_never_drain_a_node(
    slurm_cluster: SlurmCluster, slurm_jobs: JobSubmitter
) -> None:
    config = slurm("scontrol", "show", "config").stdout
    assert f"{DEFAULT_STATE_DIR}/prolog.sh" in config and "Alloc" in config
    log = Path(DEFAULT_STATE_DIR) / "log" / "hook.log"
    size = log.stat().st_size if log.exists() else 0
    job = slurm_jobs.submit("true", "-c1", "--mem=50M", wait_running=False)
    slurm_jobs.wait_gone(job.job_id, timeout_s=60)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (not log.exists() or log.stat().st_size == size):
        time.sleep(0.1)
    assert log.exists() and log.stat().st_size > size, "the prolog/epilog wrappers did not run"
    states = slurm("sinfo", "-h", "-N", "-o", "%T").stdout.split()
    assert not any(s.startswith("drain") for s in states)
