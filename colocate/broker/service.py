"""Serving a FastAPI app (broker or agent) and the errors both speak over HTTP.

Every error body is an :class:`~colocate.broker.api.ErrorReply`: ``error`` names the colocate
exception class, so a client raises the very same exception on its side
(:func:`raise_for_reply`). Bad bodies get 400 with the offending field; nothing a caller
sends can crash the process (unexpected errors become 500 and are logged).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import threading
from collections.abc import Iterator
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from colocate import errors
from colocate.errors import (
    BackendUnavailable,
    BadRequest,
    ColocateError,
    ConfigError,
    LeaseDenied,
    LeaseError,
    Unauthorized,
)

log = logging.getLogger(__name__)

# Most specific first: the first matching class decides the HTTP status.
_STATUS: tuple[tuple[type[ColocateError], int], ...] = (
    (Unauthorized, 401),
    (BadRequest, 400),
    (ConfigError, 400),
    (LeaseDenied, 409),
    (errors.LeaseExpired, 410),
    (errors.LeaseEvicted, 410),
    (errors.ExecutorLost, 502),
    (LeaseError, 404),
    (BackendUnavailable, 503),
)


def parse_listen(listen: str, default_port: int) -> tuple[str, int]:
    """``HOST:PORT`` (or ``HOST``, ``:PORT``, ``[v6]:PORT``) into host and port."""
    text = listen.strip()
    host, sep, port_text = text.rpartition(":")
    if not sep or "]" in port_text:
        host, port_text = text, str(default_port)
    host = host.strip("[]") or "127.0.0.1"
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"cannot read listen address {listen!r}; write it like 127.0.0.1:8642") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"port {port} in {listen!r} is out of range")
    return host, port


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
        raise BackendUnavailable(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --listen") from None
    sock.listen(512)
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
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def serve(app: FastAPI, sock: socket.socket) -> None:
    """Serve ``app`` on ``sock`` until SIGINT/SIGTERM, then return (shutdown hooks have run)."""
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=2)
    _Server(config).run(sockets=[sock])


def error_reply(exc: ColocateError) -> JSONResponse:
    status = next((code for cls, code in _STATUS if isinstance(exc, cls)), 500)
    body: dict[str, Any] = {"error": type(exc).__name__, "message": str(exc)}
    if isinstance(exc, LeaseError) and exc.lease_id:
        body["lease_id"] = exc.lease_id
    if isinstance(exc, LeaseDenied):
        body["available"] = exc.available
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


def install_error_handlers(app: FastAPI, max_body_bytes: int = MAX_BODY_BYTES) -> None:
    """Map colocate errors, bad bodies and crashes to :class:`ErrorReply` bodies; refuse
    bodies over ``max_body_bytes`` (413) before reading them."""

    @app.middleware("http")
    async def limit_body(request: Request, call_next: Any) -> Any:
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > max_body_bytes):
            return JSONResponse(
                {"error": "BadRequest", "message": f"body of {declared} bytes exceeds the limit of {max_body_bytes} bytes"},
                status_code=413,
            )
        return await call_next(request)

    async def on_colocate(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ColocateError)
        return error_reply(exc)

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return JSONResponse({"error": "BadRequest", "message": _validation_message(exc)}, status_code=400)

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        name = "Unauthorized" if exc.status_code == 401 else "BadRequest"
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        return JSONResponse({"error": name, "message": f"{request.method} {request.url.path}: {detail}"}, status_code=exc.status_code)

    async def on_crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse({"error": "ColocateError", "message": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)

    app.add_exception_handler(ColocateError, on_colocate)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_crash)


def raise_for_reply(status: int, body: Any, where: str) -> None:
    """Raise the colocate exception an error reply names (nothing for 2xx).

    ``where`` names the service in the message when the body is not an ErrorReply.
    """
    if status < 400:
        return
    name = body.get("error") if isinstance(body, dict) else None
    message = body.get("message") if isinstance(body, dict) else None
    if not isinstance(message, str):
        message = f"{where} answered HTTP {status}"
    lease_id = body.get("lease_id") if isinstance(body, dict) else None
    cls = getattr(errors, name, None) if isinstance(name, str) else None
    if isinstance(cls, type) and issubclass(cls, ColocateError):
        # Messages already carry "lease X:"; keep the id as a field without repeating it.
        if cls is LeaseDenied:
            available = body.get("available") if isinstance(body, dict) else None
            raise LeaseDenied(message, available=available if isinstance(available, dict) else None)
        if issubclass(cls, LeaseError):
            exc = cls(message)
            exc.lease_id = lease_id if isinstance(lease_id, str) else None
            raise exc
        if cls is errors.PayloadTooLarge or cls is errors.TraceFormatError:
            raise BadRequest(message)
        if cls is ConfigError:
            raise BadRequest(message)
        raise cls(message)
    if status >= 500:
        raise BackendUnavailable(f"{where}: {message}")
    raise BadRequest(f"{where}: {message}")
