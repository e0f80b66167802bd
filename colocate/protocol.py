"""The invocation wire protocol: binary, length-prefixed frames between a client and a worker.

Every frame is a 16-byte header followed by ``length`` body bytes::

    offset size  field
    0      4     length    body bytes after the header (little endian u32)
    4      1     kind      HELLO, DEFINE, CALL or REPLY
    5      1     flags     RAW (body is the bytes object itself) or PICKLED; for DEFINE: PICKLED
                           (cloudpickle of a callable) or REFERENCE ("module:function" in UTF-8)
    6      2     code      CALL/DEFINE: function index; HELLO: protocol version; REPLY: status
    8      8     call_id   invocation id chosen by the client; 0 = about the whole connection

A connection starts with ``HELLO`` (body: the signed lease token); the worker answers with a
``REPLY`` for call 0: ``OK`` with a JSON description of the executor (its workers' addresses,
the payload limit), or an error status and closes. Functions are shipped once per connection
with ``DEFINE`` (no reply unless loading fails later); invocations are ``CALL`` frames carrying
only the call id, the function index and the payload. Many calls may be in flight per
connection (pipelining); replies come in the order the worker ran them.

A ``REPLY`` for call 0 with status ``EVICTED`` or ``EXPIRED`` is a notice: the executor is being
taken back and every call on this connection without a reply yet ends with that error once the
connection closes.

This module is pure apart from ``keepalive``: encoding and decoding of frames and error bodies.
"""

from __future__ import annotations

import pickle
import socket
import struct
import traceback
from typing import Any, Final

HEADER: Final = struct.Struct("<IBBHQ")
HEADER_SIZE: Final = HEADER.size  # 16 bytes
VERSION: Final = 1
MAX_HELLO_BYTES: Final = 64 * 1024  # a token is a few hundred bytes
DEFAULT_MAX_PAYLOAD_BYTES: Final = 16 * 1024**2

# kinds
HELLO: Final = 1
DEFINE: Final = 2
CALL: Final = 3
REPLY: Final = 4

# flags
PICKLED: Final = 0
RAW: Final = 1
REFERENCE: Final = 2

# REPLY status codes
OK: Final = 0
RAISED: Final = 1  # the function raised; body: pickled RemoteFailure fields
EVICTED: Final = 2
EXPIRED: Final = 3
UNAUTHORIZED: Final = 4
TOO_LARGE: Final = 5  # body: TOO_LARGE_BODY (size, limit)
MALFORMED: Final = 6  # body: UTF-8 message
LOST: Final = 7  # never on the wire: the client's own status for a vanished worker

STATUS_NAMES: Final = {
    OK: "ok",
    RAISED: "raised",
    EVICTED: "evicted",
    EXPIRED: "expired",
    UNAUTHORIZED: "unauthorized",
    TOO_LARGE: "too large",
    MALFORMED: "malformed",
    LOST: "lost",
}

TOO_LARGE_BODY: Final = struct.Struct("<QQ")


def frame(kind: int, flags: int, code: int, call_id: int, body: bytes = b"") -> bytes:
    """One complete frame (header + body) ready for a single ``sendall``."""
    return HEADER.pack(len(body), kind, flags, code, call_id) + body


def encode_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, bytes]:
    """(flags, body) for a call: a single bytes argument travels as is, anything else pickled."""
    if not kwargs and len(args) == 1 and type(args[0]) is bytes:
        return RAW, args[0]
    return PICKLED, pickle.dumps((args, kwargs), protocol=5)


def decode_args(flags: int, body: bytes | memoryview) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Inverse of encode_args; raises ValueError on a body that is not a valid call."""
    if flags == RAW:
        return (bytes(body),), {}
    if flags != PICKLED:
        raise ValueError(f"unknown call flags {flags}")
    try:
        args, kwargs = pickle.loads(body)
    except Exception as exc:
        raise ValueError(f"call payload does not unpickle: {exc!r}") from None
    if not isinstance(args, tuple) or not isinstance(kwargs, dict):
        raise ValueError("call payload is not (args, kwargs)")
    return args, kwargs


def encode_result(value: Any) -> tuple[int, bytes]:
    """(flags, body) for a result: bytes as is, anything else pickled (cloudpickle if needed)."""
    if type(value) is bytes:
        return RAW, value
    try:
        return PICKLED, pickle.dumps(value, protocol=5)
    except Exception:
        import cloudpickle

        return PICKLED, cloudpickle.dumps(value, protocol=5)


def decode_result(flags: int, body: bytes | memoryview) -> Any:
    if flags == RAW:
        return bytes(body)
    return pickle.loads(body)


def encode_failure(exc: BaseException) -> bytes:
    """Body of a RAISED reply: the exception (pickled if it can be), its type, message, traceback."""
    tb_text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    exc_bytes: bytes | None = None
    try:
        data = pickle.dumps(exc, protocol=5)
        pickle.loads(data)  # some exceptions pickle but fail to unpickle (custom __init__)
        exc_bytes = data
    except Exception:
        pass
    kind = f"{type(exc).__module__}.{type(exc).__qualname__}"
    return pickle.dumps((exc_bytes, kind, str(exc), tb_text), protocol=5)


def decode_failure(body: bytes | memoryview) -> tuple[BaseException | None, str, str, str]:
    """(exception or None when it cannot be rebuilt here, type name, message, traceback text)."""
    exc_bytes, kind, message, tb_text = pickle.loads(body)
    exc: BaseException | None = None
    if exc_bytes is not None:
        try:
            loaded = pickle.loads(exc_bytes)
            exc = loaded if isinstance(loaded, BaseException) else None
        except Exception:
            exc = None
    return exc, str(kind), str(message), str(tb_text)


KEEPALIVE_IDLE_S: Final = 5
KEEPALIVE_INTERVAL_S: Final = 2
KEEPALIVE_PROBES: Final = 3


def keepalive(sock: socket.socket) -> None:
    """TCP keepalive so that a peer whose machine vanished is noticed in about 11 s."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (
        ("TCP_KEEPIDLE", KEEPALIVE_IDLE_S),
        ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_S),
        ("TCP_KEEPCNT", KEEPALIVE_PROBES),
    ):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
