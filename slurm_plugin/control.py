"""The node agent's local control API: newline-delimited JSON over a Unix socket.

Slurm's prolog and epilog hooks (``colocate hook prolog|epilog``) and operators
(``status``) talk to the agent through this socket. Only root and the uids given to the
server (the Slurm user) may call it: the server reads the caller's uid from the kernel
(``SO_PEERCRED``) and refuses everyone else with a clear error. The socket file itself is
world-connectable (mode 0666) on purpose, so that a refused caller gets that error instead
of a bare ``EACCES``.

Floods: a caller that may not use the socket is answered (or, past
:data:`REFUSALS_PER_S` per uid, just hung up on) by the accept loop itself, without a thread
or a connection slot, so any number of them cannot keep root's prolog out; each allowed uid
but root is held to :data:`CALLS_PER_S` connections per second (burst twice that).

Wire format, one request and one answer per line (UTF-8 JSON objects, at most
:data:`MAX_LINE_BYTES` each); a connection may carry several requests in turn::

    -> {"op": "prolog", "job_id": 42, "colocate": "deny", "uid": 1000,
        "cpus_per_node": "2", "node": "n1", "timeout_s": 5.0}
    <- {"ok": true, "op": "prolog", "job_id": 42, "evicted": ["l-1"], "waited_s": 0.012,
        "complete": true}
    -> {"op": "epilog", "job_id": 42}
    <- {"ok": true, "op": "epilog", "job_id": 42, "offered_cores": 2, "offered_memory_bytes": null}
    -> {"op": "status"}
    <- {"ok": true, "op": "status", "status": {...whatever the agent reports...}}
    <- {"ok": false, "error": "bad request: ..."}          (any request it cannot serve)

The agent implements :class:`ControlHandler` and embeds :class:`ControlServer`::

    server = ControlServer(config.agent.control_socket, handler, allowed_uids={slurm_uid})
    server.start()        # serves in background threads
    ...
    server.close()        # stops serving, removes the socket file

Standard library only. The client half (:func:`call`, the wire format) lives in
:mod:`slurm_plugin.control_client`, which the prolog hook imports without this module's
logging and threading; it is re-exported here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import stat
import struct
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol

from colocate.errors import BackendUnavailable, BadRequest, ColocateError, ConfigError, Unauthorized
from slurm_plugin.control_client import (
    DEFAULT_SOCKET,
    MAX_LINE_BYTES,
    ControlReply,
    call,
    decode,
    encode,
    socket_path_for,
)

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_SOCKET",
    "MAX_LINE_BYTES",
    "MAX_PROLOG_TIMEOUT_S",
    "ControlHandler",
    "ControlReply",
    "ControlServer",
    "EpilogRequest",
    "EpilogResult",
    "Peer",
    "PrologRequest",
    "PrologResult",
    "call",
    "decode",
    "encode",
    "parse_epilog",
    "parse_prolog",
    "peer_of",
    "resolve_uids",
    "socket_path_for",
]

#: Longest a prolog may ask the agent to wait, in seconds, whatever the request says.
MAX_PROLOG_TIMEOUT_S = 60.0
#: Prolog wait when the request names none, in seconds.
DEFAULT_PROLOG_TIMEOUT_S = 5.0
#: Refusals answered per second per refused uid; more are closed without an answer.
REFUSALS_PER_S = 5.0
#: Connections per second per allowed uid other than root (burst: twice as many).
CALLS_PER_S = 50.0


class _Buckets:
    """A token bucket per uid: ``allow(uid, now)`` spends one token if there is one."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self._state: dict[int, tuple[float, float]] = {}

    def allow(self, uid: int, now: float) -> bool:
        tokens, last = self._state.get(uid, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if len(self._state) > 4096:  # many uids: forget the full buckets
            self._state = {u: v for u, v in self._state.items() if v[0] < self.burst}
        if tokens < 1.0:
            self._state[uid] = (tokens, now)
            return False
        self._state[uid] = (tokens - 1.0, now)
        return True


Colocate = Literal["allow", "deny"]
_COLOCATE_VALUES: dict[Any, Colocate | None] = {"allow": "allow", "deny": "deny", None: None}


# --- values ---------------------------------------------------------------------------
# NamedTuples, not dataclasses: ``dataclasses`` imports ``inspect``, a few ms on every prolog.


class PrologRequest(NamedTuple):
    """A job is starting on this node; its cores and memory must be free when we answer.

    ``colocate`` is the job's ``--colocate`` choice (None: the site default applies);
    ``cpus_per_node`` is Slurm's ``SLURM_JOB_CPUS_PER_NODE`` text (e.g. ``"2"`` or
    ``"2(x3)"``), None when unknown; ``uid`` is the job owner's uid.
    """

    job_id: int
    colocate: Colocate | None = None
    uid: int | None = None
    cpus_per_node: str | None = None
    node: str | None = None


class PrologResult(NamedTuple):
    """What the agent did for a starting job.

    ``evicted``: lease ids taken back; ``waited_s``: seconds spent until they were gone;
    ``complete``: False when the deadline passed before every conflicting lease was gone
    (the job starts anyway; the agent keeps evicting).
    """

    evicted: tuple[str, ...] = ()
    waited_s: float = 0.0
    complete: bool = True


class EpilogRequest(NamedTuple):
    """A job ended on this node; its cores and memory may be offered at once."""

    job_id: int
    node: str | None = None


class EpilogResult(NamedTuple):
    """What the agent offers now that the job is gone (None: not known yet)."""

    offered_cores: int | None = None
    offered_memory_bytes: int | None = None


class ControlHandler(Protocol):
    """What the agent implements to serve the control socket.

    Methods are called from the server's connection threads, possibly concurrently
    (two jobs starting at once): the implementation does its own locking. An exception
    becomes an ``{"ok": false}`` answer and a log line; the server keeps serving.
    """

    def on_prolog(self, request: PrologRequest, deadline: float) -> PrologResult:
        """Evict every lease that conflicts with the starting job, synchronously.

        ``deadline`` is a ``time.monotonic()`` value: return by then, with
        ``complete=False`` if evictions are still running. Record that the job's
        resources are no longer offered before returning.
        """
        ...

    def on_epilog(self, request: EpilogRequest) -> EpilogResult:
        """Forget the job; offer its cores and memory at once (do not wait for a tick)."""
        ...

    def status(self) -> Mapping[str, Any]:
        """A JSON-serialisable summary of the agent (jobs, leases, offers)."""
        ...


# --- wire format ----------------------------------------------------------------------


def _job_id(message: Mapping[str, Any]) -> int:
    value = message.get("job_id")
    # bool is an int subclass; "true" is not a job id.
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise BadRequest(f"job_id must be a positive integer, got {value!r}")
    try:
        job_id = int(value)
    except ValueError:
        raise BadRequest(f"job_id must be a positive integer, got {value!r}") from None
    if job_id <= 0:
        raise BadRequest(f"job_id must be a positive integer, got {value!r}")
    return job_id


def _optional(message: Mapping[str, Any], key: str, kind: type) -> Any:
    value = message.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, kind):
        noun = {int: "an integer", str: "a string"}.get(kind, kind.__name__)
        raise BadRequest(f"{key} must be {noun} or null, got {value!r}")
    return value


