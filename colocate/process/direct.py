"""Direct messages between live processes: a process that is live listens on a Unix socket in
its store directory (``live.sock``); a sender whose worker can reach it (the same node, or a
filesystem that carries sockets) hands the message over there, else it goes to the store's
inbox as for a swapped-out receiver.

A message handed over sits in the receiver's memory (its mailbox) and is acknowledged once
there; ``recv`` takes from the store inbox first (older: it waited while the process was
away), then from the mailbox. When the process swaps out, it stops listening first, then
writes the mailbox's messages not yet taken to its inbox, so none is lost with the lease
(as with a committed update, a worker killed outright before that loses them).

Frames: ``<I`` length + message; the receiver answers one byte per message.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
from collections import deque
from collections.abc import Callable

_LEN = struct.Struct("<I")
SOCKET = "live.sock"
_MAX_PATH = 100  # sun_path holds 108 bytes
_senders: dict[str, socket.socket] = {}
_senders_lock = threading.Lock()


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


class Mailbox:
    """The receiving end of a live process: a listener thread and the messages received."""

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, SOCKET)
        self.messages: deque[bytes] = deque()
        self.cond = threading.Condition()
        self.received = 0
        self._conns: list[socket.socket] = []
        self._closed = False
        self._sock: socket.socket | None = None
        if len(self.path) > _MAX_PATH:
            return  # too long a path for a socket: messages go through the inbox
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # a killed predecessor's
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.path)
            os.chmod(self.path, 0o600)
            sock.listen(64)
        except OSError:
            sock.close()
            return
        self._sock = sock
        threading.Thread(target=self._accept, name="process-mailbox", daemon=True).start()

    @property
    def listening(self) -> bool:
        return self._sock is not None and not self._closed

    def _accept(self) -> None:
        assert self._sock is not None
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with self.cond:
                if self._closed:
                    conn.close()
                    return
                self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    head = _recv_exact(conn, _LEN.size)
                    data = None if head is None else _recv_exact(conn, _LEN.unpack(head)[0])
                except OSError:
                    return
                if data is None:
                    return
                with self.cond:
                    if self._closed:
                        return  # no ack: the sender falls back to the inbox
                    self.messages.append(data)
                    self.received += 1
                    self.cond.notify_all()
                try:
                    conn.sendall(b"\x01")
                except OSError:
                    return

    def wait(self, timeout: float) -> None:
        with self.cond:
            self.cond.wait(timeout)

    def close(self, keep: Callable[[bytes], None]) -> None:
        """Stop listening, then hand every message not taken to ``keep`` (the inbox)."""
        with self.cond:
            self._closed = True
            conns, self._conns = self._conns, []
            left, self.messages = list(self.messages), deque()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for data in left:
            keep(data)


def send(directory: str, data: bytes) -> bool:
    """Hand ``data`` to the live process whose store directory is ``directory``; False when
    it is not live or cannot be reached (the caller uses the inbox)."""
    path = os.path.join(directory, SOCKET)
    for _attempt in range(2):  # a cached connection may belong to a former instance
        with _senders_lock:
            sock = _senders.pop(path, None)
        if sock is None:
            if len(path) > _MAX_PATH or not os.path.exists(path):
                return False
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(5.0)
            try:
                sock.connect(path)
            except OSError:
                sock.close()
                return False
        try:
            sock.sendall(_LEN.pack(len(data)) + data)
            if sock.recv(1) == b"\x01":
                with _senders_lock:
                    old = _senders.pop(path, None)
                    _senders[path] = sock
                if old is not None:
                    old.close()
                return True
        except OSError:
            pass
        sock.close()
    return False
