"""Serving a FastAPI app (broker or agent) and the errors both speak over HTTP.

Every error body is an :class:`~colocate.broker.api.ErrorReply`: ``error`` names the colocate
exception class, so a client raises the very same exception on its side
(:func:`raise_for_reply`). Bad bodies get 400 with the offending field; nothing a caller
sends can crash the process (unexpected errors become 500 and are logged).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import resource
import signal
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from colocate import errors, units
from colocate.broker.replies import raise_for_reply as raise_for_reply  # pure; the client's import
from colocate.errors import (
    BackendUnavailable,
    BadRequest,
    ColocateError,
    ConfigError,
    Forbidden,
    LeaseDenied,
    LeaseError,
    QuotaExceeded,
    Unauthorized,
)

log = logging.getLogger(__name__)

# Most specific first: the first matching class decides the HTTP status.
_STATUS: tuple[tuple[type[ColocateError], int], ...] = (
    (Unauthorized, 401),
    (Forbidden, 403),
    (errors.PayloadTooLarge, 413),
    (BadRequest, 400),
    (ConfigError, 400),
    (QuotaExceeded, 429),
    (LeaseDenied, 409),
    (errors.LeaseExpired, 410),
    (errors.LeaseEvicted, 410),
    (errors.ExecutorLost, 502),
    (LeaseError, 404),
    (BackendUnavailable, 503),
)


def parse_listen(listen: str, default_port: int) -> tuple[str, int]:
    """``HOST:PORT`` (or ``HOST``, ``:PORT``, ``[v6]:PORT``) into host and port; see
    :func:`colocate.units.parse_listen`."""
    return units.parse_listen(listen, default_port)


def bind(listen: str, default_port: int) -> socket.socket:
    """A listening TCP socket for ``listen`` (port 0 picks a free port: read it back)."""
    host, port = parse_listen(listen, default_port)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY on accepted sockets only for it;
    # without, uvicorn's separate header/body writes meet Nagle + delayed ACK (~40 ms a call).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise BackendUnavailable(
            f"cannot listen on {host}:{port} ({exc.strerror}); pick another --listen"
        ) from None
    # thousands of agents (re)connect at once after a restart (the kernel caps it at somaxconn)
    sock.listen(4096)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class _Server(uvicorn.Server):
    """uvicorn re-raises SIGTERM after its graceful shutdown, which kills the process before
    the caller's cleanup (``finally``) runs; here the signal only stops the server."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {
            sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


HEAD_TIMEOUT_S = 5.0
KEEP_ALIVE_S = 75  # idle kept-alive connections are closed after this (nginx's default)


class _IdleSweep:
    """Connection deadlines without a timer per request: one sweep a second, while any
    connection is open, closes those past their deadline (so within 1 s after it).

    uvicorn arms ``loop.call_later(timeout_keep_alive, ...)`` after every response and
    cancels it when the next request arrives: each heartbeat allocated a ``TimerHandle`` (and
    a bound method) that lived until the next one, 4 s later, long enough to be promoted into
    the old generation, plus one live handle per idle connection in the loop's heap (10,000
    at 10,000 nodes, and as many cancelled ones before asyncio purges them). That is what the
    broker's full garbage collections kept scanning at 10,000 nodes (the lease-grant p99).
    Instead each connection's view of the loop (:class:`_KeepAliveLoop`) only notes the time
    it went idle, and the head deadline (``HEAD_TIMEOUT_S``) is a time too."""

    PERIOD_S = 1.0

    def __init__(self, loop: asyncio.AbstractEventLoop, keep_alive_s: float) -> None:
        self.loop = loop
        self.keep_alive_s = keep_alive_s
        self.views: set[_KeepAliveLoop] = set()
        self.timer: asyncio.TimerHandle | None = None

    def add(self, view: _KeepAliveLoop) -> None:
        self.views.add(view)
        if self.timer is None:
            self.timer = self.loop.call_later(self.PERIOD_S, self.sweep)

    def discard(self, view: _KeepAliveLoop) -> None:
        self.views.discard(view)

    def sweep(self) -> None:
        now = self.loop.time()
        due = [v for v in self.views if v.due <= now]
        for view in due:
            view.expire(now)
        self.timer = self.loop.call_later(self.PERIOD_S, self.sweep) if self.views else None


