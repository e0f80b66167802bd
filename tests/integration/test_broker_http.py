"""The broker's HTTP server as agents and clients meet it: a connection that never sends a
request head is closed after HEAD_TIMEOUT_S (whichever parser uvicorn runs: httptools when
installed, h11 otherwise), and a request sent in pieces is still answered; a kept-alive
connection is closed once idle past the keep-alive timeout, by a sweep rather than a timer
per request."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from colocate.broker.service import HEAD_TIMEOUT_S, _protocol, bind, url_of
from tests.integration.leasing import start_broker


def test_a_silent_connection_is_closed_and_a_slow_request_still_answered(tmp_path: Path) -> None:
    assert "Tools" in _protocol().__name__  # httptools is a dependency: the C parser serves
    broker = start_broker(tmp_path)
    try:
        host, port = broker.url.removeprefix("http://").rsplit(":", 1)
        silent = socket.create_connection((host, int(port)))
        silent.settimeout(HEAD_TIMEOUT_S + 20)
        started = time.monotonic()
        assert silent.recv(1) == b""  # closed by the broker, not by our timeout
        waited = time.monotonic() - started
        assert HEAD_TIMEOUT_S - 0.5 <= waited < HEAD_TIMEOUT_S + 15
        slow = socket.create_connection((host, int(port)))
        slow.settimeout(10)
        for piece in (b"GET /hea", b"lthz HTTP/1.1\r\nhost: x\r\n", b"\r\n"):
            slow.sendall(piece)
            time.sleep(0.2)
        assert slow.recv(4096).startswith(b"HTTP/1.1 200")
        silent.close()
        slow.close()
    finally:
        broker.stop()


KEEP_ALIVE = 3  # s; the broker's is 75 s, too long for a test


class _Served:
    def __init__(self, server: uvicorn.Server, thread: threading.Thread, address: tuple[str, int]):
        self.server, self.thread, self.address = server, thread, address
        self.loop: asyncio.AbstractEventLoop | None = None


@pytest.fixture(params=["sweep", "per-request"])
def served(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[_Served]:
    """The broker's HTTP protocol (``_protocol()``, as ``serve`` configures it) serving a tiny
    app in a thread; ``per-request`` is uvicorn's own keep-alive timer, the baseline."""
    if request.param == "per-request":
        monkeypatch.setenv("COLOCATE_KEEP_ALIVE", "per-request")
    holder: list[_Served] = []

    async def app(scope: dict[str, object], receive: object, send: object) -> None:
        if scope["type"] != "http":
            return
        holder[0].loop = asyncio.get_running_loop()
        start = {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-length", b"2")],
        }
        await send(start)  # type: ignore[operator]
        await send({"type": "http.response.body", "body": b"ok"})  # type: ignore[operator]

    sock = bind("127.0.0.1:0", 0)
    host, port = url_of(sock).removeprefix("http://").rsplit(":", 1)
    config = uvicorn.Config(
        app, http=_protocol(), lifespan="off", log_level="warning", timeout_keep_alive=KEEP_ALIVE
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    holder.append(_Served(server, thread, (host, int(port))))
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    try:
        yield holder[0]
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def _ask(conn: socket.socket) -> bytes:
    conn.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
    reply = b""
    while not reply.endswith(b"ok"):
        chunk = conn.recv(4096)
        assert chunk, "the server closed a connection in use"
        reply += chunk
    return reply


def test_idle_connections_are_closed_and_busy_ones_kept(served: _Served) -> None:
    idle = socket.create_connection(served.address)
    busy = socket.create_connection(served.address)
    idle.settimeout(KEEP_ALIVE + 20)
    assert _ask(idle).startswith(b"HTTP/1.1 200")
    went_idle = time.monotonic()
    # a connection asking every 0.5 s for twice the timeout is never closed under it
    while time.monotonic() - went_idle < 2 * KEEP_ALIVE:
        assert _ask(busy).startswith(b"HTTP/1.1 200")
        time.sleep(0.5)
    assert idle.recv(1) == b""  # closed by the server, not by our timeout
    waited = time.monotonic() - went_idle
    assert KEEP_ALIVE - 0.5 <= waited < KEEP_ALIVE + 20
    busy.close()
    idle.close()


def test_kept_alive_connections_hold_no_timers(served: _Served) -> None:
    """50 agents' connections, each after a request: uvicorn's own keep-alive holds a timer
    per connection in the event loop (and one more per request until asyncio purges the
    cancelled ones), which the broker's garbage collector scanned at 10,000 nodes; the sweep
    holds one timer for all."""
    conns = [socket.create_connection(served.address) for _ in range(50)]
    for conn in conns:
        for _ in range(3):
            _ask(conn)
    assert served.loop is not None
    timers = len(served.loop._scheduled)  # type: ignore[attr-defined]
    for conn in conns:
        conn.close()
    if os.environ.get("COLOCATE_KEEP_ALIVE") == "per-request":
        assert timers >= 50  # the baseline, so that this test can fail
    else:
        assert timers <= 5  # the sweep and uvicorn's own tick
