"""The standalone ``colocate monitor`` and ``colocate metrics serve`` show each job's
``--colocate`` choice as the agent applies it: read from the job-choice files the dev cluster's
real prolog hook writes (``/run/colocate/jobs/<job>@<node>.json``), not "allow" for everyone."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from slurm_plugin.hooks import read_job_choices
from tests.integration.conftest import JobSubmitter, SlurmCluster, SubmittedJob, python_job

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

CHOICES = Path("/run/colocate/jobs")  # jobs/ next to the default [agent] control_socket
SLEEP = python_job("import time; time.sleep(120)")


def colocate(*args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "colocate", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


@pytest.fixture
def two_jobs(
    slurm_cluster: SlurmCluster, slurm_jobs: JobSubmitter
) -> Iterator[tuple[str, SubmittedJob, SubmittedJob]]:
    """One job that said --colocate=deny and one that said allow, on the same node, once the
    prolog has left their choice files."""
    node = slurm_cluster.nodes[-1]
    deny = slurm_jobs.submit(SLEEP, f"-w{node}", "-c1", "--mem=100M", "--colocate=deny")
    allow = slurm_jobs.submit(SLEEP, f"-w{node}", "-c1", "--mem=100M", "--colocate=allow")
    deadline = time.monotonic() + 20
    while True:
        seen = read_job_choices(CHOICES, node)
        if {int(deny.job_id), int(allow.job_id)} <= set(seen):
            break
        assert time.monotonic() < deadline, f"the prolog left no choice files in {CHOICES}"
        time.sleep(0.2)
    assert seen[int(deny.job_id)].colocate == "deny"  # the file as the hook wrote it
    yield node, deny, allow


def test_monitor_json_shows_the_jobs_choice(
    two_jobs: tuple[str, SubmittedJob, SubmittedJob], tmp_path: Path
) -> None:
    node, deny, allow = two_jobs
    out = colocate("monitor", "--node", node, "--once", "--json", "--interval", "0.2")
    assert out.returncode == 0, out.stderr
    jobs = {j["job_id"]: j for j in json.loads(out.stdout)["jobs"]}
    assert jobs[deny.job_id]["colocate"] is False
    assert jobs[allow.job_id]["colocate"] is True
    # Pointed at a folder without the files, the monitor can only show the site default.
    empty = colocate(
        "monitor", "--node", node, "--once", "--json", "--interval", "0.2",
        "--choices", str(tmp_path),
    )  # fmt: skip
    assert empty.returncode == 0, empty.stderr
    shown = {j["job_id"]: j["colocate"] for j in json.loads(empty.stdout)["jobs"]}
    assert shown[deny.job_id] is True


def test_exporter_labels_the_job_deny(two_jobs: tuple[str, SubmittedJob, SubmittedJob]) -> None:
    node, deny, allow = two_jobs
    proc = subprocess.Popen(
        [sys.executable, "-m", "colocate", "metrics", "serve", "--node", node,
         "--listen", "127.0.0.1:0", "--interval", "0.5", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else ""
        url = json.loads(line)["url"]
        wanted = (
            f'colocate_job_info{{colocate="deny",job_id="{deny.job_id}",node="{node}"',
            f'colocate_job_info{{colocate="allow",job_id="{allow.job_id}",node="{node}"',
        )
        deadline = time.monotonic() + 30
        while True:
            text = httpx.get(url, timeout=5).text
            if all(w in text for w in wanted):
                break
            assert time.monotonic() < deadline, f"never scraped {wanted}:\n{text[-3000:]}"
            time.sleep(0.3)
        assert f'colocate="allow",job_id="{deny.job_id}"' not in text
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        stderr = proc.stderr.read() if proc.stderr else ""
        assert "Traceback" not in stderr, stderr
