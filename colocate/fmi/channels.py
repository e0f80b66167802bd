"""FMI channels: how one rank's messages reach another, and which channel a pair uses.

Every message is a header, an optional meta block and a payload::

    kind u8 | enc u8 | tag i32 | src u32 | meta_len u32 | payload_len u64

``enc`` says what the payload is: a pickled object, a numpy array (meta: dtype and shape,
payload: its bytes as they lie in memory, never pickled) or bytes. The payload goes straight
from the sender's buffer to the socket and from the socket into the receiver's new array.

Channels (:func:`route` picks one, FMI's cost model):

- ``shm``: ranks of the same lease (same node, one sandbox): a Unix socket in the lease's
  private /tmp; payloads of ``SHM_MIN_BYTES`` or more go as a memfd passed with
  SCM_RIGHTS (one copy in, mapped by the receiver), smaller ones inline.
- ``tcp``: ranks of different leases or nodes: TCP made by the supervisor outside the
  sandbox (``colocate.executor.fmi_sockets``), TCP_NODELAY, large socket buffers.
- ``redis``: every message through a real Redis list per receiving rank (FMI's storage
  channel), when a user forces it or direct connections are impossible; every message
  carries an HMAC under the group key and a per-sender sequence number.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import mmap
import os
import pickle
import socket
import struct
from collections import deque
from collections.abc import Callable
from typing import Any

HEADER = struct.Struct("<BBiIIQ")
HEADER_SIZE = HEADER.size
DATA, ABORT = 1, 2
ENC_OBJ, ENC_ARRAY, ENC_BYTES = 0, 1, 2
SHM_FLAG = 0x80  # in enc: the payload is in the next passed memfd
SHM_MIN_BYTES = 256 * 1024
SOCKET_BUFFER_BYTES = 4 * 1024 * 1024
CHANNELS = ("auto", "shm", "tcp", "redis")
_CHUNK = 1 << 20


def route(same_lease: bool, direct: bool, forced: str = "auto") -> str:
    """The channel between two ranks: ``forced`` unless "auto"; Redis when direct
    connections are impossible; shared memory within a lease (same node and sandbox), TCP
    otherwise. (Within ``shm``, the payload size picks inline bytes or a memfd.)"""
    if forced not in CHANNELS:
        raise ValueError(f"channel {forced!r}: choose one of {', '.join(CHANNELS)}")
    if forced == "shm" and not same_lease:
        return "tcp"  # shared memory cannot cross a lease's sandbox
    if forced != "auto":
        return forced
    if not direct:
        return "redis"
    return "shm" if same_lease else "tcp"


def encode(obj: Any) -> tuple[int, bytes, memoryview]:
    """(enc, meta, payload view) of a message; arrays and buffers are not copied."""
    cls = type(obj)
    if cls is bytes or cls is bytearray or cls is memoryview:
        view = memoryview(obj)
        if view.c_contiguous:
            return ENC_BYTES, b"", view if view.format == "B" and view.ndim == 1 else view.cast("B")
    np = _numpy_if_loaded()
    if np is not None and cls is np.ndarray and obj.dtype.hasobject is False:
        arr = obj if obj.flags.c_contiguous else np.ascontiguousarray(obj)
        meta = pickle.dumps((arr.dtype.str if arr.dtype.fields is None else arr.dtype, arr.shape))
        return (
            ENC_ARRAY,
            meta,
            memoryview(arr).cast("B") if arr.ndim else memoryview(arr.reshape(1)).cast("B"),
        )
    return ENC_OBJ, b"", memoryview(pickle.dumps(obj, protocol=5))


def _numpy_if_loaded() -> Any:
    import sys

    return sys.modules.get("numpy")


def target(enc: int, meta: bytes, length: int) -> tuple[Any, memoryview]:
    """A fresh buffer for a payload (the array it becomes, for arrays) and a byte view of it."""
    if enc == ENC_ARRAY:
        import numpy as np

        dtype, shape = pickle.loads(meta)
        arr = np.empty(shape, dtype=dtype)
        view = (
            memoryview(arr.reshape(-1) if arr.ndim != 1 else arr).cast("B")
            if arr.size
            else memoryview(b"")
        )
        return arr, view
    buf = bytearray(length)
    return buf, memoryview(buf)


def finish(enc: int, holder: Any) -> Any:
    """The value a received payload stands for."""
    if enc == ENC_OBJ:
        return pickle.loads(holder)
    if enc == ENC_BYTES:
        return bytes(holder) if not isinstance(holder, mmap.mmap) else holder[:]
    return holder


def from_shm(enc: int, meta: bytes, fd: int, length: int) -> Any:
    """A payload passed as a memfd: mapped, not copied (arrays become views of the mapping)."""
    try:
        mm = (
            mmap.mmap(fd, length, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            if length
            else None
        )
    finally:
        os.close(fd)
    if mm is None:
        return finish(enc, bytearray())
    if enc == ENC_ARRAY:
        import numpy as np

        dtype, shape = pickle.loads(meta)
        return np.frombuffer(mm, dtype=dtype).reshape(shape)
    if enc == ENC_OBJ:
        return pickle.loads(mm)
    return mm[:]


def to_memfd(payload: memoryview) -> int:
    """A memfd holding a copy of ``payload`` (the only copy on the shared-memory path)."""
    fd = os.memfd_create("colocate-fmi", os.MFD_CLOEXEC)
    os.ftruncate(fd, len(payload))
    with mmap.mmap(
        fd, len(payload), flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    ) as mm:
        mm[:] = payload
    return fd


class StreamPeer:
    """The connection to one peer rank: a non-blocking socket, its send queue and the
    message being received. ``unix`` peers may pass memfds (the shared-memory channel)."""

    __slots__ = (
        "body",
        "eof",
        "fds",
        "head",
        "holder",
        "inbox",
        "meta",
        "msg",
        "need",
        "outq",
        "rank",
        "shm",
        "sock",
        "stage",
        "view",
    )

    def __init__(self, rank: int, sock: socket.socket, shm: bool) -> None:
        self.rank = rank
        self.sock = sock
        self.shm = shm
        sock.setblocking(False)
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER_BYTES)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # outgoing: (bytes views, fd to pass with the first or -1)
        self.outq: deque[tuple[memoryview, int]] = deque()
        self.fds: deque[int] = deque()
        self.head = bytearray(HEADER_SIZE)
        self.stage = 0  # 0 header, 1 meta, 2 payload
        self.view = memoryview(self.head)
        self.need = HEADER_SIZE
        self.msg: tuple[int, int, int, int, int] = (0, 0, 0, 0, 0)
        self.meta = b""
        self.holder: Any = None
        self.body: memoryview | None = None
        self.inbox: Callable[[int, int, int, int, Any], None] | None = None
        self.eof = False

    def queue(
        self, kind: int, enc: int, tag: int, src: int, meta: bytes, payload: memoryview
    ) -> None:
        if self.shm and len(payload) >= SHM_MIN_BYTES:
            fd = to_memfd(payload)
            head = HEADER.pack(kind, enc | SHM_FLAG, tag, src, len(meta), len(payload))
            self.outq.append((memoryview(head + meta), fd))
            return
        head = HEADER.pack(kind, enc, tag, src, len(meta), len(payload))
        if len(payload) <= 65536:
            self.outq.append((memoryview(head + meta + payload), -1))
        else:
            self.outq.append((memoryview(head + meta), -1))
            self.outq.append((payload, -1))

    def flush(self) -> bool:
        """Send what the socket takes now; True when everything queued went out."""
        outq = self.outq
        sock = self.sock
        while outq:
            view, fd = outq[0]
            try:
                if fd >= 0:
                    sent = socket.send_fds(sock, [view], [fd])
                    os.close(fd)
                    fd = -1
                else:
                    sent = sock.send(view[: _CHUNK * 8])
            except (BlockingIOError, InterruptedError):
                return False
            except OSError:  # the peer is gone: what it was sent can never arrive
                self.eof = True
                self.drop_queue()
                return True
            if sent < len(view):
                outq[0] = (view[sent:], -1)
                if fd < 0 and sent == 0:
                    return False
                continue
            outq.popleft()
        return True

    def read(self) -> None:
        """Read what is there; complete messages go to ``inbox``. Sets ``eof`` at the end."""
        sock = self.sock
        while True:
            try:
                if self.shm:
                    n, anc, _flags, _addr = sock.recvmsg_into(
                        [self.view[: self.need]], socket.CMSG_SPACE(16 * 4)
                    )
                    for level, kind, data in anc:
                        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                            usable = len(data) - len(data) % 4
                            self.fds.extend(struct.unpack(f"{usable // 4}i", data[:usable]))
                else:
                    n = sock.recv_into(self.view, self.need)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                n = 0
            if n == 0:
                self.eof = True
                return
            self.need -= n
            self.view = self.view[n:]
            if self.need == 0:
                self._advance()

    def _advance(self) -> None:
        while self.need == 0:
            if self.stage == 0:
                self.msg = HEADER.unpack(self.head)
                _kind, enc, _tag, _src, meta_len, length = self.msg
                self.stage = 1
                self.meta = bytearray(meta_len)  # type: ignore[assignment]
                self.view = memoryview(self.meta)
                self.need = meta_len
            elif self.stage == 1:
                kind, enc, tag, _src, _meta_len, length = self.msg
                if enc & SHM_FLAG:
                    value = from_shm(enc & ~SHM_FLAG, bytes(self.meta), self.fds.popleft(), length)
                    self._deliver(kind, enc & ~SHM_FLAG, tag, value)
                    continue
                self.holder, self.body = target(enc, bytes(self.meta), length)
                self.stage = 2
                self.view = self.body
                self.need = length
            else:
                kind, enc, tag, _src, _meta_len, _length = self.msg
                self._deliver(
                    kind, enc, tag, finish(enc, self.holder) if kind == DATA else bytes(self.holder)
                )

    def _deliver(self, kind: int, enc: int, tag: int, value: Any) -> None:
        self.stage = 0
        self.view = memoryview(self.head)
        self.need = HEADER_SIZE
        self.holder = self.body = None
        assert self.inbox is not None
        self.inbox(self.rank, kind, enc, tag, value)

    def drop_queue(self) -> None:
        for _view, fd in self.outq:
            if fd >= 0:
                os.close(fd)
        self.outq.clear()

    def close(self) -> None:
        self.drop_queue()
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()
        self.sock.close()


class RedisInbox:
    """The storage channel: one Redis list per receiving rank, every message signed."""

    def __init__(self, client: Any, group: str, rank: int, key: bytes) -> None:
        self.client = client
        self.group = group
        self.rank = rank
        self.key = key
        self.sent: dict[int, int] = {}
        self.seen: dict[int, int] = {}
        self.mine = f"colocate-fmi:{group}:{rank}"

    def _mac(self, src: int, dst: int, seq: int, data: bytes | memoryview) -> bytes:
        mac = hmac.new(self.key, struct.pack("<IIQ", src, dst, seq), hashlib.sha256)
        mac.update(data)
        return mac.digest()

    def send(
        self, dst: int, kind: int, enc: int, tag: int, meta: bytes, payload: memoryview
    ) -> None:
        seq = self.sent.get(dst, 0)
        self.sent[dst] = seq + 1
        data = HEADER.pack(kind, enc, tag, self.rank, len(meta), len(payload)) + meta + payload
        self.client.rpush(
            f"colocate-fmi:{self.group}:{dst}", self._mac(self.rank, dst, seq, data) + data
        )

    def receive(self, timeout_s: float) -> tuple[int, int, int, int, Any] | None:
        """One message for this rank, waiting up to ``timeout_s``; None when none came.
        Raises PermissionError for a message that fails its HMAC (injected or replayed)."""
        got = self.client.blpop([self.mine], timeout=timeout_s)
        if got is None:
            return None
        raw = memoryview(got[1])
        mac, data = raw[:32], raw[32:]
        kind, enc, tag, src, meta_len, length = HEADER.unpack_from(data)
        seq = self.seen.get(src, 0)
        if not hmac.compare_digest(bytes(mac), self._mac(src, self.rank, seq, data)):
            raise PermissionError(f"a message on {self.mine} fails its HMAC (not from the group)")
        self.seen[src] = seq + 1
        meta = bytes(data[HEADER_SIZE : HEADER_SIZE + meta_len])
        body = data[HEADER_SIZE + meta_len : HEADER_SIZE + meta_len + length]
        if enc == ENC_ARRAY:
            import numpy as np

            dtype, shape = pickle.loads(meta)
            value: Any = np.frombuffer(body, dtype=dtype).reshape(shape)
        elif enc == ENC_OBJ or kind != DATA:
            value = pickle.loads(body) if kind == DATA else bytes(body)
        else:
            value = bytes(body)
        return src, kind, enc, tag, value

    def close(self) -> None:
        try:
            self.client.delete(self.mine)
        finally:
            self.client.close()
