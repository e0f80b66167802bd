"""The client side of the invocation path: a ``concurrent.futures.Executor`` over leased workers.

:class:`LeaseExecutor` connects straight to a lease's executor (no broker, no agent on the
path), ships each function once per connection, then sends only (call id, function index,
payload) per invocation. ``invoke`` is the synchronous fast path: the calling thread writes
the frame and reads the reply itself. ``submit`` returns a future; many calls may be in flight
per connection (pipelining) and a reader thread per connection completes them.

Errors: the function's own exception is re-raised (same type when it unpickles here, with the
remote traceback attached as a note and as ``remote_traceback``); ``LeaseEvicted`` /
``LeaseExpired`` when the node takes the lease back; ``ExecutorLost`` when a worker vanishes
(every call in flight on it fails, none hangs); ``PayloadTooLarge``; ``Unauthorized`` for a
bad token; ``BadRequest`` for anything the worker found malformed.
"""

from __future__ import annotations

import contextlib
import hmac
import itertools
import json
import logging
import os
import secrets
import socket
import sys
import threading
import time
import types
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future, InvalidStateError
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from colocate import protocol as P
from colocate.errors import (
    BadRequest,
    ColocateError,
    ExecutorLost,
    LeaseEvicted,
    LeaseExpired,
    PayloadTooLarge,
    Unauthorized,
)
from colocate.tokens import hello_proof

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
_MAX_FUNCTIONS = 0xFFFF  # function indexes are 16 bits on the wire
_MAX_FUNCTION_KEYS = 4096  # callables remembered by identity
CORK_DEPTH = 16  # calls waiting on a worker before further asynchronous calls are batched
CORK_FRAMES = 64  # writes held back at most
_REPLY = P.REPLY
_OK = P.OK
_RAW = P.RAW


class RemoteError(ColocateError):
    """The function raised an exception that cannot be rebuilt on the client (its type does
    not unpickle here); ``type_name``, ``message`` and ``remote_traceback`` say what it was."""

    def __init__(self, type_name: str, message: str, remote_traceback: str) -> None:
        self.type_name = type_name
        self.message = message
        self.remote_traceback = remote_traceback
        super().__init__(f"{type_name}: {message}")


def _error(status: int, body: bytes, lease_id: str) -> BaseException:
    """The exception a non-OK reply stands for."""
    if status == P.RAISED:
        exc, type_name, message, tb_text = P.decode_failure(body)
        if exc is None:
            exc = RemoteError(type_name, message, tb_text)
        with contextlib.suppress(Exception):
            exc.remote_traceback = tb_text  # type: ignore[attr-defined]
        with contextlib.suppress(Exception):
            exc.add_note(f"\nRemote traceback (lease {lease_id}):\n{tb_text.rstrip()}")
        return exc
    text = bytes(body).decode(errors="replace")
    if status == P.EVICTED:
        return LeaseEvicted(
            f"the node took the lease back ({text or 'evicted'}); lease again", lease_id=lease_id
        )
    if status == P.EXPIRED:
        return LeaseExpired(
            f"the lease expired ({text or 'expired'}); renew or lease again", lease_id=lease_id
        )
    if status == P.UNAUTHORIZED:
        return Unauthorized(f"executor refused the lease token: {text}")
    if status == P.TOO_LARGE:
        size, limit = P.TOO_LARGE_BODY.unpack(bytes(body))
        return PayloadTooLarge(size, limit)
    if status == P.MALFORMED:
        return BadRequest(f"executor rejected the request: {text}")
    return ExecutorLost(text or "the executor's worker went away mid-invocation", lease_id=lease_id)


def _outcome(status: int, flags: int, body: bytes, lease_id: str) -> Any:
    if status == _OK:
        return bytes(body) if flags == _RAW else P.decode_result(flags, body)
    raise _error(status, body, lease_id)


class _CallFuture(Future[Any]):
    """A future whose ``result()`` reads the connection itself when nobody else is reading,
    saving the hand-off to the reader thread on ``submit(...).result()``."""

    _conn: _Connection | None = None

    def result(self, timeout: float | None = None) -> Any:
        conn = self._conn
        if conn is not None and not self.done():
            with contextlib.suppress(ColocateError):  # a failure fails this future too
                conn.flush()
                if timeout is None and conn.read_lock.acquire(blocking=False):
                    try:
                        while not self.done() and not conn.dead:
                            conn.pump(None)
                    finally:
                        conn.read_lock.release()
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        conn = self._conn
        if conn is not None and not self.done():
            with contextlib.suppress(ColocateError):
                conn.flush()
        return super().exception(timeout)