def parse_prolog(message: Mapping[str, Any]) -> tuple[PrologRequest, float]:
    """The request and the wait it asks for (seconds, clamped to MAX_PROLOG_TIMEOUT_S)."""
    colocate = message.get("colocate")
    if colocate not in _COLOCATE_VALUES:
        raise BadRequest(f"colocate must be 'allow', 'deny' or null, got {colocate!r}")
    timeout = message.get("timeout_s", DEFAULT_PROLOG_TIMEOUT_S)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout >= 0:
        raise BadRequest(f"timeout_s must be a number of seconds >= 0, got {timeout!r}")
    request = PrologRequest(
        job_id=_job_id(message),
        colocate=_COLOCATE_VALUES[colocate],
        uid=_optional(message, "uid", int),
        cpus_per_node=_optional(message, "cpus_per_node", str),
        node=_optional(message, "node", str),
    )
    return request, min(float(timeout), MAX_PROLOG_TIMEOUT_S)


def parse_epilog(message: Mapping[str, Any]) -> EpilogRequest:
    return EpilogRequest(job_id=_job_id(message), node=_optional(message, "node", str))


# --- peer credentials -----------------------------------------------------------------


class Peer(NamedTuple):
    """The process at the other end of a Unix socket, as the kernel reports it."""

    pid: int
    uid: int
    gid: int


