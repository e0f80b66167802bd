"""The prolog/epilog hooks in-process: what they tell the agent, and that none of their own
troubles (agent down, slow, garbled, bad arguments) ever fails the prolog.

With no agent the prolog frees the job's cores itself (scontrol, then the lease cgroups of
this machine): here that step is recorded instead, so these tests touch neither Slurm nor
the host's cgroups; tests/integration/test_agent_restart.py runs it for real."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from slurm_plugin import hooks
from slurm_plugin.control import DEFAULT_SOCKET, ControlServer, PrologRequest
from slurm_plugin.hooks import (
    ANSWER_MARGIN_S,
    JobChoice,
    main,
    prolog_request,
    read_job_choices,
    record_job_choice,
    resolve_socket,
    run_hook,
)
from tests.unit.test_control import RecordingHandler

JOB_ENV = {
    "SLURM_JOB_ID": "42",
    "SLURM_JOB_UID": "1000",
    "SLURM_JOB_CPUS_PER_NODE": "2",
    "SLURMD_NODENAME": "n1",
    "SPANK_COLOCATE": "deny",
}


@pytest.fixture(autouse=True)
def freed_without_agent(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, str | None]]:
    """The (job, node) pairs the prolog asked to free itself, the agent being unreachable."""
    asked: list[tuple[int, str | None]] = []

    def record(job_id: int, node: str | None) -> list[str]:
        asked.append((job_id, node))
        return []

    monkeypatch.setattr(hooks, "free_cores_without_agent", record)
    return asked


@pytest.fixture
def handler() -> RecordingHandler:
    return RecordingHandler(evict=("lease-1",), delay_s=0.1)


@pytest.fixture
def server(tmp_path: Path, handler: RecordingHandler) -> Iterator[ControlServer]:
    with ControlServer(tmp_path / "agent.sock", handler) as srv:
        yield srv


@pytest.mark.parametrize(
    ("spank", "expected", "warns"),
    [
        ("deny", "deny", False),
        ("allow", "allow", False),
        ("DENY", "deny", False),
        (None, None, False),
        ("", None, False),
        ("sometimes", "deny", True),
    ],
)
def test_the_jobs_choice_from_the_spank_plugin(
    spank: str | None, expected: str | None, warns: bool
) -> None:
    env = {k: v for k, v in JOB_ENV.items() if k != "SPANK_COLOCATE"}
    if spank is not None:
        env["SPANK_COLOCATE"] = spank
    request, warning = prolog_request(env, timeout_s=5)
    assert request["colocate"] == expected
    assert (warning is not None) == warns
    assert request == {
        "op": "prolog",
        "job_id": 42,
        "colocate": expected,
        "uid": 1000,
        "cpus_per_node": "2",
        "node": "n1",
        "timeout_s": 5,
    }


def test_socket_lookup_order(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('[agent]\ncontrol_socket = "/run/colocate/{node}.sock"\n')
    env = {"SLURMD_NODENAME": "n3"}
    assert (
        resolve_socket("/x.sock", str(config), {**env, "COLOCATE_AGENT__CONTROL_SOCKET": "/y.sock"})
        == "/x.sock"
    )
    assert (
        resolve_socket(None, str(config), {**env, "COLOCATE_AGENT__CONTROL_SOCKET": "/y.sock"})
        == "/y.sock"
    )
    assert resolve_socket(None, str(config), env) == "/run/colocate/n3.sock"
    # An unreadable config still leaves the default socket to try.
    assert resolve_socket(None, str(tmp_path / "absent.toml"), env) == DEFAULT_SOCKET
    config.write_text("[agent\n")
    assert resolve_socket(None, str(config), env) == DEFAULT_SOCKET


def test_prolog_returns_after_the_agent_evicted(
    server: ControlServer, handler: RecordingHandler
) -> None:
    outcome = run_hook("prolog", JOB_ENV, socket=str(server.path))
    assert outcome.ok, outcome.message
    assert outcome.elapsed_s >= 0.1
    assert outcome.message.startswith("evicted 1 lease(s)")
    assert handler.prologs[0][0] == PrologRequest(
        job_id=42, colocate="deny", uid=1000, cpus_per_node="2", node="n1"
    )


def test_epilog_tells_the_agent(server: ControlServer, handler: RecordingHandler) -> None:
    outcome = run_hook("epilog", JOB_ENV, socket=str(server.path))
    assert outcome.ok
    assert [e.job_id for e in handler.epilogs] == [42]


def test_agent_down_gives_up_at_once(
    tmp_path: Path, freed_without_agent: list[tuple[int, str | None]]
) -> None:
    outcome = run_hook("prolog", JOB_ENV, socket=str(tmp_path / "none.sock"))
    assert not outcome.ok
    assert "no agent control socket" in outcome.message
    assert "killed 0 lease(s) on the job's cores itself" in outcome.message
    assert freed_without_agent == [(42, "n1")]  # the job's cores are freed without the agent
    assert outcome.elapsed_s < 0.2


def test_a_slow_agent_is_waited_for_a_bounded_time(tmp_path: Path) -> None:
    slow = RecordingHandler(delay_s=3.0)
    with ControlServer(tmp_path / "slow.sock", slow) as srv:
        outcome = run_hook("prolog", JOB_ENV, socket=str(srv.path), timeout_s=0.2)
    assert not outcome.ok
    assert "did not answer" in outcome.message
    assert 0.2 <= outcome.elapsed_s < 0.2 + ANSWER_MARGIN_S + 0.3
    # The agent was told to be done by the hook's timeout, which has passed.
    request, deadline = slow.prologs[0]
    assert request.job_id == 42
    assert deadline <= time.monotonic()


def test_a_garbled_answer_is_survived(tmp_path: Path) -> None:
    path = tmp_path / "garbage.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)

    def serve_garbage() -> None:
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.sendall(b"\x00\x01 this is not json\n")
        conn.close()

    t = threading.Thread(target=serve_garbage)
    t.start()
    outcome = run_hook("prolog", JOB_ENV, socket=str(path))
    t.join()
    listener.close()
    assert not outcome.ok
    assert "answered garbage" in outcome.message


def test_the_agent_refusing_is_reported(tmp_path: Path) -> None:
    with ControlServer(tmp_path / "a.sock", RecordingHandler(fail=RuntimeError("boom"))) as srv:
        outcome = run_hook("prolog", JOB_ENV, socket=str(srv.path))
    assert not outcome.ok
    assert "the agent refused" in outcome.message and "boom" in outcome.message


@pytest.mark.parametrize(
    "argv",
    [["prolog"], ["epilog"], ["reboot"], [], ["prolog", "--timeout", "abc"], ["prolog", "--bogus"]],
)
def test_main_never_fails_the_prolog(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    started = time.monotonic()
    # No SLURM_JOB_ID (run by hand), or a socket nobody serves.
    env = {"SLURMD_NODENAME": "n1"} if argv == ["epilog"] else dict(JOB_ENV)
    rc = main(
        [*argv, "--socket", str(tmp_path / "none.sock"), "--no-syslog"]
        if argv[:1] in (["prolog"], ["epilog"])
        else argv,
        env=env,
    )
    assert rc == 0
    assert time.monotonic() - started < 0.5
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("colocate hook ")


def test_the_choice_survives_an_agent_that_was_down(tmp_path: Path) -> None:
    # The prolog runs while no agent listens: the job's "deny" is left for the agent.
    outcome = run_hook("prolog", JOB_ENV, socket=str(tmp_path / "agent.sock"))
    assert not outcome.ok
    choices = read_job_choices(tmp_path / "jobs", node="n1")
    assert list(choices) == [42]
    assert choices[42].colocate == "deny" and choices[42].uid == 1000
    assert read_job_choices(tmp_path / "jobs", node="n2") == {}
    # The epilog clears it, agent or not.
    run_hook("epilog", JOB_ENV, socket=str(tmp_path / "agent.sock"))
    assert read_job_choices(tmp_path / "jobs") == {}


def test_a_hook_pointed_at_a_missing_folder_creates_nothing(tmp_path: Path) -> None:
    outcome = run_hook("prolog", JOB_ENV, socket=str(tmp_path / "absent" / "agent.sock"))
    assert "cannot record the job's choice" in outcome.message
    assert not (tmp_path / "absent").exists()


def test_unreadable_choices_are_skipped_and_unknown_values_read_as_deny(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    record_job_choice(
        jobs, JobChoice(job_id=1, colocate="allow", uid=0, node="n1", recorded_at=0.0)
    )
    (jobs / "2@n1.json").write_text("{garbage")
    (jobs / "3@n1.json").write_text('{"job_id": 3, "colocate": "perhaps", "node": "n1"}')
    choices = read_job_choices(jobs, node="n1")
    assert {j: c.colocate for j, c in choices.items()} == {1: "allow", 3: "deny"}
    assert "skipped unreadable job choice" in capsys.readouterr().err