def _installed_roots() -> tuple[str, ...]:
    import sysconfig

    paths = sysconfig.get_paths()
    roots = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    roots.add(str(Path(__file__).resolve().parents[1]))  # colocate itself is on every node
    return tuple(sorted(roots))


def _pickle_function(fn: Callable[..., Any]) -> bytes:
    """cloudpickle of ``fn``; its module travels by value unless it is installed (stdlib,
    site-packages, colocate), since the node need not have the user's own modules."""
    import cloudpickle

    module = sys.modules.get(getattr(fn, "__module__", None) or "")
    file = getattr(module, "__file__", None)
    by_value = (
        module is not None
        and isinstance(file, str)
        and isinstance(fn, types.FunctionType)
        and not os.path.realpath(file).startswith(_installed_roots())
    )
    if not by_value:
        return bytes(cloudpickle.dumps(fn, protocol=5))
    assert module is not None
    already = module.__name__ in cloudpickle.list_registry_pickle_by_value()
    if not already:
        cloudpickle.register_pickle_by_value(module)
    try:
        return bytes(cloudpickle.dumps(fn, protocol=5))
    finally:
        if not already:
            cloudpickle.unregister_pickle_by_value(module)


def _connect(url: str, timeout: float) -> socket.socket:
    parts = urlsplit(url)
    try:
        if parts.scheme == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(parts.path)
        elif parts.scheme == "tcp" and parts.hostname and parts.port:
            sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            P.keepalive(sock)  # a node that dies silently fails the calls in ~10 s, no hang
        else:
            raise BadRequest(
                f"executor address {url!r} must look like tcp://host:port or unix:///path"
            )
    except OSError as exc:
        raise ExecutorLost(f"cannot connect to executor at {url}: {exc.strerror or exc}") from None
    return sock


