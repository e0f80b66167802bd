"""The monitor against real jobs on the dev cluster: what a user of ``colocate monitor`` sees.

These measure CPU use: run alone (CI does). With other work on this 2-core machine the
measured ``cores_used`` of a busy job dips below 1.0.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import psutil
import pytest

from monitors.sampler import Sampler, default_source
from monitors.snapshot import JobSnapshot, NodeSnapshot
from slurm_plugin.slurm import CliSlurm
from tests.conftest import require
from tests.integration.conftest import JobSubmitter, SlurmCluster, python_job

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

MIB = 1024**2

# Holds `mib` MiB (touched), keeps `busy` threads spinning, prints nothing.
HOLD = """
import threading, time
x = bytearray({mib} * 1024 * 1024)
for i in range(0, len(x), 4096):
    x[i] = 1
def spin():
    while True:
        pass
for _ in range({busy}):
    threading.Thread(target=spin, daemon=True).start()
time.sleep(600)
"""


def hold(mib: int, busy: int) -> str:
    return python_job(HOLD.format(mib=mib, busy=busy))


def sampler_for(node: str, **kw: object) -> Sampler:
    return Sampler(node, CliSlurm(), default_source(), **kw)  # type: ignore[arg-type]


def find(snap: NodeSnapshot, job_id: str) -> JobSnapshot | None:
    return next((j for j in snap.jobs if j.job_id == job_id), None)


def settle(
    sampler: Sampler, job_id: str, min_memory: int = 0, timeout_s: float = 20.0
) -> JobSnapshot:
    """Sample until the job's processes run (past the prolog) and hold ``min_memory`` bytes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = find(sampler.sample(), job_id)
        if job is not None and job.processes >= 1 and job.memory_used_bytes >= min_memory:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} never ran with {min_memory} bytes in use")


def job_cpu_seconds(job_id: str) -> float:
    """CPU time of the job's processes now: those with SLURM_JOB_ID in their environment."""
    total = 0.0
    for p in psutil.process_iter():
        try:
            if p.environ().get("SLURM_JOB_ID") == job_id:
                t = p.cpu_times()
                total += t.user + t.system
        except psutil.Error:
            continue
    return total


def measure(sampler: Sampler, seconds: float) -> NodeSnapshot:
    sampler.sample()
    time.sleep(seconds)
    return sampler.sample()


def test_busy_job_reports_used_and_idle_cores_and_memory(
    slurm_cluster: SlurmCluster, slurm_jobs: JobSubmitter
) -> None:
    job = slurm_jobs.submit(hold(200, busy=1), "-c2", "--mem=1G")
    (node,) = job.nodes
    sampler = sampler_for(node, window_s=5.0)
    settle(sampler, job.job_id, 190 * MIB)
    sampler.sample()
    before, t0 = job_cpu_seconds(job.job_id), time.monotonic()
    time.sleep(4.0)
    snap = sampler.sample()
    truth = (job_cpu_seconds(job.job_id) - before) / (time.monotonic() - t0)
    got = find(snap, job.job_id)
    assert got is not None, snap.to_json()
    # Against the processes' own CPU time in the same window (holds on a busy machine too) ...
    assert got.cores_used == pytest.approx(truth, abs=0.08)
    # ... and against what the job does, which holds when the job gets its core (CI).
    assert got.cores_allocated == 2 and len(got.cpu_ids) == 2
    assert got.memory_allocated_bytes == 1024 * MIB
    assert got.cores_used == pytest.approx(1.0, abs=0.15)
    assert got.cores_idle == pytest.approx(1.0, abs=0.15)
    assert got.memory_used_bytes == pytest.approx(200 * MIB, rel=0.10)
    assert got.memory_unused_bytes == pytest.approx(824 * MIB, abs=20 * MIB)
    assert got.memory_peak_bytes >= got.memory_used_bytes
    assert got.processes >= 1
    assert snap.slurm_ok and snap.cores_total >= 2
    assert snap.memory_unallocated_bytes <= snap.memory_total_bytes - 1024 * MIB


def test_two_jobs_on_one_node_are_told_apart(
    slurm_cluster: SlurmCluster, slurm_jobs: JobSubmitter
) -> None:
    busy = slurm_jobs.submit(hold(100, busy=1), "-c1", "--mem=300M")
    (node,) = busy.nodes
    quiet = slurm_jobs.submit(hold(20, busy=0), "-c1", "--mem=200M", f"--nodelist={node}")
    sampler = sampler_for(node, window_s=5.0)
    settle(sampler, busy.job_id, 95 * MIB)
    snap = measure(sampler, 3.0)
    a, b = find(snap, busy.job_id), find(snap, quiet.job_id)
    assert a is not None and b is not None, snap.to_json()
    assert set(a.cpu_ids).isdisjoint(b.cpu_ids) and len(a.cpu_ids) == len(b.cpu_ids) == 1
    assert (a.memory_allocated_bytes, b.memory_allocated_bytes) == (300 * MIB, 200 * MIB)
    assert a.cores_used > 0.7 and b.cores_used < 0.2
    assert a.memory_used_bytes == pytest.approx(100 * MIB, rel=0.2)
    assert b.memory_used_bytes < 60 * MIB
    assert snap.cores_unallocated == snap.cores_total - 2


