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

The local control channels of an executor (a worker and its token verifier, the supervisor and
its fork server) carry *messages*: a little-endian u32 length, then that many body bytes.

This is the one framing of the project: every reader and writer of frames or messages uses
``frame``/``read_frame``/``FrameBuffer`` and ``message``/``send_message``/``recv_message``.
A frame or message that breaks the framing (longer than its limit, or cut short by the end of
the stream) raises ``FrameError``. Apart from these socket helpers and ``keepalive`` the module
is pure: encoding and decoding of frames and error bodies.
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
MESSAGE_LEN: Final = struct.Struct("<I")
MAX_MESSAGE_BYTES: Final = 1024**2  # a control message: a token check, a tally, a fork request
RECV_BUFFER_BYTES: Final = 256 * 1024  # a hot connection's receive buffer (grows for a frame)

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


class FrameError(ConnectionError):
    """A frame or message that breaks the framing: over its size limit, or cut short.

    A ``ConnectionError`` (so an ``OSError``): whoever reads a stream already drops the
    connection on ``OSError``, which is the only safe answer once the framing is lost.
    """


def message(body: bytes) -> bytes:
    """One length-prefixed message (u32 length + body) ready for a single ``sendall``."""
    return MESSAGE_LEN.pack(len(body)) + body


def send_message(sock: socket.socket, body: bytes) -> None:
    sock.sendall(MESSAGE_LEN.pack(len(body)) + body)


def _recv_exactly(sock: socket.socket, size: int, what: str) -> bytes:
    data = sock.recv(size, socket.MSG_WAITALL) if size else b""
    while 0 < len(data) < size:  # MSG_WAITALL returns early on a signal
        more = sock.recv(size - len(data), socket.MSG_WAITALL)
        if not more:
            break
        data += more
    if len(data) < size:
        raise FrameError(f"{what} cut short: the stream ended after {len(data)} of {size} bytes")
    return data


def recv_message(sock: socket.socket, limit: int = MAX_MESSAGE_BYTES) -> bytes | None:
    """The next message's body from a blocking socket; None at the end of the stream.

    Raises ``FrameError`` when the stream ends inside a message or its length is over
    ``limit`` bytes (the body is then not read: drop the connection), ``OSError`` on a
    socket error or timeout.
    """
    head = sock.recv(MESSAGE_LEN.size, socket.MSG_WAITALL)
    if not head:
        return None
    if len(head) < MESSAGE_LEN.size:
        head += _recv_exactly(sock, MESSAGE_LEN.size - len(head), "message length")
    (length,) = MESSAGE_LEN.unpack(head)
    if length > limit:
        raise FrameError(f"message of {length} bytes is over the limit of {limit} bytes")
    return _recv_exactly(sock, length, f"message of {length} bytes")


def read_frame(
    sock: socket.socket, limit: int = MAX_MESSAGE_BYTES
) -> tuple[int, int, int, int, bytes]:
    """The next whole frame ``(kind, flags, code, call_id, body)`` from a blocking socket
    (a handshake; streams of calls go through ``FrameBuffer``).

    Raises ``FrameError`` when the stream ends before or inside the frame, or its body is
    over ``limit`` bytes.
    """
    head = _recv_exactly(sock, HEADER_SIZE, "frame header")
    length, kind, flags, code, call_id = HEADER.unpack(head)
    if length > limit:
        raise FrameError(f"frame of {length} bytes is over the limit of {limit} bytes")
    return kind, flags, code, call_id, _recv_exactly(sock, length, f"frame of {length} bytes")


class FrameBuffer:
    """The receive buffer of a stream of frames, used by both ends of an invocation stream.

    ``buf[start:end]`` holds received bytes not consumed yet. ``fill`` receives into the free
    tail; ``header`` peeks at the next frame's header; ``body`` consumes a whole frame;
    ``drop`` consumes a header and discards its body as it arrives (an oversized frame);
    ``next_frame`` is ``header`` + ``body`` in one call.
    A plain slots class for the hot path: a worker and a client call these a few times per
    invocation.
    """

    __slots__ = ("buf", "end", "skip", "start", "view")

    def __init__(self, size: int = RECV_BUFFER_BYTES) -> None:
        self.buf = bytearray(size)
        self.view = memoryview(self.buf)
        self.start = 0
        self.end = 0
        self.skip = 0  # body bytes of a dropped frame still to discard

    def fill(self, sock: socket.socket) -> int:
        """One ``recv_into`` the free tail (room is made first when the buffer is full);
        the bytes received, 0 at the end of the stream. Socket errors propagate."""
        if self.end == len(self.buf):
            self.make_room(HEADER_SIZE)
        n = sock.recv_into(self.view[self.end :])
        self.end += n
        return n

    def header(self) -> tuple[int, int, int, int, int] | None:
        """``(length, kind, flags, code, call_id)`` of the next frame, not consumed; None until
        its 16 bytes are here."""
        if self.skip:
            drop = min(self.skip, self.end - self.start)
            self.skip -= drop
            self.start += drop
        if self.end - self.start < HEADER_SIZE:
            if self.start == self.end:
                self.start = self.end = 0
            return None
        return HEADER.unpack_from(self.buf, self.start)

    def body(self, length: int) -> memoryview | None:
        """Consume the frame whose header ``header`` returned (body ``length`` bytes) and
        return its body, a view valid until the next ``fill``; None until all of it is here
        (room for it is made)."""
        start = self.start + HEADER_SIZE
        stop = start + length
        if stop > self.end:
            self.make_room(HEADER_SIZE + length)
            return None
        self.start = stop
        return self.view[start:stop]

    def next_frame(self) -> tuple[int, int, int, int, memoryview] | None:
        """The next whole frame ``(kind, flags, code, call_id, body)``, consumed, or None until
        one is complete: ``header`` and ``body`` in one call, for a reader that takes every
        frame as it comes (the client). ``body`` is valid until the next ``fill``."""
        if self.skip:
            return None if self.header() is None else self.next_frame()
        start = self.start
        avail = self.end - start
        if avail < HEADER_SIZE:
            if not avail:
                self.start = self.end = 0
            return None
        length, kind, flags, code, call_id = HEADER.unpack_from(self.buf, start)
        stop = start + HEADER_SIZE + length
        if stop > self.end:
            self.make_room(HEADER_SIZE + length)
            return None
        self.start = stop
        return kind, flags, code, call_id, self.view[start + HEADER_SIZE : stop]

    def drop(self, length: int) -> None:
        """Consume the next frame's header and discard its ``length`` body bytes as they come."""
        self.start += HEADER_SIZE
        self.skip = length

    def make_room(self, need: int) -> None:
        """Move the unconsumed bytes to the front, growing the buffer to ``need`` bytes."""
        size = self.end - self.start
        if need > len(self.buf):
            new = bytearray(max(need, RECV_BUFFER_BYTES))
            new[:size] = self.view[self.start : self.end]
            self.view.release()
            self.buf = new
            self.view = memoryview(new)
        elif self.start:
            self.buf[:size] = self.buf[self.start : self.end]
        else:
            return
        self.start, self.end = 0, size


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
