"""The --colocate SPANK plugin on the real dev cluster (colocate dev-cluster up): sbatch, salloc and
srun accept it, a bad value is refused at submission, and the choice reaches the prolog,
whose hook forwards it to the agent's control socket (here a recording control server)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from colocate.errors import ConfigError
from slurm_plugin.control import ControlServer
from slurm_plugin.control_client import socket_path_for
from slurm_plugin.devcluster import CONTROL_SOCKET, node_names
from slurm_plugin.spank import DEFAULT_CONF_DIR, SPANK_HEADER, install, registered_library
from tests.conftest import require
from tests.unit.test_control import RecordingHandler

pytestmark = [pytest.mark.slurm, pytest.mark.root]

JOB_WAIT_S = 120.0  # other jobs may hold the dev cluster's nodes for a while
SMALL_JOB = ["-c", "1", "--mem=64M", "--time=2"]


def slurm(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cluster() -> None:
    require(
        shutil.which("sbatch") is not None, "Slurm is not installed; run colocate dev-cluster up"
    )
    try:
        up = slurm("sinfo", "-h", "-o", "%t", timeout=15)
    except subprocess.TimeoutExpired:
        up = None
    require(
        up is not None and up.returncode == 0 and up.stdout.strip() != "",
        "the dev cluster does not answer; run colocate dev-cluster up --nodes 3",
    )
    require(os.geteuid() == 0, "registering the SPANK plugin needs root")
    require(SPANK_HEADER.exists(), f"{SPANK_HEADER} missing; apt-get install libslurm-dev")


@pytest.fixture(scope="module")
def plugin(cluster: None) -> Path:
    """The plugin built and registered, as the dev cluster leaves it (it stays registered)."""
    library = install()
    assert registered_library(DEFAULT_CONF_DIR) == library
    return library


@pytest.fixture
def agent() -> Iterator[RecordingHandler]:
    """A recording control server on the socket the dev cluster's prolog wrapper talks to."""
    handler = RecordingHandler()
    # The dev cluster's wrappers call one socket per node (CONTROL_SOCKET, {node} = node name).
    servers = [
        ControlServer(socket_path_for(CONTROL_SOCKET, node), handler) for node in node_names(3)
    ]
    try:
        for server in servers:
            server.start()
    except ConfigError as exc:
        for server in servers:
            server.close()
        require(False, f"cannot stand in for the agent: {exc}")
    try:
        yield handler
    finally:
        for server in servers:
            server.close()


def submit(*argv: str) -> int:
    proc = slurm("sbatch", "--parsable", *SMALL_JOB, *argv)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.strip().split(";")[0])


def wait_for(handler: RecordingHandler, job_ids: set[int], kind: str) -> None:
    """Wait until the agent heard the ``kind`` hook of every job in ``job_ids``."""
    deadline = time.monotonic() + JOB_WAIT_S
    while True:
        heard = (
            {r.job_id for r, _ in handler.prologs}
            if kind == "prolog"
            else {e.job_id for e in handler.epilogs}
        )
        if job_ids <= heard:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"no {kind} for jobs {sorted(job_ids - heard)} within {JOB_WAIT_S:.0f} s")
        time.sleep(0.2)


def test_sbatch_lists_the_option(plugin: Path) -> None:
    out = slurm("sbatch", "--help").stdout
    assert "--colocate=allow|deny" in out


def test_a_bad_value_is_refused_at_submission(plugin: Path) -> None:
    for cmd in (["sbatch", "--wrap", "true"], ["srun", "true"]):
        proc = slurm(cmd[0], "--colocate=sometimes", *SMALL_JOB, *cmd[1:])
        assert proc.returncode != 0
        assert (
            "invalid value 'sometimes' for --colocate; use --colocate=allow or --colocate=deny"
            in proc.stderr
        )
        assert not re.search(r"Submitted batch job|^\d+$", proc.stdout, re.M)


def test_the_choice_reaches_the_prolog_and_the_agent(plugin: Path, agent: RecordingHandler) -> None:
    jobs: list[int] = []
    try:
        deny = submit("--colocate=deny", "--wrap", "true")
        allow = submit("--colocate=ALLOW", "--wrap", "true")
        default = submit("--wrap", "true")
        jobs = [deny, allow, default]
        # srun without an allocation: local context, the same path.
        srun = slurm("srun", "--colocate=deny", *SMALL_JOB, "true", timeout=JOB_WAIT_S)
        assert srun.returncode == 0, srun.stderr
        salloc = slurm("salloc", "--colocate=allow", *SMALL_JOB, "true", timeout=JOB_WAIT_S)
        assert salloc.returncode == 0, salloc.stderr
        salloc_job = int(re.findall(r"Granted job allocation (\d+)", salloc.stderr)[0])
        wait_for(agent, {deny, allow, default, salloc_job}, "prolog")
        prologs = {r.job_id: r for r, _ in agent.prologs}
    finally:
        if jobs:
            slurm("scancel", *map(str, jobs))
    assert prologs[deny].colocate == "deny"
    assert prologs[allow].colocate == "allow"
    assert prologs[default].colocate is None  # the site default applies
    assert prologs[salloc_job].colocate == "allow"
    others = set(prologs) - {deny, allow, default, salloc_job}
    assert any(prologs[j].colocate == "deny" for j in others), (
        "srun --colocate=deny did not reach the prolog"
    )
    for job in (deny, allow, default):
        assert (
            prologs[job].uid == os.geteuid()
            and prologs[job].node
            and prologs[job].cpus_per_node == "1"
        )
    # When the jobs end the epilog tells the agent too.
    wait_for(agent, {deny, allow, default}, "epilog")