_NEVER = float("inf")


class _KeepAliveLoop:
    """The event loop as one uvicorn connection sees it: ``call_later`` for the keep-alive
    handler marks the connection idle and returns this view as the handle (``cancel()``
    marks it busy again); anything else goes to the real loop. No object per request.
    ``due`` is the earlier of the head deadline and the idle deadline."""

    __slots__ = (
        "_head_expired",
        "_idle_expired",
        "_loop",
        "due",
        "head_until",
        "idle_until",
        "sweep",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, sweep: _IdleSweep) -> None:
        self._loop = loop
        self.sweep = sweep
        self._idle_expired: Callable[[], None] | None = None
        self._head_expired: Callable[[], None] | None = None
        self.head_until = _NEVER
        self.idle_until = _NEVER
        self.due = _NEVER

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        if not args and getattr(callback, "__name__", "") == "timeout_keep_alive_handler":
            self._idle_expired = callback
            self.head_until = _NEVER  # a response went out: a head came in time
            self.idle_until = self.due = self._loop.time() + self.sweep.keep_alive_s
            return self
        return self._loop.call_later(delay, callback, *args, **kw)

    def cancel(self) -> None:
        self.idle_until = _NEVER
        self.due = self.head_until

    def start(self, head_expired: Callable[[], None]) -> None:
        self._head_expired = head_expired
        self.head_until = self.due = self._loop.time() + HEAD_TIMEOUT_S
        self.sweep.add(self)

    def stop(self) -> None:
        self.sweep.discard(self)
        self.head_until = self.idle_until = self.due = _NEVER

    def expire(self, now: float) -> None:
        if self.head_until <= now:
            self.head_until = _NEVER
            if self._head_expired is not None:
                self._head_expired()
        if self.idle_until <= now:
            self.idle_until = _NEVER
            if self._idle_expired is not None:
                self._idle_expired()  # uvicorn's: closes the transport unless closing already
        self.due = min(self.head_until, self.idle_until)

    def __getattr__(self, name: str) -> Any:
        if name == "_loop":  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self._loop, name)


def _per_request_timer() -> bool:
    """uvicorn's own keep-alive timer per request and a head timer per connection
    (``COLOCATE_KEEP_ALIVE=per-request``): the baseline benchmarks/broker_load.py and
    tests/integration/test_broker_http.py compare the sweep with, in the same session."""
    return os.environ.get("COLOCATE_KEEP_ALIVE") == "per-request"


class _Connection:
    """Mixed into uvicorn's HTTP protocols: a deadline for the first request head (a client
    that opens a connection and sends nothing, or half a request line, is closed after
    ``HEAD_TIMEOUT_S`` instead of holding a file descriptor forever) and the keep-alive
    timeout, both kept by one :class:`_IdleSweep` per event loop."""

    loop: Any
    cycle: Any
    transport: Any
    timeout_keep_alive: int
    _sweeps: ClassVar[weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _IdleSweep]] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._view: _KeepAliveLoop | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        if _per_request_timer():
            return
        loop = self.loop
        sweep = self._sweeps.get(loop)
        if sweep is None or sweep.keep_alive_s != self.timeout_keep_alive:
            sweep = self._sweeps[loop] = _IdleSweep(loop, self.timeout_keep_alive)
        self._view = _KeepAliveLoop(loop, sweep)
        self.loop = self._view

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        if self._view is not None:
            self._view.start(self._head_timeout)
        else:
            self._head_timer = self.loop.call_later(HEAD_TIMEOUT_S, self._head_timeout)

    def _head_timeout(self) -> None:
        if self.cycle is None and not self.transport.is_closing():
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)  # type: ignore[misc]
        if self._view is not None:
            self._view.stop()
        if self._head_timer is not None:
            self._head_timer.cancel()


