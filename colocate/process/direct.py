"""Direct messages between live processes: a process that is live listens on a Unix socket in
its store directory (``live.sock``); a sender whose worker can reach it (the same node, or a
filesystem that carries sockets) hands the message over there, else it goes to the store's
inbox as for a swapped-out receiver.

A message handed over sits in the receiver's memory (its mailbox) and is acknowledged once
there; ``recv`` takes from the store inbox first (older: it waited while the process was
away), then from the mailbox. When the process swaps out, it stops listening first, then
writes the mailbox's messages not yet taken to its inbox, so none is lost with the lease
(as with a committed update, a worker killed outright before that loses them).

Across nodes (a Unix socket does not cross hosts, even on a shared filesystem) the live
process also listens on TCP, on its lease's host, and writes where in ``live.addr`` (node,
host, port and a random key, 0600 in the owner's 0700 directory: only the owner's workers
read it, as only they can open ``live.sock``). A sender on another node connects there and
proves the key (HMAC-SHA256 over a nonce the receiver sends first), then the same frames
follow. Under ``executor.network = "none"`` a worker has no network of its own: its
supervisor opens the listener and the connection for it (``colocate.executor.fmi_sockets``,
as for FMI ranks), with a ticket the process's client signed with its lease key, which
names the addresses the worker may connect to. A sender whose ticket does not name the
receiver's address yet delivers through the inbox and reports the address; its client adds
it to the next calls' tickets, so the following messages go direct.

Frames: ``<I`` length + message; the receiver answers one byte per message.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets
import socket
import struct
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from colocate import protocol as P

_LEN = struct.Struct("<I")
SOCKET = "live.sock"
ADDR = "live.addr"  # where the TCP listener is, for senders on other nodes
_NONCE = 16
_DOMAIN = b"colocate process message v1 "
_HANDSHAKE_S = 5.0
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


def _proof(key: bytes, nonce: bytes) -> bytes:
    return hmac.new(key, _DOMAIN + nonce, hashlib.sha256).digest()


@dataclass
class Net:
    """A worker's way onto the network for messages: its node, the host its lease's
    listeners bind to, and the ticket its client signed (``colocate.fmi_ticket``; empty:
    none). ``worker`` is the executor's Worker (None outside one: plain sockets)."""

    node: str
    host: str
    ticket: str = ""
    sig: str = ""
    peers: frozenset[tuple[str, int]] = frozenset()
    worker: Any = None
    wanted: set[tuple[str, int]] = field(default_factory=set)  # addresses not in the ticket

    def _sandboxed(self) -> bool:
        w = self.worker
        return bool(
            w is not None
            and getattr(w, "verifier", None) is not None
            and w.spec.sandbox
            and w.spec.network == "none"
        )

    def _ask(self, request: dict[str, Any]) -> socket.socket:
        """A socket the supervisor made outside the sandbox (see fmi_sockets); OSError when
        it refuses or cannot be asked."""
        try:
            sock: socket.socket = self.worker.verifier
            P.send_message(sock, b"F" + json.dumps(request).encode())
            head, fds, _flags, _addr = socket.recv_fds(sock, 4, 1, socket.MSG_WAITALL)
            (length,) = P.MESSAGE_LEN.unpack(head)
            answer = json.loads(sock.recv(length, socket.MSG_WAITALL))
        except (AttributeError, ValueError, struct.error) as exc:
            raise OSError(f"the supervisor did not answer: {exc}") from None
        if answer.get("status") != "ok" or not fds:
            for fd in fds:
                os.close(fd)
            raise OSError(str(answer.get("message", "refused")))
        for fd in fds[1:]:
            os.close(fd)
        return socket.socket(fileno=fds[0])

    def listen(self) -> socket.socket:
        if self._sandboxed():
            if not self.ticket:
                raise OSError("no ticket for a listener")
            return self._ask({"op": "listen", "ticket": self.ticket, "sig": self.sig})
        sock = socket.socket(
            socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM
        )
        try:
            sock.bind((self.host, 0))
            sock.listen(64)
        except OSError:
            sock.close()
            raise
        return sock

    def connect(self, host: str, port: int) -> socket.socket | None:
        """A connection to ``host:port``; None when the ticket does not name it (reported
        in ``wanted``: the client adds it to the next ticket)."""
        if self._sandboxed():
            if (host, port) not in self.peers:
                self.wanted.add((host, port))
                return None
            request = {"op": "connect", "ticket": self.ticket, "sig": self.sig, "to": [host, port]}
            return self._ask(request)
        return socket.create_connection((host, port), timeout=_HANDSHAKE_S)


def _write_addr(directory: str, info: dict[str, Any]) -> None:
    path = os.path.join(directory, ADDR)
    tmp = f"{path}.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, json.dumps(info).encode())
    finally:
        os.close(fd)
    os.rename(tmp, path)