class _Connection:
    """One socket to one worker: the frames in flight on it and who reads replies."""

    def __init__(self, sock: socket.socket, url: str, lease_id: str) -> None:
        self.sock = sock
        self.url = url
        self.lease_id = lease_id
        self.frames = P.FrameBuffer()
        self.read_lock = threading.Lock()  # the right to recv on the socket
        self.send_lock = threading.Lock()
        self.cond = threading.Condition(threading.Lock())
        self.pending: dict[int, Future[Any]] = {}
        self.defined: set[int] = set()
        self.dead = False
        self.notice = 0  # EVICTED / EXPIRED once the worker said the lease is being taken back
        self.notice_text = b""
        self.reader: threading.Thread | None = None
        self.reader_waiting = False
        self.outbox: list[bytes] = []  # held-back asynchronous calls (see send)
        self.corked = 0
        self.write_failed = False

    # -- handshake -----------------------------------------------------------------------
    def hello(self, token: str, lease_key: str = "") -> dict[str, Any]:
        """Present the token; with ``lease_key`` (hex, from the grant) also send a nonce and
        check the executor's proof that it is the one the broker placed."""
        nonce = secrets.token_hex(16) if lease_key else ""
        self.send(
            P.frame(
                P.HELLO, 0, P.VERSION, 0, f"{token} {nonce}".encode() if nonce else token.encode()
            )
        )
        try:
            _kind, _flags, status, _cid, body = P.read_frame(self.sock)
        except OSError as exc:  # FrameError included: closed or garbled during the handshake
            raise ExecutorLost(
                f"executor at {self.url}: handshake failed: {exc}", lease_id=self.lease_id
            ) from None
        if status != P.OK:
            self.close()
            raise _error(status, body, self.lease_id)
        self.sock.settimeout(None)
        welcome: dict[str, Any] = json.loads(body)
        if nonce:
            proof = welcome.get("proof")
            expected = hello_proof(bytes.fromhex(lease_key), nonce.encode())
            if not isinstance(proof, str) or not hmac.compare_digest(proof, expected):
                self.close()
                raise Unauthorized(
                    f"executor at {self.url} could not prove it serves lease {self.lease_id}; "
                    "it is not the one the broker placed (fake node or hijacked address)"
                )
        return welcome

    # -- I/O ------------------------------------------------------------------------------
    def send(
        self,
        data: bytes,
        fn: int = -1,
        definitions: list[bytes] | None = None,
        calls: int = 0,
    ) -> None:
        """Send frames; a CALL of function ``fn`` first ships its definition on this stream.

        ``calls`` > 0 marks asynchronous calls: while at least CORK_DEPTH earlier calls wait
        for replies on this worker, they are held back (up to CORK_FRAMES writes) and go out
        with the next write, or when a reply arrives or someone waits for a result. The
        worker runs calls in order, so a held-back call would not have started any sooner;
        it only saves system calls and wake-ups.
        """
        with self.send_lock:
            if definitions is not None and fn not in self.defined:
                self.defined.add(fn)
                data = definitions[fn] + data
            if calls and len(self.outbox) < CORK_FRAMES:
                in_flight = len(self.pending) - self.corked - calls
                if in_flight >= CORK_DEPTH:
                    self.outbox.append(data)
                    self.corked += calls
                    return
            if self.outbox:
                self.outbox.append(data)
                data = b"".join(self.outbox)
                self.outbox.clear()
                self.corked = 0
            self._write(data)

    def flush(self) -> None:
        """Send the calls held back by ``send``."""
        if self.outbox:
            with self.send_lock:
                if not self.outbox:
                    return
                data = b"".join(self.outbox)
                self.outbox.clear()
                self.corked = 0
                self._write(data)

    def _write(self, data: bytes) -> None:
        """sendall under send_lock. A failed write does not fail the calls here: the worker
        may have sent an eviction notice that is still unread, so the reading side (which
        soon sees the end of the stream) decides between LeaseEvicted and ExecutorLost."""
        if self.write_failed:
            return
        try:
            self.sock.sendall(data)
        except OSError:
            self.write_failed = True
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)

    def lost_error(self) -> BaseException:
        if self.notice:
            return _error(self.notice, self.notice_text, self.lease_id)
        return ExecutorLost(
            f"worker at {self.url} went away (killed, out of memory or crashed)",
            lease_id=self.lease_id,
        )

    def mark_dead(self, error: BaseException | None = None) -> None:
        """Fail every call in flight (with ``error``, else the loss error): the worker will
        not answer them any more."""
        with self.cond:
            if self.dead:
                return
            self.dead = True
            pending, self.pending = self.pending, {}
            self.outbox.clear()
            self.cond.notify_all()
        for fut in pending.values():
            if not fut.done():
                with contextlib.suppress(Exception):
                    fut.set_exception(error or self.lost_error())
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def pump(self, own: int | None) -> tuple[int, int, bytes] | None:
        """Read once (blocking) and dispatch every complete reply. Caller holds read_lock.

        Returns the reply to call ``own`` when it arrived; raises the connection's loss error
        when the socket closed (after failing every pending future).
        """
        if self.dead:
            raise self.lost_error()
        if self.outbox:  # never wait for replies to calls not sent yet
            self.flush()
        frames = self.frames
        try:
            n = frames.fill(self.sock)
        except OSError:
            n = 0
        if n == 0:
            self.mark_dead()
            raise self.lost_error()
        mine = None
        pending = self.pending
        next_frame = frames.next_frame
        while (got := next_frame()) is not None:
            _kind, flags, status, cid, view = got
            body = bytes(view)
            if cid == own:
                mine = (status, flags, body)
            elif cid == 0:  # evicted/expired notice, or an error about the whole stream
                self.notice, self.notice_text = status, body
            else:
                fut = pending.pop(cid, None)
                if fut is not None:
                    try:
                        value = _outcome(status, flags, body, self.lease_id)
                    except BaseException as exc:
                        with contextlib.suppress(InvalidStateError):  # cancelled meanwhile
                            fut.set_exception(exc)
                    else:
                        with contextlib.suppress(InvalidStateError):
                            fut.set_result(value)
        return mine

    # -- calls ----------------------------------------------------------------------------
    def call(self, data: bytes, cid: int, fn: int, definitions: list[bytes]) -> Any:
        """Send a prepared CALL frame and read its reply in this thread (the fast path)."""
        if self.read_lock.acquire(blocking=False):
            try:
                self.send(data, fn, definitions)
                while True:
                    got = self.pump(cid)
                    if got is not None:
                        return _outcome(got[0], got[1], got[2], self.lease_id)
            finally:
                self.read_lock.release()
        return self.submit(data, (cid,), fn, definitions)[0].result()

    def submit(
        self, data: bytes, cids: Sequence[int], fn: int, definitions: list[bytes]
    ) -> list[Future[Any]]:
        """Register one future per call id, then send ``data`` (the calls' frames) at once.

        The futures stay PENDING: cancelling one only drops its result (the call was sent).
        """
        futures: list[Future[Any]] = []
        for _ in cids:
            call = _CallFuture()
            call._conn = self
            futures.append(call)
        with self.cond:
            if self.dead:
                error = self.lost_error()
                for fut in futures:
                    fut.set_exception(error)
                return futures
            self.pending.update(zip(cids, futures, strict=True))
            if self.reader is None:
                self.reader = threading.Thread(
                    target=self._read_loop, name=f"colocate-reader-{self.url}", daemon=True
                )
                self.reader.start()
            elif self.reader_waiting:
                self.cond.notify()
        self.send(data, fn, definitions, calls=len(cids))
        return futures

    def _read_loop(self) -> None:
        while True:
            with self.cond:
                while not self.pending and not self.dead:
                    self.reader_waiting = True
                    self.cond.wait()
                    self.reader_waiting = False
                if self.dead:
                    return
            if not self.read_lock.acquire(timeout=0.002):
                continue  # a caller is reading for itself; look again shortly
            try:
                while self.pending and not self.dead:
                    self.pump(None)
            except ColocateError:
                return
            finally:
                self.read_lock.release()

    def close(self) -> None:
        """Disconnect; calls still waiting for a reply fail with ExecutorLost."""
        self.mark_dead(
            ExecutorLost(
                f"the client closed its connection to {self.url} before the reply came",
                lease_id=self.lease_id,
            )
        )
        self.sock.close()


