"""The hooks as slurmd runs them: a fresh process with slurmd's bare environment (no PATH),
through every entry point, against no agent, a live control server and a hung one."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from slurm_plugin.control import ControlServer, PrologRequest
from tests.unit.test_control import RecordingHandler

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
ENTRY_POINTS = {
    "colocate.cli": [sys.executable, "-m", "colocate.cli", "hook"],
    "slurm_plugin.hooks": [sys.executable, "-m", "slurm_plugin.hooks"],
}
SLURMD_ENV = {
    "SLURM_JOB_ID": "314",
    "SLURM_JOB_UID": "1000",
    "SLURM_JOB_CPUS_PER_NODE": "2",
    "SLURMD_NODENAME": "n2",
    "SLURM_SCRIPT_CONTEXT": "prolog_slurmd",
    "SPANK_COLOCATE": "deny",
}


def run(
    argv: list[str], env: dict[str, str] | None = None, timeout: float = 30
) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    proc = subprocess.run(
        argv,
        env=env if env is not None else SLURMD_ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    return proc, time.monotonic() - started


@pytest.fixture
def handler() -> RecordingHandler:
    return RecordingHandler(evict=("lease-7",), delay_s=0.2)


@pytest.fixture
def server(tmp_path: Path, handler: RecordingHandler) -> Iterator[ControlServer]:
    with ControlServer(tmp_path / "agent.sock", handler) as srv:
        yield srv


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_agent_down_exits_0_fast(entry: str, tmp_path: Path) -> None:
    proc, elapsed = run([*ENTRY_POINTS[entry], "prolog", "--socket", str(tmp_path / "no.sock")])
    assert proc.returncode == 0
    assert elapsed < 2.0
    assert proc.stderr.count("\n") == 1  # one line, no traceback
    assert "colocate hook prolog job 314: no agent control socket" in proc.stderr


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_prolog_exits_0_after_the_eviction(
    entry: str, server: ControlServer, handler: RecordingHandler
) -> None:
    proc, elapsed = run([*ENTRY_POINTS[entry], "prolog", "--socket", str(server.path)])
    assert proc.returncode == 0
    assert proc.stderr == ""  # nothing went wrong, nothing to say
    assert elapsed >= 0.2  # it waited for the agent's eviction
    assert handler.prologs[0][0] == PrologRequest(
        job_id=314, colocate="deny", uid=1000, cpus_per_node="2", node="n2"
    )


def test_epilog_reaches_the_agent(server: ControlServer, handler: RecordingHandler) -> None:
    proc, _ = run([*ENTRY_POINTS["colocate.cli"], "epilog", "--socket", str(server.path)])
    assert proc.returncode == 0 and proc.stderr == ""
    assert [e.job_id for e in handler.epilogs] == [314]


def test_a_hung_agent_holds_the_job_a_bounded_time(tmp_path: Path) -> None:
    # Listens but never accepts or answers: connect() succeeds through the backlog.
    path = tmp_path / "hung.sock"
    hung = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    hung.bind(str(path))
    hung.listen(8)
    try:
        proc, elapsed = run(
            [*ENTRY_POINTS["colocate.cli"], "prolog", "--socket", str(path), "--timeout", "0.3"]
        )
    finally:
        hung.close()
    assert proc.returncode == 0
    assert "did not answer within 0.8 s" in proc.stderr
    assert elapsed < 0.3 + 0.5 + 1.5  # timeout + answer margin + interpreter start


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_the_prolog_path_imports_no_heavy_packages(entry: str, tmp_path: Path) -> None:
    python, *rest = ENTRY_POINTS[entry]
    proc, _ = run(
        [python, "-X", "importtime", *rest, "prolog", "--socket", str(tmp_path / "no.sock")]
    )
    imported = {
        line.split("|")[-1].strip()
        for line in proc.stderr.splitlines()
        if line.startswith("import time:")
    }
    heavy = {"pydantic", "psutil", "numpy", "httpx", "fastapi", "cloudpickle", "prometheus_client"}
    assert "slurm_plugin.control_client" in imported  # it did run the hook
    assert not imported & heavy
    if entry == "slurm_plugin.hooks":  # the deploy wrappers' path: not even the server half
        assert not imported & {"logging", "threading", "slurm_plugin.control"}


@pytest.mark.parametrize("phase", ["prolog", "epilog"])
def test_deploy_wrapper_without_an_agent_exits_0_with_one_line(phase: str) -> None:
    env = {
        **SLURMD_ENV,
        "COLOCATE_PYTHON": sys.executable,
        "COLOCATE_AGENT__CONTROL_SOCKET": "/nonexistent/colocate/agent.sock",
    }
    proc, elapsed = run(["/bin/sh", str(DEPLOY / f"colocate-{phase}")], env=env)
    assert proc.returncode == 0
    assert elapsed < 2.0
    assert proc.stderr.count("\n") == 1
    assert f"colocate hook {phase} job 314: no agent control socket at /nonexistent" in proc.stderr