class _Protocol(_Connection, H11Protocol):
    """uvicorn's h11 protocol (pure Python) with the head deadline and the keep-alive sweep."""


def _protocol() -> type[Any]:
    """uvicorn's httptools protocol (a C parser: a fraction of h11's CPU per request, which is
    most of what a node report costs the broker) when httptools is installed, else h11
    (also when ``COLOCATE_HTTP_PARSER=h11``: benchmarks/broker_http.py compares the two)."""
    if os.environ.get("COLOCATE_HTTP_PARSER") == "h11":
        return _Protocol
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return _Protocol

    class _ToolsProtocol(_Connection, HttpToolsProtocol):
        def on_response_complete(self) -> None:
            """Let go of the finished request at once: uvicorn keeps its cycle and scope (an
            Event, bound methods, FastAPI's exit stack: ~30 objects, some in reference cycles)
            until the next request on the connection, i.e. for a heartbeat interval on every
            agent's connection, long enough to reach the old generation that full garbage
            collections scan (10,000 of each at 10,000 nodes, ~100 ms a collection)."""
            super().on_response_complete()
            cycle = self.cycle
            if self._view is None or cycle is None or not cycle.response_complete:
                return
            if self.pipeline:  # a pipelined request is queued: uvicorn runs it next
                return
            if self.scope is cycle.scope:  # else the next request's head is being parsed
                self.scope = None  # type: ignore[assignment]
                self.headers = None  # type: ignore[assignment]
            self.cycle = None

    return _ToolsProtocol


