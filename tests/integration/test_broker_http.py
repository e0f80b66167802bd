"""The broker's HTTP server as agents and clients meet it: a connection that never sends a
request head is closed after HEAD_TIMEOUT_S (whichever parser uvicorn runs: httptools when
installed, h11 otherwise), and a request sent in pieces is still answered."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from colocate.broker.service import HEAD_TIMEOUT_S, _protocol
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
