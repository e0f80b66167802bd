"""The psutil fallback against real processes: the three ways a process is tied to a job,
and agreement with the cgroup source on a real Slurm job."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from monitors.cgroup_v1 import CgroupV1Source
from monitors.procscan import ProcessScanSource
from tests.integration.conftest import JobSubmitter, SlurmCluster


@pytest.fixture
def spawned() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        p.kill()
        p.wait()


def test_a_process_with_slurm_job_id_in_its_environment_counts_for_that_job(
    spawned: list[subprocess.Popen[bytes]],
) -> None:
    env = {**os.environ, "SLURM_JOB_ID": "987654", "SLURMD_NODENAME": "nX"}
    spawned.append(subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60 & wait"], env=env))
    spawned.append(
        subprocess.Popen(
            ["sleep", "60"], env={**env, "SLURM_JOB_ID": "987655", "SLURMD_NODENAME": "other"}
        )
    )
    time.sleep(0.3)
    reading = ProcessScanSource().read("nX")
    job = reading.jobs["987654"]
    assert job.processes == 3 and job.memory_bytes > 0 and job.source == "psutil"
    assert "987655" not in reading.jobs  # it runs under another node's slurmd


def test_cpu_time_of_a_busy_job_process_grows(spawned: list[subprocess.Popen[bytes]]) -> None:
    env = {**os.environ, "SLURM_JOB_ID": "987656"}
    spawned.append(subprocess.Popen(["python3", "-c", "while True: pass"], env=env))
    source = ProcessScanSource()
    time.sleep(0.2)
    first = source.read("nX").jobs["987656"].cpu_seconds_total
    time.sleep(1.0)
    assert source.read("nX").jobs["987656"].cpu_seconds_total - first > 0.2


def test_descendants_of_a_slurmstepd_belong_to_its_job(
    spawned: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    stepd = tmp_path / "slurmstepd"  # a shell named like slurmstepd, with its title
    shutil.copy("/bin/sh", stepd)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    spawned.append(
        subprocess.Popen(
            ["slurmstepd: [424242.batch]", "-c", "sleep 60 & wait"], executable=stepd, env=env
        )
    )
    time.sleep(0.3)
    job = ProcessScanSource().read("nX").jobs["424242"]
    assert job.processes == 1  # the sleep; slurmstepd itself is not the job's


@pytest.mark.slurm
def test_fallback_and_cgroups_agree_on_a_real_job(
    slurm_cluster: SlurmCluster, slurm_jobs: JobSubmitter
) -> None:
    job = slurm_jobs.submit("sleep 300 & sleep 300 & wait", "-c1", "--mem=100M")
    (node,) = job.nodes
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        cg = CgroupV1Source().read(node).jobs.get(job.job_id)
        if cg is not None and cg.processes >= 3:
            break
        time.sleep(0.2)
    scan = ProcessScanSource().read(node).jobs[job.job_id]
    assert cg is not None and scan.processes == cg.processes == 3
    assert scan.memory_bytes > 0 and cg.memory_bytes > 0
