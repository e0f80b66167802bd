"""The control server on a real Unix socket: round trips, garbage, concurrency, stale
sockets and peer credentials (a caller that is not root or the Slurm user is refused)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from colocate.errors import BackendUnavailable, ConfigError
from slurm_plugin.control import MAX_LINE_BYTES, ControlServer, call
from tests.conftest import require
from tests.unit.test_control import RecordingHandler

NOBODY = 65534


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # Not tmp_path: its parents are 0700, and the refused-peer test connects as nobody.
    path = Path(tempfile.mkdtemp(prefix="colocate-ctl-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def handler() -> RecordingHandler:
    return RecordingHandler(evict=("lease-a", "lease-b"), delay_s=0.05)


@pytest.fixture
def server(sock_dir: Path, handler: RecordingHandler) -> Iterator[ControlServer]:
    with ControlServer(sock_dir / "agent.sock", handler) as srv:
        yield srv


def raw_exchange(path: Path, data: bytes, timeout: float = 2.0) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def test_prolog_answer_comes_after_the_eviction(server: ControlServer) -> None:
    started = time.monotonic()
    reply = call(server.path, {"op": "prolog", "job_id": 11, "colocate": "allow"}, timeout_s=2)
    assert time.monotonic() - started >= 0.05  # the handler's eviction time
    assert reply.ok
    assert reply.body["evicted"] == ["lease-a", "lease-b"]


def test_several_requests_on_one_connection(server: ControlServer) -> None:
    out = raw_exchange(server.path, b'{"op":"status"}\n{"op":"epilog","job_id":3}\n')
    answers = [json.loads(line) for line in out.splitlines()]
    assert [a["op"] for a in answers] == ["status", "epilog"]
    assert all(a["ok"] for a in answers)


def test_garbage_never_takes_the_server_down(
    server: ControlServer, handler: RecordingHandler
) -> None:
    for junk in (b"\x00\xff\xfe garbage\n", b"{not json\n", b"[]\n", b"\n"):
        answer = json.loads(raw_exchange(server.path, junk))
        assert answer["ok"] is False and answer["error"].startswith("bad request")
    # An over-long line, a half line, and a caller that says nothing at all.
    answer = json.loads(raw_exchange(server.path, b"x" * (MAX_LINE_BYTES + 10)))
    assert f"longer than {MAX_LINE_BYTES} bytes" in answer["error"]
    assert "truncated line" in json.loads(raw_exchange(server.path, b'{"op": "prol'))["error"]
    assert raw_exchange(server.path, b"") == b""
    # A caller that hangs up while the agent is still evicting.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(server.path))
        s.sendall(b'{"op": "prolog", "job_id": 5}\n')
    time.sleep(0.1)
    assert call(server.path, {"op": "status"}, timeout_s=2).ok
    assert [r.job_id for r, _ in handler.prologs] == [5]


def test_two_jobs_starting_at_once_are_served_concurrently(server: ControlServer) -> None:
    replies = []

    def one(job: int) -> None:
        replies.append(call(server.path, {"op": "prolog", "job_id": job}, timeout_s=2))

    started = time.monotonic()
    threads = [threading.Thread(target=one, args=(j,)) for j in (1, 2, 3, 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(replies) == 4 and all(r.ok for r in replies)
    assert time.monotonic() - started < 4 * 0.05 + 0.15  # not one after the other


def test_client_timeout_is_bounded(sock_dir: Path) -> None:
    slow = RecordingHandler(delay_s=1.0)
    with ControlServer(sock_dir / "slow.sock", slow) as srv:
        started = time.monotonic()
        with pytest.raises(BackendUnavailable, match=r"did not answer within 0\.2 s"):
            call(srv.path, {"op": "prolog", "job_id": 1}, timeout_s=0.2)
        assert time.monotonic() - started < 0.5


def test_agent_down_is_a_clear_error(sock_dir: Path) -> None:
    with pytest.raises(BackendUnavailable, match="no agent control socket"):
        call(sock_dir / "missing.sock", {"op": "status"}, timeout_s=1)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock_dir / "stale.sock"))
    stale.close()  # the file stays, nobody listens: an agent that was killed
    with pytest.raises(BackendUnavailable, match="nobody listens"):
        call(sock_dir / "stale.sock", {"op": "status"}, timeout_s=1)


def test_restart_replaces_a_stale_socket_but_not_a_live_one(
    sock_dir: Path, handler: RecordingHandler
) -> None:
    path = sock_dir / "agent.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    with ControlServer(path, handler) as live:
        assert call(path, {"op": "status"}, timeout_s=1).ok
        with pytest.raises(ConfigError, match="another process already serves"):
            ControlServer(path, handler).start()
        assert call(live.path, {"op": "status"}, timeout_s=1).ok
    assert not path.exists()  # close() removed it
    path.write_text("not a socket")
    with pytest.raises(ConfigError, match="is not a socket"):
        ControlServer(path, handler).start()


def _call_as(uid: int, path: Path) -> dict[str, object]:
    """Call the server from a forked child that dropped to ``uid``; return what it got."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            try:
                reply = call(path, {"op": "prolog", "job_id": 99}, timeout_s=2)
                result: dict[str, object] = {"ok": reply.ok, "error": reply.error}
            except Exception as exc:
                result = {"exception": f"{type(exc).__name__}: {exc}"}
            os.write(write_end, json.dumps(result).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as fh:
        data = fh.read()
    os.waitpid(pid, 0)
    return dict(json.loads(data))


@pytest.mark.root
def test_a_caller_that_is_not_root_or_slurm_is_refused(
    server: ControlServer, handler: RecordingHandler
) -> None:
    require(os.geteuid() == 0, "needs root to run a client as nobody")
    got = _call_as(NOBODY, server.path)
    assert got["ok"] is False
    assert f"uid {NOBODY} may not use the colocate control socket" in str(got["error"])
    assert handler.prologs == []  # the eviction never ran
    assert call(server.path, {"op": "status"}, timeout_s=1).ok  # root still may


@pytest.mark.root
def test_the_slurm_user_may_call(sock_dir: Path, handler: RecordingHandler) -> None:
    require(os.geteuid() == 0, "needs root to run a client as another user")
    with ControlServer(sock_dir / "agent.sock", handler, allowed_uids={NOBODY}) as srv:
        got = _call_as(NOBODY, srv.path)
    assert got == {"ok": True, "error": ""}
    assert [r.job_id for r, _ in handler.prologs] == [99]


def test_connection_cap_and_idle_timeout_keep_the_agent_reachable(
    sock_dir: Path, handler: RecordingHandler
) -> None:
    with ControlServer(
        sock_dir / "agent.sock", handler, max_connections=1, idle_timeout_s=0.3
    ) as srv:
        idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        idle.connect(str(srv.path))  # holds the only slot and says nothing
        time.sleep(0.05)
        busy = call(srv.path, {"op": "status"}, timeout_s=1)
        assert not busy.ok and "too many control connections" in busy.error
        time.sleep(0.4)  # the idle caller is hung up on, its slot freed
        assert idle.recv(1) == b""
        idle.close()
        assert call(srv.path, {"op": "status"}, timeout_s=1).ok


def test_an_answer_too_big_for_the_wire_is_an_error_not_a_dead_connection(
    server: ControlServer, handler: RecordingHandler
) -> None:
    handler.status_value = {"blob": "x" * (MAX_LINE_BYTES + 1)}
    reply = call(server.path, {"op": "status"}, timeout_s=2)
    assert not reply.ok and "answer not sendable" in reply.error
    handler.status_value = {}
    assert call(server.path, {"op": "status"}, timeout_s=2).ok