def read_addr(directory: str) -> dict[str, Any] | None:
    """The TCP listener of the live process in ``directory`` (None: not listening)."""
    try:
        with open(os.path.join(directory, ADDR), "rb") as f:
            info = json.loads(f.read())
        return {
            "node": str(info["node"]),
            "host": str(info["host"]),
            "port": int(info["port"]),
            "key": bytes.fromhex(str(info["key"])),
        }
    except (OSError, ValueError, KeyError, TypeError):
        return None


class Mailbox:
    """The receiving end of a live process: a listener thread and the messages received."""

    def __init__(self, directory: str, net: Net | None = None) -> None:
        self.path = os.path.join(directory, SOCKET)
        self.directory = directory
        self.messages: deque[bytes] = deque()
        self.cond = threading.Condition()
        self.received = 0
        self.received_tcp = 0  # of them, from senders on other nodes
        self._conns: list[socket.socket] = []
        self._closed = False
        self._sock: socket.socket | None = None
        self._tcp: socket.socket | None = None
        if net is not None:
            self._listen_tcp(net)
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
        threading.Thread(
            target=self._accept, args=(sock, None), name="process-mailbox", daemon=True
        ).start()

    def _listen_tcp(self, net: Net) -> None:
        try:
            sock = net.listen()
        except (OSError, ValueError):
            return  # no listener: senders on other nodes use the inbox
        key = secrets.token_bytes(32)
        host, port = sock.getsockname()[:2]
        try:
            _write_addr(
                self.directory, {"node": net.node, "host": host, "port": port, "key": key.hex()}
            )
        except OSError:
            sock.close()
            return
        self._tcp = sock
        threading.Thread(
            target=self._accept, args=(sock, key), name="process-mailbox-tcp", daemon=True
        ).start()

    @property
    def listening(self) -> bool:
        return self._sock is not None and not self._closed

    def _accept(self, listener: socket.socket, key: bytes | None) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with self.cond:
                if self._closed:
                    conn.close()
                    return
                self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn, key), daemon=True).start()

    def _serve(self, conn: socket.socket, key: bytes | None = None) -> None:
        with conn:
            if key is not None:  # TCP: the sender proves it read live.addr (the owner's)
                try:
                    conn.settimeout(_HANDSHAKE_S)
                    nonce = secrets.token_bytes(_NONCE)
                    conn.sendall(nonce)
                    proof = _recv_exact(conn, 32)
                    if proof is None or not hmac.compare_digest(proof, _proof(key, nonce)):
                        return
                    conn.settimeout(None)
                except OSError:
                    return
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
                    self.received_tcp += key is not None
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
        if self._tcp is not None:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self.directory, ADDR))
        for listener, path in ((self._sock, self.path), (self._tcp, None)):
            if listener is None:
                continue
            if path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for data in left:
            keep(data)


def send(directory: str, data: bytes, net: Net | None = None) -> bool:
    """Hand ``data`` to the live process whose store directory is ``directory``; False when
    it is not live or cannot be reached (the caller uses the inbox). With ``net`` (in a
    worker), a receiver live on another node is reached over TCP."""
    if net is not None:
        info = read_addr(directory)
        if info is not None and info["node"] != net.node and _send_tcp(info, data, net):
            return True
        # not over TCP (its address not in our ticket yet): the Unix socket, which reaches
        # only a receiver under the same kernel, else the inbox
    path = os.path.join(directory, SOCKET)

    def connect() -> socket.socket | None:
        if len(path) > _MAX_PATH or not os.path.exists(path):
            return None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(5.0)
        try:
            sock.connect(path)
        except OSError:
            sock.close()
            return None
        return sock

    return _send_cached(path, connect, data)


def _send_cached(key: str, connect: Callable[[], socket.socket | None], data: bytes) -> bool:
    """Send one frame over the connection cached under ``key``, or a new one from
    ``connect`` (None: cannot connect), and wait for the receiver's ack. A cached connection
    may belong to a former instance of the receiver: a failure is tried once more anew."""
    for _attempt in range(2):
        with _senders_lock:
            sock = _senders.pop(key, None)
        if sock is None:
            sock = connect()
            if sock is None:
                return False
        try:
            sock.sendall(_LEN.pack(len(data)) + data)
            if sock.recv(1) == b"\x01":
                with _senders_lock:
                    old = _senders.pop(key, None)
                    _senders[key] = sock
                if old is not None:
                    old.close()
                return True
        except OSError:
            pass
        sock.close()
    return False


def _send_tcp(info: dict[str, Any], data: bytes, net: Net) -> bool:
    host, port, key = info["host"], info["port"], info["key"]

    def connect() -> socket.socket | None:
        sock = None
        try:
            sock = net.connect(host, port)
            if sock is None:
                return None  # not in the ticket yet: the inbox; the client learns it
            sock.settimeout(_HANDSHAKE_S)
            nonce = _recv_exact(sock, _NONCE)
            if nonce is None:
                raise OSError("closed during the handshake")
            sock.sendall(_proof(key, nonce))
        except OSError:
            if sock is not None:
                sock.close()
            return None
        return sock

    return _send_cached(f"tcp:{host}:{port}:{key.hex()[:16]}", connect, data)
