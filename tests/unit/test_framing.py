"""The one framing (colocate/protocol.py) as each of its users drives it, over real sockets.

Client (LeaseExecutor's connection), worker (its connection buffer, its token check), token
verifier and fork server all frame through ``protocol``; each one round-trips through it and
rejects a frame or message that is oversized or cut short with an error that says which.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from colocate import protocol as P
from colocate.client.executor import _Connection
from colocate.errors import ExecutorLost
from colocate.executor import forkserver
from colocate.executor.confinement import LeaseCgroups
from colocate.executor.verifier import TokenVerifier
from colocate.executor.worker import Worker, WorkerSpec, _Conn, _verify_hello
from colocate.tokens import LeaseClaims, sign_lease

ROOT = Path(__file__).resolve().parents[2]
SECRET = b"s" * 32


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    yield a, b
    a.close()
    b.close()


# -- the pieces ---------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(
    bodies=st.lists(st.binary(max_size=3000), min_size=1, max_size=8),
    chunk=st.integers(1, 700),
    size=st.sampled_from([32, 64, 4096]),
)
def test_frame_buffer_gives_back_every_frame_whatever_the_chunking(
    bodies: list[bytes], chunk: int, size: int
) -> None:
    data = b"".join(P.frame(P.REPLY, 1, 2, i + 1, b) for i, b in enumerate(bodies))
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    got: list[tuple[int, bytes]] = []
    with a, b:
        fb = P.FrameBuffer(size)  # smaller than most frames: it must grow

        def take() -> None:
            while (head := fb.header()) is not None:
                view = fb.body(head[0])
                if view is None:
                    return
                got.append((head[4], bytes(view)))

        for i in range(0, len(data), chunk):
            a.sendall(data[i : i + chunk])
            fb.fill(b)
            take()
        while len(got) < len(bodies):
            fb.fill(b)
            take()
    assert got == [(i + 1, body) for i, body in enumerate(bodies)]


def test_a_dropped_frame_is_skipped_even_when_its_body_arrives_later(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    fb = P.FrameBuffer(64)
    a.sendall(P.frame(P.CALL, 0, 0, 1, b"x" * 1000)[:40])
    fb.fill(b)
    head = fb.header()
    assert head is not None and head[0] == 1000
    fb.drop(head[0])
    a.sendall(P.frame(P.CALL, 0, 0, 1, b"x" * 1000)[40:] + P.frame(P.CALL, 0, 0, 2, b"next"))
    frames = []
    while len(frames) < 1:
        fb.fill(b)
        while (head := fb.header()) is not None and (view := fb.body(head[0])) is not None:
            frames.append((head[4], bytes(view)))
    assert frames == [(2, b"next")]
    assert len(fb.buf) == 64  # the dropped body never needed room


def test_messages_round_trip_and_end_of_stream_is_none(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    P.send_message(a, b"one")
    a.sendall(P.message(b"") + P.message(b"three" * 1000))
    assert P.recv_message(b) == b"one"
    assert P.recv_message(b) == b""
    assert P.recv_message(b) == b"three" * 1000
    a.close()
    assert P.recv_message(b) is None


@pytest.mark.parametrize(
    ("sent", "error"),
    [
        (P.MESSAGE_LEN.pack(2_000_000) + b"x", r"message of 2000000 bytes is over the limit of"),
        (P.message(b"0123456789")[:8], r"cut short: the stream ended after 4 of 10 bytes"),
        (b"\x05\x00", r"message length cut short: the stream ended after 0 of 2 bytes"),
    ],
)
def test_an_oversized_or_truncated_message_is_a_frame_error_that_says_which(
    pair: tuple[socket.socket, socket.socket], sent: bytes, error: str
) -> None:
    a, b = pair
    a.sendall(sent)
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(P.FrameError, match=error) as caught:
        P.recv_message(b)
    assert isinstance(caught.value, OSError)  # every reader drops the connection on OSError


@pytest.mark.parametrize(
    ("sent", "error"),
    [
        (P.HEADER.pack(5_000_000, P.REPLY, 0, 0, 0), r"frame of 5000000 bytes is over the limit"),
        (P.frame(P.REPLY, 0, 0, 0, b"abc")[:17], r"frame of 3 bytes cut short"),
        (P.frame(P.REPLY, 0, 0, 0, b"abc")[:9], r"frame header cut short"),
    ],
)
def test_a_handshake_frame_oversized_or_truncated_is_refused(
    pair: tuple[socket.socket, socket.socket], sent: bytes, error: str
) -> None:
    a, b = pair
    a.sendall(sent)
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(P.FrameError, match=error):
        P.read_frame(b)


# -- each user ----------------------------------------------------------------------------
def test_client_handshake_and_replies_go_through_the_one_framing(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    mine, worker_end = pair
    conn = _Connection(mine, "unix:test", "lease-1")
    welcome = json.dumps({"lease_id": "lease-1", "tcp": []}).encode()
    worker_end.sendall(P.frame(P.REPLY, 0, P.OK, 0, welcome))
    assert conn.hello("token")["lease_id"] == "lease-1"
    kind, _flags, version, _cid, body = P.read_frame(worker_end)
    assert (kind, version, body) == (P.HELLO, P.VERSION, b"token")
    # replies split anywhere, one larger than the buffer: each call gets its own result
    big = b"r" * (P.RECV_BUFFER_BYTES + 10)
    data = P.frame(P.REPLY, P.RAW, P.OK, 7, b"seven") + P.frame(P.REPLY, P.RAW, P.OK, 8, big)

    def send_slowly() -> None:
        for i in range(0, len(data), 100_000):
            worker_end.sendall(data[i : i + 100_000])
            time.sleep(0.01)

    sender = threading.Thread(target=send_slowly)
    sender.start()
    got = None
    while got is None:
        got = conn.pump(7)
    assert got == (P.OK, P.RAW, b"seven")
    got = None
    while got is None:
        got = conn.pump(8)
    assert got == (P.OK, P.RAW, big)
    sender.join()


@pytest.mark.parametrize(
    ("sent", "error"),
    [
        (P.frame(P.REPLY, 0, P.OK, 0, b"{}")[:10], "frame header cut short"),
        (P.HEADER.pack(P.MAX_MESSAGE_BYTES + 1, P.REPLY, 0, 0, 0), "over the limit"),
    ],
)
def test_client_handshake_with_a_broken_frame_is_executor_lost_saying_why(
    pair: tuple[socket.socket, socket.socket], sent: bytes, error: str
) -> None:
    mine, worker_end = pair
    conn = _Connection(mine, "unix:test", "lease-1")
    worker_end.sendall(sent)
    worker_end.shutdown(socket.SHUT_WR)
    with pytest.raises(ExecutorLost, match=f"executor at unix:test: handshake failed: .*{error}"):
        conn.hello("token")


@pytest.fixture
def verifier(tmp_path: Path) -> Iterator[TokenVerifier]:
    v = TokenVerifier(str(tmp_path / "v.sock"), SECRET)
    yield v
    v.close()


def _connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(path)
    return sock


def test_worker_asks_the_verifier_through_the_one_framing(verifier: TokenVerifier) -> None:
    claims = LeaseClaims("lease-9", "n1", (1,), 1 << 20, time.time() + 60)
    with _connect(verifier.path) as sock:
        answer = _verify_hello(sock, sign_lease(SECRET, claims).encode())
        assert answer["status"] == "ok" and answer["lease_id"] == "lease-9"
        refused = _verify_hello(sock, b"not-a-token")
        assert refused["status"] == "unauthorized"


def test_verifier_drops_an_oversized_message_and_keeps_serving(
    verifier: TokenVerifier,
) -> None:
    with _connect(verifier.path) as bad:
        bad.sendall(P.MESSAGE_LEN.pack(P.MAX_MESSAGE_BYTES + 1) + b"V")
        with contextlib.suppress(ConnectionResetError):  # reset: our unread byte
            assert bad.recv(10) == b""  # dropped without reading 1 MiB
    claims = LeaseClaims("lease-9", "n1", (1,), 1 << 20, time.time() + 60)
    with _connect(verifier.path) as good:
        assert _verify_hello(good, sign_lease(SECRET, claims).encode())["status"] == "ok"


def test_worker_token_check_with_a_truncated_answer_refuses_clearly(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    mine, verifier_end = pair
    verifier_end.sendall(P.message(b'{"status": "ok"}')[:9])
    verifier_end.shutdown(socket.SHUT_WR)
    answer = _verify_hello(mine, b"token")
    assert answer == {
        "status": "unauthorized",
        "message": "executor cannot reach its token verifier",
    }
    assert P.recv_message(verifier_end) == b"Vtoken"


def _worker(limit: int) -> Worker:
    spec = WorkerSpec(
        lease_id="lease-1",
        node="n1",
        index=0,
        cpu=0,
        cpu_ids=(0,),
        memory_bytes=1 << 30,
        cgroups=LeaseCgroups("rlimit", (), 1 << 30),
        run_as_user="nobody",
        hot_timeout_s=0.0,
        max_payload_bytes=limit,
        verifier_path="",
        tcp=(),
        unix=(),
    )
    return Worker(spec, [], None)


def test_worker_buffer_serves_split_calls_and_answers_an_oversized_one_too_large(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    client, worker_end = pair
    worker = _worker(limit=100)
    conn = _Conn(worker_end, 64)
    conn.authed = True
    conn.fns = [lambda data: data.upper()]
    worker.conns[worker_end.fileno()] = conn
    calls = (
        P.frame(P.CALL, P.RAW, 0, 1, b"a" * 90)
        + P.frame(P.CALL, P.RAW, 0, 2, b"b" * 500)  # over the limit: dropped as it comes
        + P.frame(P.CALL, P.RAW, 0, 3, b"c")
    )
    replies: list[tuple[int, int, bytes]] = []
    for i in range(0, len(calls), 37):
        client.sendall(calls[i : i + 37])
        out: list[bytes] = []
        conn.fill(worker_end)
        assert worker._parse(conn, out)
        data = b"".join(out)
        while data:
            length, _k, _f, status, cid = P.HEADER.unpack_from(data)
            replies.append((cid, status, data[16 : 16 + length]))
            data = data[16 + length :]
    assert [(cid, status) for cid, status, _ in replies] == [
        (1, P.OK),
        (2, P.TOO_LARGE),
        (3, P.OK),
    ]
    assert replies[0][2] == b"A" * 90 and replies[2][2] == b"C"
    assert P.TOO_LARGE_BODY.unpack(replies[1][2]) == (500, 100)


def test_worker_refuses_an_oversized_hello_as_malformed(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    client, worker_end = pair
    worker = _worker(limit=100)
    conn = _Conn(worker_end, 64)
    client.sendall(P.HEADER.pack(P.MAX_HELLO_BYTES + 1, P.HELLO, 0, P.VERSION, 0))
    conn.fill(worker_end)
    out: list[bytes] = []
    assert not worker._parse(conn, out)  # the connection closes
    _length, _kind, _flags, status, _cid = P.HEADER.unpack_from(out[0])
    assert status == P.MALFORMED
    assert out[0][16:].decode() == f"HELLO of {P.MAX_HELLO_BYTES + 1} bytes is too large"


def test_fork_server_control_messages_use_the_one_framing(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    supervisor, server = pair
    forkserver.send_msg(supervisor, ("spawn", {"cpu": [1, 2]}, "host", "/dir"))
    assert forkserver.recv_msg(server) == ("spawn", {"cpu": [1, 2]}, "host", "/dir")
    data = pickle.dumps(("ok", [1], [], []))
    server.sendall(P.message(data)[:-3])
    server.shutdown(socket.SHUT_WR)
    with pytest.raises(P.FrameError, match="cut short"):
        forkserver.recv_msg(supervisor)


def test_no_framing_user_keeps_a_hand_written_length_prefix() -> None:
    users = [
        "colocate/client/executor.py",
        "colocate/executor/worker.py",
        "colocate/executor/verifier.py",
        "colocate/executor/forkserver.py",
        "colocate/executor/fmi_sockets.py",
        "colocate/fmi/rank.py",
    ]
    hand_written = re.compile(r"""struct\.(Struct|pack|unpack)\(\s*["'][<!]?I["']|recv\(4\b""")
    for path in users:
        source = (ROOT / path).read_text()
        assert not hand_written.search(source), f"{path} frames by hand; use colocate.protocol"


def test_next_frame_is_header_and_body_in_one_call_also_after_a_drop(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    fb = P.FrameBuffer(64)
    a.sendall(P.frame(P.CALL, 0, 0, 1, b"x" * 100) + P.frame(P.REPLY, P.RAW, P.OK, 2, b"ok"))
    fb.fill(b)
    head = fb.header()
    assert head is not None
    fb.drop(head[0])
    got = []
    while not got:
        frame = fb.next_frame()
        if frame is None:
            fb.fill(b)
            continue
        kind, flags, code, call_id, body = frame
        got.append((kind, flags, code, call_id, bytes(body)))
    assert got == [(P.REPLY, P.RAW, P.OK, 2, b"ok")]
    assert fb.next_frame() is None and fb.start == fb.end == 0