def _drain_and_close(conns: list[_Connection]) -> None:
    """Wait for the calls in flight, then disconnect."""
    for conn in conns:
        with contextlib.suppress(ColocateError):
            conn.flush()
        with conn.cond:
            waiting = list(conn.pending.values())
        for fut in waiting:
            with contextlib.suppress(BaseException):
                fut.exception()
        conn.close()


def _close_when_done(conns: list[_Connection]) -> None:
    """An executor that was dropped: its calls in flight still complete, then it disconnects."""
    if any(conn.pending for conn in conns):
        threading.Thread(target=_drain_and_close, args=(conns,), daemon=True).start()
    else:
        for conn in conns:
            conn.close()


class LeaseExecutor(Executor):
    """Runs functions on a lease's workers; a ``concurrent.futures.Executor``.

    ``address`` is a worker's ``tcp://host:port`` or ``unix:///path``; the handshake tells the
    client where the lease's other workers are and ``workers`` connections are opened (at most
    one per worker). ``token`` is the lease token from the broker; with ``lease_key`` (the
    grant's, hex) every connection checks that the executor proves it serves the lease
    (Unauthorized otherwise). Functions are callables
    (shipped with cloudpickle) or ``"module:function"`` strings importable on the node; each is
    shipped once per connection, ``functions`` at connect time, others on first use.
    ``map`` sends every call at once, ``chunksize`` per write (pipelined). With
    ``prefer_unix``, a client on the executor's node switches from TCP to the worker's Unix
    socket (same worker, checked by pid) when it can reach it.
    ``max_payload_bytes`` caps the pickled arguments (or the bytes argument) of one call; the
    executor's own limit applies too. Raises Unauthorized / LeaseExpired for a bad token and
    ExecutorLost when the executor cannot be reached.
    """

    def __init__(
        self,
        address: str,
        token: str,
        *,
        lease_id: str,
        workers: int,
        max_payload_bytes: int = P.DEFAULT_MAX_PAYLOAD_BYTES,
        functions: Sequence[Callable[..., Any] | str] = (),
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        prefer_unix: bool = True,
        lease_key: str = "",
    ) -> None:
        self.lease_id = lease_id
        self.lease_key = lease_key  # signs FMI group tickets (colocate.client.spmd)
        self.lease_address = address
        self._ids = itertools.count(1)
        self._fn_index: dict[Any, int] = {}
        self._fn_frames: list[bytes] = []
        self._fn_keep: list[Any] = []
        self._fn_by_body: dict[tuple[int, bytes], int] = {}
        self._fn_lock = threading.Lock()
        self._shutdown = False
        self._rr = itertools.count()
        first = _Connection(_connect(address, connect_timeout_s), address, lease_id)
        welcome = first.hello(token, lease_key)
        local = self._same_node_socket(address, welcome) if prefer_unix else None
        if local is not None:  # same node: the worker's Unix socket is a shorter path
            try:
                unix = _Connection(_connect(local, connect_timeout_s), local, lease_id)
                if unix.hello(token, lease_key).get("pid") == welcome.get("pid"):
                    first.close()
                    first, address = unix, local
                else:
                    unix.close()
            except ColocateError:
                pass  # keep TCP
        self.max_payload_bytes = min(
            int(max_payload_bytes), int(welcome.get("max_payload_bytes", max_payload_bytes))
        )
        self._conns: list[_Connection] = [first]
        for url in self._other_workers(address, welcome)[: max(0, workers - 1)]:
            conn = _Connection(_connect(url, connect_timeout_s), url, lease_id)
            try:
                conn.hello(token, lease_key)
            except ColocateError:
                for c in self._conns:
                    c.close()
                raise
            self._conns.append(conn)
        for fn in functions:
            self._index(fn)
        # reader threads hold their connections, not this object: when it is dropped, the
        # calls in flight still complete, then the connections close
        weakref.finalize(self, _close_when_done, list(self._conns))

    @staticmethod
    def _same_node_socket(address: str, welcome: dict[str, Any]) -> str | None:
        if not address.startswith("tcp://"):
            return None
        paths = welcome.get("unix", [])
        me = int(welcome.get("worker", 0))
        if me < len(paths) and paths[me] and os.path.exists(paths[me]):
            return f"unix://{paths[me]}"
        return None

    @staticmethod
    def _other_workers(address: str, welcome: dict[str, Any]) -> list[str]:
        me = int(welcome.get("worker", 0))
        if address.startswith("unix://"):
            paths = welcome.get("unix", [])
            if all(paths):
                return [f"unix://{p}" for i, p in enumerate(paths) if i != me]
        host = urlsplit(address).hostname or "127.0.0.1"
        host = f"[{host}]" if ":" in host else host
        return [
            f"tcp://{host}:{port}" for i, (_h, port) in enumerate(welcome.get("tcp", [])) if i != me
        ]

    @property
    def workers(self) -> int:
        """Connections (one per worker) still alive."""
        return sum(1 for c in self._conns if not c.dead)

    @property
    def shipped_functions(self) -> int:
        """Distinct functions shipped so far (each goes once per connection)."""
        return len(self._fn_frames)

    @property
    def addresses(self) -> list[str]:
        """Where the live connections go (``tcp://...`` or ``unix://...``), one per worker."""
        return [c.url for c in self._conns if not c.dead]

    # -- functions -----------------------------------------------------------------------
    def _index(self, fn: Callable[..., Any] | str) -> int:
        try:
            key: Any = fn
            idx = self._fn_index.get(key)
        except TypeError:  # unhashable callable: identity, kept alive below
            key = ("id", id(fn))
            idx = self._fn_index.get(key)
        if idx is not None:
            return idx
        with self._fn_lock:
            idx = self._fn_index.get(key)
            if idx is not None:
                return idx
            if isinstance(fn, str):
                if ":" not in fn:
                    raise BadRequest(f"function reference {fn!r} must look like 'module:function'")
                flags, body = P.REFERENCE, fn.encode()
            elif callable(fn):
                flags, body = P.PICKLED, _pickle_function(fn)
            else:
                raise TypeError(f"{fn!r} is neither a callable nor a 'module:function' string")
            if len(body) > self.max_payload_bytes:
                raise PayloadTooLarge(len(body), self.max_payload_bytes)
            idx = self._fn_by_body.get((flags, body))
            if idx is None:  # a new function (a fresh but identical lambda reuses its index)
                if len(self._fn_frames) > _MAX_FUNCTIONS:
                    raise BadRequest(
                        f"more than {_MAX_FUNCTIONS} distinct functions on one executor; "
                        "define functions once and pass data as arguments"
                    )
                idx = len(self._fn_frames)
                self._fn_frames.append(P.frame(P.DEFINE, flags, idx, 0, body))
                self._fn_by_body[(flags, body)] = idx
            if len(self._fn_index) < _MAX_FUNCTION_KEYS:  # past that: pickled on every call
                self._fn_index[key] = idx
                if isinstance(key, tuple):
                    self._fn_keep.append(fn)  # keeps id(fn) from being reused
            return idx

    def _frame(
        self, fn: Callable[..., Any] | str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[bytes, int, int]:
        idx = self._index(fn)
        if not kwargs and len(args) == 1 and type(args[0]) is bytes:
            flags, body = _RAW, args[0]
        else:
            flags, body = P.encode_args(args, kwargs)
        if len(body) > self.max_payload_bytes:
            raise PayloadTooLarge(len(body), self.max_payload_bytes)
        cid = next(self._ids)
        return P.frame(P.CALL, flags, idx, cid, body), cid, idx

    def _pick(self, sync: bool) -> _Connection:
        conns = self._conns
        if len(conns) == 1:
            conn = conns[0]
            if conn.dead:
                raise conn.lost_error()
            return conn
        live = [c for c in conns if not c.dead]
        if not live:
            raise conns[0].lost_error()
        start = next(self._rr) % len(live)
        order = live[start:] + live[:start]
        if sync:
            for c in order:
                if not c.pending and not c.read_lock.locked():
                    return c
        return min(order, key=lambda c: len(c.pending))

    # -- Executor API -----------------------------------------------------------------------
    def invoke(self, fn: Callable[..., Any] | str, /, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` on a worker and return its result (synchronous)."""
        if self._shutdown:
            raise RuntimeError("cannot invoke after shutdown")
        data, cid, idx = self._frame(fn, args, kwargs)
        return self._pick(True).call(data, cid, idx, self._fn_frames)

    def submit(self, fn: Callable[..., Any] | str, /, *args: Any, **kwargs: Any) -> Future[Any]:
        """Send the call now and return its future (pipelined with other calls)."""
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        try:
            data, cid, idx = self._frame(fn, args, kwargs)
            conn = self._pick(False)
        except ColocateError as exc:
            fut: Future[Any] = Future()
            fut.set_exception(exc)
            return fut
        return conn.submit(data, (cid,), idx, self._fn_frames)[0]

    def map(
        self,
        fn: Callable[..., Any] | str,
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 64,
    ) -> Iterator[Any]:
        """Like ``Executor.map``: every call is sent at once (pipelined), ``chunksize`` calls
        per write; results in order. A call that fails raises when its result is reached."""
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        end = None if timeout is None else time.monotonic() + timeout
        futures: list[Future[Any]] = []
        calls = zip(*iterables, strict=False)
        while chunk := list(itertools.islice(calls, max(1, chunksize))):
            futures.extend(self._submit_chunk(fn, chunk))

        def results() -> Iterator[Any]:
            try:
                futures.reverse()
                while futures:
                    fut = futures.pop()
                    yield fut.result() if end is None else fut.result(end - time.monotonic())
            finally:
                for fut in futures:
                    fut.cancel()

        return results()

    def _submit_chunk(
        self, fn: Callable[..., Any] | str, chunk: list[tuple[Any, ...]]
    ) -> list[Future[Any]]:
        frames: list[bytes] = []
        cids: list[int] = []
        try:
            idx = 0
            for args in chunk:
                data, cid, idx = self._frame(fn, args, {})
                frames.append(data)
                cids.append(cid)
            conn = self._pick(False)
        except ColocateError as exc:
            failed: list[Future[Any]] = [Future() for _ in chunk]
            for fut in failed:
                fut.set_exception(exc)
            return failed
        return conn.submit(b"".join(frames), cids, idx, self._fn_frames)

    def spmd(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> list[Any]:
        """Run ``fn(comm, *args, **kwargs)`` on every worker of this lease, each a rank of an
        FMI communicator; the results in rank order (``colocate.client.spmd.Group.spmd`` for
        the options and for groups of several leases)."""
        from colocate.client.spmd import Group

        return Group([self]).spmd(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting calls; with ``wait``, let the calls in flight finish, then disconnect.

        ``cancel_futures`` cancels the futures still waiting for a result: the calls were
        sent and may still run, their results are dropped.
        """
        self._shutdown = True
        if cancel_futures:
            for conn in self._conns:
                with conn.cond:
                    waiting = list(conn.pending.values())
                for fut in waiting:
                    fut.cancel()
        if not wait:
            threading.Thread(target=_drain_and_close, args=(self._conns,), daemon=True).start()
            return
        _drain_and_close(self._conns)