def peer_of(sock: socket.socket) -> Peer:
    """Credentials of the connected peer (``SO_PEERCRED``, Linux)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Peer(pid=pid, uid=uid, gid=gid)


def resolve_uids(users: Iterable[str | int]) -> frozenset[int]:
    """Uids for user names or numbers (``["slurm", 0]``); unknown names raise ConfigError."""
    import pwd

    uids: set[int] = set()
    for user in users:
        if isinstance(user, int) or str(user).isdigit():
            uids.add(int(user))
            continue
        try:
            uids.add(pwd.getpwnam(str(user)).pw_uid)
        except KeyError:
            raise ConfigError(
                f"user {user!r} does not exist on this node; name the Slurm user (SlurmUser in slurm.conf)",
                key="control_users",
            ) from None
    return frozenset(uids)


# --- server ---------------------------------------------------------------------------


class ControlServer:
    """Serves :class:`ControlHandler` on a Unix socket, one thread per connection.

    ``allowed_uids``: callers besides root (uid 0) that may use the socket, typically the
    Slurm user. ``max_connections`` bounds the threads; callers above it are refused.
    ``idle_timeout_s``: a connection that sends nothing for this long is closed.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        handler: ControlHandler,
        *,
        allowed_uids: Iterable[int] = (),
        max_connections: int = 32,
        idle_timeout_s: float = 30.0,
        socket_mode: int = 0o666,
    ) -> None:
        self.path = Path(path)
        self.handler = handler
        self.allowed_uids = frozenset({0, *allowed_uids})
        self.idle_timeout_s = idle_timeout_s
        self.socket_mode = socket_mode
        self._slots = threading.BoundedSemaphore(max_connections)
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._refusals = _Buckets(REFUSALS_PER_S, 2 * REFUSALS_PER_S)
        self._calls = _Buckets(CALLS_PER_S, 2 * CALLS_PER_S)

    # lifecycle

    def start(self) -> None:
        """Bind the socket (replacing a stale one) and serve in a background thread.

        Raises ConfigError when another process serves this path or the path is not a
        socket, BackendUnavailable when the socket cannot be created.
        """
        self._remove_stale()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(str(self.path))
            os.chmod(self.path, self.socket_mode)
            listener.listen(1024)
        except OSError as exc:
            raise BackendUnavailable(
                f"cannot create the control socket {self.path}: {exc.strerror}; check the directory and permissions"
            ) from exc
        self._listener = listener
        self._thread = threading.Thread(
            target=self._accept_loop, name="control-accept", daemon=True
        )
        self._thread.start()
        log.info("control socket listening on %s (uids %s)", self.path, sorted(self.allowed_uids))

    def close(self) -> None:
        """Stop accepting, close open connections, remove the socket file."""
        self._closing.set()
        if self._listener is not None:
            # shutdown() wakes the thread blocked in accept(); close() alone does not.
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
        with self._lock:
            for conn in list(self._conns):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        with contextlib.suppress(FileNotFoundError):
            if self.path.is_socket():
                self.path.unlink()

    def __enter__(self) -> ControlServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _remove_stale(self) -> None:
        try:
            mode = self.path.lstat().st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise ConfigError(
                "exists and is not a socket; remove it or choose another control_socket",
                path=str(self.path),
            )
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(self.path))
        except OSError:
            self.path.unlink(missing_ok=True)  # nobody listens: left over from a dead agent
            return
        finally:
            probe.close()
        raise ConfigError(
            "another process already serves this control socket (is an agent running?)",
            path=str(self.path),
        )

    # serving

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._closing.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                if self._closing.is_set():
                    return
                log.warning("control socket accept failed; retrying", exc_info=True)
                time.sleep(0.05)
                continue
            if not self._admit(conn):
                continue
            if not self._slots.acquire(blocking=False):
                self._refuse_now(conn, "busy: too many control connections; retry")
                continue
            threading.Thread(
                target=self._serve, args=(conn,), name="control-conn", daemon=True
            ).start()

    def _admit(self, conn: socket.socket) -> bool:
        """In the accept loop: False (connection answered and closed) for a caller that may not
        use the socket or calls too often; no thread, no slot, never blocks."""
        try:
            peer = peer_of(conn)
        except OSError:
            conn.close()
            return False
        now = time.monotonic()
        if peer.uid in self.allowed_uids:
            if peer.uid == 0 or self._calls.allow(peer.uid, now):
                return True
            self._refuse_now(
                conn, f"busy: uid {peer.uid} calls more than {CALLS_PER_S:g} times a second; retry"
            )
            return False
        if self._refusals.allow(peer.uid, now):
            log.warning("control socket: refused uid %d (pid %d)", peer.uid, peer.pid)
            self._refuse_now(conn, str(self._unauthorized(peer)))
        else:
            conn.close()
        return False

    @staticmethod
    def _refuse_now(conn: socket.socket, error: str) -> None:
        """Answer ``error`` without waiting for anything and hang up."""
        with contextlib.suppress(OSError):
            conn.send(encode({"ok": False, "error": error}), socket.MSG_DONTWAIT)
            conn.shutdown(socket.SHUT_WR)
            while conn.recv(MAX_LINE_BYTES, socket.MSG_DONTWAIT):  # what the caller already sent
                pass
        conn.close()

    def _refuse(self, conn: socket.socket, error: str) -> None:
        """Answer ``error`` and hang up so that the caller can still read the answer."""
        with contextlib.suppress(OSError):
            conn.settimeout(0.2)
            conn.sendall(encode({"ok": False, "error": error}))
            conn.shutdown(socket.SHUT_WR)
            # Closing with the caller's request unread would make its read fail with
            # ECONNRESET before it sees the answer; drain what it already sent.
            conn.recv(MAX_LINE_BYTES)
        conn.close()

    def _serve(self, conn: socket.socket) -> None:
        with self._lock:
            self._conns.add(conn)
        try:
            peer = peer_of(conn)
            if peer.uid not in self.allowed_uids:
                log.warning("control socket: refused uid %d (pid %d)", peer.uid, peer.pid)
                self._refuse(conn, str(self._unauthorized(peer)))
                return
            conn.settimeout(self.idle_timeout_s)
            reader = conn.makefile("rb")
            while not self._closing.is_set():
                line = reader.readline(MAX_LINE_BYTES + 1)
                if not line:
                    return
                if len(line) > MAX_LINE_BYTES:
                    # Resynchronising inside an over-long line is guesswork: answer and hang up.
                    self._refuse(conn, f"bad request: line longer than {MAX_LINE_BYTES} bytes")
                    return
                if not line.endswith(b"\n"):
                    self._refuse(conn, "bad request: truncated line (input ended before a newline)")
                    return
                conn.sendall(self._encode_answer(self.answer(line, peer)))
        except (OSError, ValueError):
            pass  # peer went away or timed out; nothing to tell it
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()
            self._slots.release()

    @staticmethod
    def _encode_answer(answer: dict[str, Any]) -> bytes:
        try:
            return encode(answer)
        except (BadRequest, ValueError, TypeError) as exc:
            log.error("control answer to %s cannot be sent: %s", answer.get("op"), exc)
            return encode(
                {
                    "ok": False,
                    "op": answer.get("op"),
                    "error": f"agent error: answer not sendable: {exc}",
                }
            )

    def _unauthorized(self, peer: Peer) -> Unauthorized:
        return Unauthorized(
            f"uid {peer.uid} may not use the colocate control socket {self.path}; "
            f"only root and uids {sorted(self.allowed_uids - {0})} may"
        )

    def answer(self, line: bytes, peer: Peer) -> dict[str, Any]:
        """The answer to one request line from ``peer``; never raises."""
        op: Any = None
        try:
            message = decode(line)
            op = message.get("op")
            if op == "prolog":
                request, timeout_s = parse_prolog(message)
                started = time.monotonic()
                result = self.handler.on_prolog(request, started + timeout_s)
                log.info(
                    "prolog job %d (colocate=%s, uid %d): evicted %s in %.3f s%s",
                    request.job_id,
                    request.colocate,
                    peer.uid,
                    list(result.evicted),
                    result.waited_s,
                    "" if result.complete else " (incomplete)",
                )
                return {
                    "ok": True,
                    "op": op,
                    "job_id": request.job_id,
                    "evicted": [str(lease) for lease in result.evicted],
                    "waited_s": result.waited_s if math.isfinite(result.waited_s) else None,
                    "complete": result.complete,
                }
            if op == "epilog":
                epilog = parse_epilog(message)
                offered = self.handler.on_epilog(epilog)
                log.info("epilog job %d: offered %s cores", epilog.job_id, offered.offered_cores)
                return {
                    "ok": True,
                    "op": op,
                    "job_id": epilog.job_id,
                    "offered_cores": offered.offered_cores,
                    "offered_memory_bytes": offered.offered_memory_bytes,
                }
            if op == "status":
                status = dict(self.handler.status())
                json.dumps(status)  # fail here, with a clear answer, if it is not JSON
                return {"ok": True, "op": op, "status": status}
            raise BadRequest(f"unknown op {op!r}; expected 'prolog', 'epilog' or 'status'")
        except BadRequest as exc:
            return {"ok": False, "op": op, "error": f"bad request: {exc}"}
        except Exception as exc:
            log.exception("control handler failed on %r", line[:200])
            kind = "agent error" if isinstance(exc, ColocateError) else "internal error"
            return {"ok": False, "op": op, "error": f"{kind}: {type(exc).__name__}: {exc}"}