def test_a_job_that_ends_disappears_from_the_next_snapshot(
    slurm_cluster: SlurmCluster, slurm_jobs: JobSubmitter
) -> None:
    job = slurm_jobs.submit("sleep 300", "-c1", "--mem=100M")
    (node,) = job.nodes
    sampler = sampler_for(node)
    settle(sampler, job.job_id)
    slurm_jobs.cancel(job)
    slurm_jobs.wait_gone(job)
    assert find(sampler.sample(), job.job_id) is None


def test_a_multi_node_job_is_reported_on_each_of_its_nodes(
    slurm_cluster: SlurmCluster, slurm_jobs: JobSubmitter
) -> None:
    if len(slurm_cluster.nodes) < 2:
        pytest.skip("needs two nodes: colocate dev-cluster up --nodes 3")
    job = slurm_jobs.submit("srun sleep 300", "-N2", "-c1", "--mem=100M")
    assert len(job.nodes) == 2
    for node in job.nodes:
        got = settle(sampler_for(node), job.job_id)
        assert got.cores_allocated == 1 and got.memory_allocated_bytes == 100 * MIB
        assert got.processes >= 1 and set(got.nodes) == set(job.nodes)


def test_slurm_down_keeps_sampling_with_last_known_jobs(
    slurm_cluster: SlurmCluster, slurm_jobs: JobSubmitter, tmp_path: Path
) -> None:
    job = slurm_jobs.submit("sleep 300", "-c1", "--mem=100M")
    (node,) = job.nodes
    down = {"on": False}
    bad_conf = tmp_path / "slurm.conf"
    bad_conf.write_text("this is not a slurm.conf\n")  # Slurm's tools then fail at once
    calls: list[str] = []

    def runner(argv: Sequence[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
        calls.append(" ".join(argv))
        # Down: Slurm's own tools, pointed at a broken config.
        env = {**os.environ, "SLURM_CONF": str(bad_conf)} if down["on"] else None
        return subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout_s, check=False, env=env
        )

    sampler = Sampler(node, CliSlurm(runner), default_source(), slurm_refresh_s=0.0)
    settle(sampler, job.job_id)
    down["on"] = True
    snap = sampler.sample()
    assert not snap.slurm_ok
    assert find(snap, job.job_id) is not None, "a live job must stay visible while Slurm is down"
    assert any("Slurm unavailable" in w for w in snap.warnings)
    before = len(calls)
    sampler.sample()  # inside the backoff delay: Slurm is not asked again
    assert len(calls) == before
    down["on"] = False
    time.sleep(sampler.backoff.delay_s + 0.1)
    assert sampler.sample().slurm_ok


def test_monitor_once_json_has_the_contract(
    slurm_cluster: SlurmCluster, slurm_jobs: JobSubmitter
) -> None:
    job = slurm_jobs.submit("sleep 300", "-c1", "--mem=100M")
    (node,) = job.nodes
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "colocate.cli",
            "monitor",
            "--node",
            node,
            "--once",
            "--json",
            "--interval",
            "0.5",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    for key in (
        "node",
        "cores_total",
        "memory_total_bytes",
        "cores_unallocated",
        "memory_unallocated_bytes",
        "jobs",
    ):
        assert key in data
    got = next(j for j in data["jobs"] if j["job_id"] == job.job_id)
    for key in (
        "job_id",
        "user",
        "cores_allocated",
        "cpu_ids",
        "cores_used",
        "cores_idle",
        "memory_allocated_bytes",
        "memory_used_bytes",
        "memory_peak_bytes",
        "memory_unused_bytes",
    ):
        assert key in got
    assert got["user"] == "root" and got["cores_allocated"] == 1


def test_monitor_names_known_nodes_for_a_wrong_node(slurm_cluster: SlurmCluster) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "colocate.cli", "monitor", "--node", "no-such-node", "--once"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert "no-such-node" in proc.stderr and slurm_cluster.nodes[0] in proc.stderr
    assert "Traceback" not in proc.stderr


def test_monitor_keeps_answering_when_slurm_is_down(tmp_path: Path) -> None:
    require(shutil.which("squeue") is not None, "Slurm's tools are not installed")
    broken = tmp_path / "slurm.conf"
    broken.write_text("not a slurm.conf\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "colocate.cli",
            "monitor",
            "--node",
            "n1",
            "--once",
            "--json",
            "--interval",
            "0.2",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "SLURM_CONF": str(broken)},
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["slurm_ok"] is False and data["cores_total"] >= 1
    assert any("Slurm unavailable" in w for w in data["warnings"])
