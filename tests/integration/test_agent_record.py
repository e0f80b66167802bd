"""A live run of the Slurm agent on the dev cluster, recorded (``agent.record_file``) and
replayed with ``colocate replay --from-agent-log``: every decision the agent made, with a
real job's usage history and a real lease on its idle core, is decided again identically."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from slurm_plugin.agent.recorder import read_log
from tests.conftest import require
from tests.integration.conftest import JobSubmitter, SlurmCluster
from tests.integration.leasing import Service, wait_until
from tests.integration.slurm_agent import (
    HALF_BUSY,
    SlurmAgent,
    idle_node,
    job_script,
    lease_when_offered,
    start_slurm_agent,
)

pytestmark = [pytest.mark.slurm, pytest.mark.root, pytest.mark.slow]


def test_a_recorded_live_run_replays_with_identical_decisions(
    tmp_path: Path,
    broker: Service,
    jobs: JobSubmitter,
    slurm_cluster: SlurmCluster,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    require(os.geteuid() == 0, "the Slurm agent needs root (cgroups, control socket under /run)")
    record = tmp_path / "decisions.jsonl"
    monkeypatch.setenv("COLOCATE_AGENT__RECORD_FILE", str(record))  # the agent inherits it
    node = idle_node(slurm_cluster)
    agent: SlurmAgent = start_slurm_agent(tmp_path, broker, node)
    try:
        job = jobs.submit(job_script(HALF_BUSY), "-w", node, "-c2", "--mem=300M")
        lease = lease_when_offered(broker, agent)
        try:
            with lease.executor() as executor:
                assert executor.invoke(sum, [1, 2]) == 3
        finally:
            lease.release()
        # at least 10 decisions, however slow a loaded machine makes the loop
        wait_until(
            lambda: record.exists() and record.read_text().count("\n") >= 11,
            30,
            "ten decisions recorded",
        )
    finally:
        agent.service.stop()
        shutil.rmtree(agent.state_dir, ignore_errors=True)
    assert "Traceback" not in agent.service.logs(), agent.service.logs()

    policy, _, decisions = read_log(record)
    records = list(decisions)
    assert policy == "headroom"
    assert len(records) >= 10
    # the record holds what the agent saw: the job with its usage history, and the lease
    assert any(j.job_id == job.job_id and len(j.history) >= 2 for r in records for j in r.view.jobs)
    assert any(r.view.leases for r in records)
    out = subprocess.run(
        [sys.executable, "-m", "colocate", "replay", "--from-agent-log", str(record), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(out.stdout)
    assert result["decisions"] == len(records)
    assert result["identical"] == result["decisions"], result["mismatches"]
