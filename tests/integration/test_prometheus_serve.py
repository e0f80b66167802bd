"""``colocate metrics serve`` on the dev cluster: a job's series appear while it runs and vanish
when it ends; the exposition passes ``promtool check metrics``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import require
from tests.integration.conftest import JobSubmitter, SlurmCluster, python_job

pytestmark = [pytest.mark.slurm, pytest.mark.prometheus, pytest.mark.slow]


@pytest.fixture
def exporter(slurm_cluster: SlurmCluster) -> Iterator[tuple[str, str]]:
    node = slurm_cluster.nodes[-1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "colocate",
            "metrics",
            "serve",
            "--node",
            node,
            "--listen",
            "127.0.0.1:0",
            "--interval",
            "0.5",
            "--json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else ""
        yield node, json.loads(line)["url"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        stderr = proc.stderr.read() if proc.stderr else ""
        assert "Traceback" not in stderr, stderr


def _wait_for(url: str, needle: str, present: bool, timeout_s: float = 30.0) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        text = httpx.get(url, timeout=5).text
        if (needle in text) == present:
            return text
        assert time.monotonic() < deadline, (
            f"{needle!r} {'never appeared' if present else 'never went away'}"
        )
        time.sleep(0.3)


def test_a_jobs_series_live_as_long_as_the_job(
    exporter: tuple[str, str], slurm_jobs: JobSubmitter
) -> None:
    require(shutil.which("promtool") is not None, "promtool (Debian package prometheus)")
    node, url = exporter
    job = slurm_jobs.submit(
        python_job("import time; time.sleep(120)"), f"-w{node}", "-c1", "--mem=200M"
    )
    label = f'job_id="{job.job_id}"'
    text = _wait_for(url, f"colocate_job_wasted_cost_total{{{label}", present=True)
    assert (
        f'colocate_job_memory_bytes{{{label},node="{node}",state="allocated"}} 2.097152e+08' in text
    )
    check = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert check.returncode == 0 and not check.stdout.strip(), check.stdout + check.stderr
    slurm_jobs.cancel(job)
    slurm_jobs.wait_gone(job)
    after = _wait_for(url, label, present=False)
    assert 'colocate_wasted_cost_total{node="' in after  # the node's money keeps counting