def raise_fd_limit() -> int:
    """Raise this process's soft open-files limit to its hard limit (returns the new soft
    limit): a common 1,024 is too few for a service that many clients and agents reach."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft


class LongLivedHeap:
    """Keeps Python's full garbage collections short in a server holding thousands of nodes.

    A broker's heap is mostly long-lived (every node's state, every kept-alive connection:
    about a million objects at 10,000 nodes), and each full (generation 2) collection scanned
    all of it with the event loop stopped: 400 ms every few seconds at 10,000 nodes, the
    lease-grant p99. After each full collection the survivors are frozen (``gc.freeze``: later
    collections skip them), so the next one scans only what was allocated since. Every
    ``thaw_s`` the frozen objects are handed back (``gc.unfreeze``) so that cycles which died
    among them are collected by the next full collection: one long pause per ``thaw_s``
    instead of one every few seconds."""

    def __init__(self, thaw_s: float = 600.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.thaw_s = thaw_s
        self.clock = clock
        self.thawed = clock()

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase != "stop" or info.get("generation") != 2:
            return
        now = self.clock()
        if now - self.thawed >= self.thaw_s:
            gc.unfreeze()  # the next full collection sees everything once
            self.thawed = now
        else:
            gc.freeze()

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        gc.collect()
        gc.freeze()  # what startup made (modules, the app) lives as long as the process
        gc.callbacks.append(self)
        try:
            yield
        finally:
            with contextlib.suppress(ValueError):
                gc.callbacks.remove(self)
            gc.unfreeze()


def serve(app: FastAPI, sock: socket.socket, *, max_connections: int | None = None) -> None:
    """Serve ``app`` on ``sock`` until SIGINT/SIGTERM, then return (shutdown hooks have run).

    ``max_connections`` (default: 90 % of the open-files limit) caps the connections served at
    once; requests beyond get 503 instead of the process running out of descriptors."""
    limit = raise_fd_limit()
    if max_connections is None:
        max_connections = max(64, int(limit * 0.9) - 64)
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=2,
        http=_protocol(),
        limit_concurrency=min(max_connections, max(64, limit - 64)),
        # Agents report on change and send a heartbeat every few seconds: their kept-alive
        # connection must outlive that gap (uvicorn's default 5 s closed thousands of them
        # between two heartbeats, and each came back as a new connection).
        timeout_keep_alive=KEEP_ALIVE_S,
    )
    with LongLivedHeap().installed():
        _Server(config).run(sockets=[sock])


def error_reply(exc: ColocateError) -> JSONResponse:
    status = next((code for cls, code in _STATUS if isinstance(exc, cls)), 500)
    body: dict[str, Any] = {"error": type(exc).__name__, "message": str(exc)}
    if isinstance(exc, LeaseError) and exc.lease_id:
        body["lease_id"] = exc.lease_id
    if isinstance(exc, LeaseDenied):
        body["available"] = exc.available
    if isinstance(exc, QuotaExceeded):
        body.update(limit=exc.limit, used=exc.used, allowed=exc.allowed)
    return JSONResponse(body, status_code=status)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        if err.get("type") == "json_invalid":
            parts.append("body is not valid JSON; send a JSON object")
        else:
            parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "bad request: " + "; ".join(parts) + " (see /openapi.json)"


MAX_BODY_BYTES = 1024**2  # control messages are small; a larger body is a mistake or an attack


class BodyLimit:
    """Refuse request bodies over ``max_body_bytes`` with 413: by the declared Content-Length
    before reading, and by counting what arrives (chunked bodies declare none)."""

    def __init__(self, app: ASGIApp, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and (
                not value.isdigit() or len(value) > 12 or int(value) > limit
            ):
                await _too_large(send, value.decode("latin-1")[:20], limit)
                return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise HTTPException(413, f"body exceeds the limit of {limit} bytes; send less")
            return message

        await self.app(scope, counted, send)


class LoadShedder:
    """Past ``max_in_flight`` requests being served at once, answer 503 with ``Retry-After``
    at once instead of queueing: past capacity a queue only grows, and every queued request
    is served after its caller gave up (the broker then works at full CPU for nobody).
    Node reports are shed first, from half the limit: their agent sends the next one an
    interval later anyway, while a lease request is a user waiting. ``shed`` counts 503s."""

    def __init__(
        self, app: ASGIApp, max_in_flight: int, retry_after_s: int = 1, shed_first: str = ""
    ) -> None:
        self.app = app
        self.max_in_flight = max_in_flight
        self.retry_after_s = retry_after_s
        self.shed_first = shed_first  # path prefix of PUT requests shed from half the limit
        self.in_flight = 0
        self.shed = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        limit = self.max_in_flight
        if self.shed_first and scope.get("method") == "PUT" and path.startswith(self.shed_first):
            limit = max(1, limit // 2)
        if self.in_flight >= limit and path != "/healthz":
            self.shed += 1
            message = (
                f"{scope.get('method')} {path}: the broker is at capacity ({self.in_flight} requests "
                f"in flight); retry after {self.retry_after_s} s"
            )
            body = json.dumps({"error": "BackendUnavailable", "message": message}).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 503,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                        (b"retry-after", str(self.retry_after_s).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


async def _too_large(send: Send, declared: str, limit: int) -> None:
    message = f"body of {declared!r} bytes exceeds the limit of {limit} bytes; send less"
    body = json.dumps({"error": "PayloadTooLarge", "message": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def install_error_handlers(app: FastAPI, max_body_bytes: int = MAX_BODY_BYTES) -> None:
    """Map colocate errors, bad bodies and crashes to :class:`ErrorReply` bodies; refuse
    bodies over ``max_body_bytes`` (413) before reading them."""

    app.add_middleware(BodyLimit, max_body_bytes=max_body_bytes)

    async def on_colocate(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ColocateError)
        return error_reply(exc)

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return JSONResponse(
            {"error": "BadRequest", "message": _validation_message(exc)}, status_code=400
        )

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        name = {401: "Unauthorized", 403: "Forbidden", 413: "PayloadTooLarge"}.get(
            exc.status_code, "BadRequest"
        )
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        return JSONResponse(
            {"error": name, "message": f"{request.method} {request.url.path}: {detail}"},
            status_code=exc.status_code,
        )

    async def on_crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse(
            {"error": "ColocateError", "message": f"internal error: {type(exc).__name__}: {exc}"},
            status_code=500,
        )

    app.add_exception_handler(ColocateError, on_colocate)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_crash)
