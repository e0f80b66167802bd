"""The token verifier: workers ask the supervisor whether a client's lease token is valid.

Workers run user code, so they must not hold the cluster secret (it would let one lease forge
tokens for others). A worker connects to this root-only Unix socket before it drops
privileges and keeps the connection. Messages are ``protocol.message``s (u32 length, then
the body) whose body is a kind byte and its payload:

- ``V`` + token [+ space + nonce]: the answer is ``u32 length + JSON``: ``{"status": "ok",
  "lease_id", "node", "cpu_ids", "expires_at"[, "proof"]}`` or ``{"status": "unauthorized" |
  "expired", "message"}`` (a message too). ``proof`` is HMAC(lease key, nonce): the client checks it with the
  lease key of its grant, so a worker (which never holds the key) proves it is the executor the
  broker placed. A token older than the lease's last renewal is refused.
- ``T`` + JSON: the worker's invocation counts since its last report
  (``colocate.metrics.events.InvocationTally.drain()`` plus ``lease_id``); no answer.
- ``F`` + JSON: an FMI rank asks for a listening or connected TCP socket, with a ticket its
  lease's owner signed (``colocate.executor.fmi_sockets``); the answer carries the socket.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from colocate import protocol as P
from colocate.errors import ColocateError, LeaseExpired
from colocate.tokens import hello_proof, lease_key, verify_lease

log = logging.getLogger(__name__)


class TokenVerifier:
    """Answers workers' token checks on a root-only Unix socket at ``path``, in a thread."""

    def __init__(
        self, path: str, secret: bytes, on_tally: Callable[[dict[str, Any]], None] | None = None
    ) -> None:
        self.path = path
        self._secret = secret
        self._on_tally = on_tally
        self._expiry: dict[str, float] = {}  # lease -> expiry of its current token (after renewals)
        self._renew_lock = threading.Lock()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            self._listener.bind(path)
        finally:
            os.umask(old)
        self._listener.listen(128)
        self._wake_r, self._wake_w = socket.socketpair()
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ)
        self._sel.register(self._wake_r, selectors.EVENT_READ)
        self._stop = False
        self._thread = threading.Thread(
            target=self._run, name="colocate-token-verifier", daemon=True
        )
        self._thread.start()

    def renewed(self, lease_id: str, expires_at: float) -> None:
        """The lease was renewed to ``expires_at``: tokens of an earlier expiry are refused."""
        with self._renew_lock:
            self._expiry[lease_id] = max(expires_at, self._expiry.get(lease_id, 0.0))

    def answer(self, hello: bytes) -> dict[str, Any]:
        """``hello`` is the client's HELLO body: the token, then optionally a space and a nonce
        (hex), answered with ``proof`` = HMAC(lease key, nonce)."""
        token, _, nonce = hello.partition(b" ")
        try:
            claims = verify_lease(self._secret, token.decode(), time.time())
        except ColocateError as exc:
            status = "expired" if isinstance(exc, LeaseExpired) else "unauthorized"
            return {"status": status, "message": str(exc)}
        except UnicodeDecodeError:
            return {"status": "unauthorized", "message": "lease token is not text"}
        with self._renew_lock:
            current = self._expiry.get(claims.lease_id)
        if current is not None and claims.expires_at < current - 1e-3:
            return {
                "status": "unauthorized",
                "message": "token was replaced when the lease was renewed; use the new one",
            }
        answer: dict[str, Any] = {
            "status": "ok",
            "lease_id": claims.lease_id,
            "node": claims.node,
            "cpu_ids": list(claims.cpu_ids),
            "expires_at": claims.expires_at,
        }
        if nonce:
            answer["proof"] = hello_proof(lease_key(self._secret, claims.lease_id), nonce[:128])
        return answer

    def _run(self) -> None:
        while not self._stop:
            for key, _ in self._sel.select():
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self._wake_r:
                    return
                if sock is self._listener:
                    with contextlib.suppress(OSError):
                        conn, _ = self._listener.accept()
                        conn.settimeout(1.0)
                        self._sel.register(conn, selectors.EVENT_READ)
                    continue
                self._serve_one(sock)

    def _serve_one(self, conn: socket.socket) -> None:
        try:
            body = P.recv_message(conn, P.MAX_MESSAGE_BYTES)
            kind, payload = (body[:1], body[1:]) if body else (b"", b"")
            if kind == b"V":
                P.send_message(conn, json.dumps(self.answer(payload)).encode())
                return
            if kind == b"T":
                self._tally(payload)
                return
            if kind == b"F":  # FMI sockets made outside the sandbox (fmi_sockets.py)
                from colocate.executor.fmi_sockets import serve_fmi

                serve_fmi(conn, self._secret, payload)
                return
        except OSError as exc:  # FrameError too: a worker that breaks the framing is dropped
            if isinstance(exc, P.FrameError):
                log.warning("dropping a worker's verifier connection: %s", exc)
        self._sel.unregister(conn)
        conn.close()

    def _tally(self, payload: bytes) -> None:
        try:
            data = json.loads(payload)
        except ValueError:
            log.warning("ignoring an unreadable invocation tally from a worker")
            return
        if isinstance(data, dict) and self._on_tally is not None:
            self._on_tally(data)

    def close(self) -> None:
        self._stop = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        self._thread.join(timeout=2)
        for key in list(self._sel.get_map().values()):
            with contextlib.suppress(Exception):
                key.fileobj.close()  # type: ignore[union-attr]
        self._sel.close()
        self._wake_w.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
