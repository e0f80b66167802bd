"""Fixtures for tests against the real dev cluster (``colocate dev-cluster up --nodes 3``).

- ``slurm_cluster`` (session): skips locally / fails in CI unless Slurm answers with
  responsive nodes; yields a ``SlurmCluster`` with the node names.
- ``slurm_jobs``: a ``JobSubmitter`` whose jobs are cancelled when the test ends::

      def test_x(slurm_jobs):
          job = slurm_jobs.submit("sleep 30", "-c1", "--mem=100M")   # waits until RUNNING
          assert job.nodes == ("n1",)
          slurm_jobs.cancel(job)                                   # optional
          slurm_jobs.wait_gone(job)

Jobs run as root on this machine; ``python_job(code)`` builds a ``--wrap`` command running
``code`` with this test's Python interpreter.
"""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from slurm_plugin.slurm import expand_hostlist
from tests.conftest import require

if TYPE_CHECKING:
    from tests.integration.leasing import Service
    from tests.integration.slurm_agent import SlurmAgent

HOLDING = {"RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED"}


def slurm(*argv: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run a Slurm command; never raises for a non-zero exit (check ``returncode``)."""
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)


@dataclass(frozen=True)
class SubmittedJob:
    job_id: str
    nodes: tuple[str, ...] = ()


def job_state(job_id: str) -> str | None:
    """Slurm's state of the job (RUNNING, PENDING, ...), or None once squeue forgets it."""
    out = slurm("squeue", "-h", "-j", job_id, "-o", "%T").stdout.strip()
    return out or None


def job_nodes(job_id: str) -> tuple[str, ...]:
    return expand_hostlist(slurm("squeue", "-h", "-j", job_id, "-o", "%N").stdout.strip())


def python_job(code: str) -> str:
    """A shell command running ``code`` with the test's Python (for ``--wrap``)."""
    return f"{shlex.quote(sys.executable)} -c {shlex.quote(code)}"


@dataclass
class SlurmCluster:
    nodes: tuple[str, ...]


@dataclass
class JobSubmitter:
    """Submits jobs with sbatch and cancels all of them at teardown."""

    submitted: list[str] = field(default_factory=list)

    def submit(
        self, command: str, *sbatch_args: str, wait_running: bool = True, timeout_s: float = 60.0
    ) -> SubmittedJob:
        proc = slurm("sbatch", "--parsable", "-o", "/dev/null", *sbatch_args, "--wrap", command)
        assert proc.returncode == 0, f"sbatch failed: {proc.stderr.strip()}"
        job_id = proc.stdout.strip().split(";")[0]
        self.submitted.append(job_id)
        if not wait_running:
            return SubmittedJob(job_id)
        self.wait_state(job_id, {"RUNNING"}, timeout_s)
        return SubmittedJob(job_id, job_nodes(job_id))

    def wait_state(self, job_id: str, states: set[str], timeout_s: float = 60.0) -> str:
        deadline = time.monotonic() + timeout_s
        state = None
        while time.monotonic() < deadline:
            state = job_state(job_id)
            if state in states:
                return state
            if state is None or state in {
                "FAILED",
                "CANCELLED",
                "TIMEOUT",
                "OUT_OF_MEMORY",
                "NODE_FAIL",
            }:
                break
            time.sleep(0.1)
        raise AssertionError(
            f"job {job_id} did not reach {sorted(states)} in {timeout_s:g} s (state {state})"
        )

    def wait_gone(self, job: SubmittedJob | str, timeout_s: float = 30.0) -> None:
        """Wait until the job no longer holds resources (not running, not completing)."""
        job_id = job.job_id if isinstance(job, SubmittedJob) else job
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if job_state(job_id) not in HOLDING:
                return
            time.sleep(0.1)
        raise AssertionError(f"job {job_id} still holds resources after {timeout_s:g} s")

    def cancel(self, job: SubmittedJob | str) -> None:
        slurm("scancel", job.job_id if isinstance(job, SubmittedJob) else job)

    def cancel_all(self) -> None:
        if self.submitted:
            slurm("scancel", *self.submitted)


def _cluster_nodes() -> tuple[tuple[str, ...], str]:
    if shutil.which("sinfo") is None:
        return (), "Slurm is not installed; run `colocate dev-cluster up --nodes 3`"
    proc = slurm("sinfo", "-h", "-N", "-o", "%N %T", timeout=10)
    if proc.returncode != 0:
        return (
            (),
            f"Slurm does not answer ({proc.stderr.strip()}); run `colocate dev-cluster up --nodes 3`",
        )
    nodes = []
    for line in proc.stdout.splitlines():
        name, _, state = line.partition(" ")
        if state and not state.endswith("*") and not state.startswith(("down", "drain", "unk")):
            nodes.append(name)
    if not nodes:
        return (
            (),
            f"no responsive Slurm node ({proc.stdout.strip()!r}); run `colocate dev-cluster up --nodes 3`",
        )
    return tuple(dict.fromkeys(nodes)), ""


@pytest.fixture(scope="session")
def slurm_cluster() -> SlurmCluster:
    nodes, reason = _cluster_nodes()
    require(bool(nodes), reason)
    return SlurmCluster(nodes)


@pytest.fixture
def slurm_jobs(slurm_cluster: SlurmCluster) -> Iterator[JobSubmitter]:
    submitter = JobSubmitter()
    try:
        yield submitter
    finally:
        submitter.cancel_all()


@pytest.fixture
def jobs(slurm_jobs: JobSubmitter) -> JobSubmitter:
    """The lending tests' name for :func:`slurm_jobs` (their jobs are cancelled after)."""
    return slurm_jobs


# A private redis-server for the tests of Redis-backed state and channels (one per module).
@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``127.0.0.1:<port>`` of a fresh ``redis-server``; skipped (failed under CI) if none."""
    from tests.integration.leasing import private_redis

    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed (scripts/setup --dev installs it)")
        pytest.skip("redis-server is not installed")
    with private_redis(tmp_path_factory.mktemp("redis"), binary) as port:
        yield f"127.0.0.1:{port}"


# Two real Unix users whose clients authenticate with MUNGE (runuser); one pair per module.
@pytest.fixture(scope="module")
def users() -> Iterator[tuple[str, str]]:
    from tests.integration.leasing import munged_running, unix_users

    require(os.geteuid() == 0, "making Unix users needs root")
    require(munged_running(), "munged is not running (colocate dev-cluster up)")
    tag = secrets.token_hex(3)
    with unix_users(f"cola{tag}", f"colb{tag}") as (a, b):
        yield a.pw_name, b.pw_name


# A broker and the Slurm agents a test starts (stopped, their state and stale sockets removed).
@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Service]:
    from tests.integration.leasing import start_broker

    service = start_broker(tmp_path)
    yield service
    service.stop()


@pytest.fixture
def agent_on(
    tmp_path: Path, broker: Service, slurm_cluster: SlurmCluster
) -> Iterator[dict[str, SlurmAgent]]:
    require(os.geteuid() == 0, "the Slurm agent needs root (cgroups, control socket under /run)")
    started: dict[str, SlurmAgent] = {}
    yield started
    for agent in started.values():
        agent.service.stop()
        shutil.rmtree(agent.state_dir, ignore_errors=True)
        _remove_if_stale(agent.socket)  # a SIGKILLed agent's: idle_node() would skip the node
        assert "Traceback" not in agent.service.logs(), agent.service.logs()


def _remove_if_stale(path: str) -> None:
    import socket

    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except FileNotFoundError:
        return
    except OSError:
        Path(path).unlink(missing_ok=True)  # nobody listens
    finally:
        probe.close()


@pytest.fixture
def store() -> Iterator[str]:
    """A process store directory made as scripts/setup makes the site's: mode 1733, each
    owner a 0700 directory in it. Not under /tmp, which is private in the sandbox."""
    path = tempfile.mkdtemp(prefix="colocate-processes-", dir="/var/tmp")
    os.chmod(path, 0o1733)
    yield path
    shutil.rmtree(path, ignore_errors=True)
