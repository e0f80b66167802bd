"""Per-job pressure (PSI) on this cgroup v1 machine through opt-in unified-hierarchy groups."""

from __future__ import annotations

import time

import pytest

from monitors.cgroup_v1 import CgroupV1Source
from monitors.psi_groups import PsiGroups
from monitors.sampler import Sampler, default_source
from slurm_plugin.slurm import CliSlurm
from tests.conftest import require
from tests.integration.conftest import JobSubmitter, SlurmCluster, python_job

pytestmark = [pytest.mark.slurm, pytest.mark.root, pytest.mark.slow]

# Two spinning threads on the job's single core: they wait for each other, the kernel
# records CPU pressure for the job.
CONTEND = """
import threading
def spin():
    while True:
        pass
threading.Thread(target=spin, daemon=True).start()
spin()
"""


def test_a_job_fighting_over_its_core_shows_cpu_pressure(
    slurm_cluster: SlurmCluster, slurm_jobs: JobSubmitter
) -> None:
    require(PsiGroups.available(), "needs root and cgroup2 with PSI at /sys/fs/cgroup/unified")
    job = slurm_jobs.submit(python_job(CONTEND), "-c1", "--mem=100M")
    (node,) = job.nodes
    without = Sampler(node, CliSlurm(), CgroupV1Source())
    sampler = Sampler(node, CliSlurm(), default_source(psi_groups=True))
    pressure = None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        got = next((j for j in sampler.sample().jobs if j.job_id == job.job_id), None)
        pressure = got.cpu_pressure if got else None
        if pressure is not None and pressure > 5.0:
            break
        time.sleep(0.5)
    assert pressure is not None and pressure > 5.0
    group = PsiGroups().group(node, job.job_id)
    assert group.is_dir()
    plain = next(j for j in without.sample().jobs if j.job_id == job.job_id)
    assert plain.cpu_pressure is not None  # a monitor without the option finds the group too
    slurm_jobs.cancel(job)
    slurm_jobs.wait_gone(job)
    sampler.sample()
    assert not group.exists()  # the ended job's group is removed
