"""FMI channels: how one rank's messages reach another, and which channel a pair uses.

Every message is a header, an optional meta block and a payload::

    kind u8 | enc u8 | tag i32 | src u32 | meta_len u32 | payload_len u64

``enc`` says what the payload is: a pickled object, a numpy array (meta: dtype and shape,
payload: its bytes as they lie in memory, never pickled) or bytes. The payload goes straight
from the sender's buffer to the socket and from the socket into the receiver's new array.

Channels (:func:`route` picks one, FMI's cost model):

- ``local``: ranks of the same lease (same node, one sandbox, one private /tmp and /dev/shm):
  a Unix socket in the lease's /tmp. It can pass payloads of ``SHM_MIN_BYTES`` or more as a
  memfd (SCM_RIGHTS: one copy in, mapped by the receiver); that is off by default because
  on this machine the one-shot memfd (fresh pages on both sides) lost to the socket: 64 MiB
  allreduce 227 MB/s vs 647 MB/s, 1 MiB 364 vs 508 MB/s. A persistent shared ring per pair
  would beat both; not built yet.
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
SHM_MIN_BYTES = 1 << 62  # memfd hand-off threshold: off (see the module docstring)
STAGE_BYTES = 256 * 1024  # receive staging buffer per peer
SOCKET_BUFFER_BYTES = 4 * 1024 * 1024
CHANNELS = ("auto", "local", "tcp", "redis")
_CHUNK = 1 << 20


def route(same_lease: bool, direct: bool, forced: str = "auto") -> str:
    """The channel between two ranks: ``forced`` unless "auto"; Redis when direct
    connections are impossible; the lease's Unix socket within a lease (same node and
    sandbox), TCP otherwise. (Within ``local``, the payload size picks the hand-off.)"""
    if forced not in CHANNELS:
        raise ValueError(f"channel {forced!r}: choose one of {', '.join(CHANNELS)}")
    if forced == "local" and not same_lease:
        return "tcp"  # the lease's /tmp is not shared with other leases
    if forced != "auto":
        return forced
    if not direct:
        return "redis"
    return "local" if same_lease else "tcp"


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
        meta = _meta(arr.dtype, arr.shape)
        return (
            ENC_ARRAY,
            meta,
            memoryview(arr).cast("B") if arr.ndim else memoryview(arr.reshape(1)).cast("B"),
        )
    return ENC_OBJ, b"", memoryview(pickle.dumps(obj, protocol=5))


_metas: dict[tuple[Any, tuple[int, ...]], bytes] = {}
_shapes: dict[bytes, tuple[Any, tuple[int, ...]]] = {}


def _meta(dtype: Any, shape: tuple[int, ...]) -> bytes:
    """The meta block of an array (cached: a loop sends the same shapes again and again)."""
    meta = _metas.get((dtype, shape))
    if meta is None:
        if len(_metas) > 256:
            _metas.clear()
        meta = _metas[(dtype, shape)] = pickle.dumps(
            (dtype.str if dtype.fields is None else dtype, shape)
        )
    return meta


def _dtype_shape(meta: bytes) -> tuple[Any, tuple[int, ...]]:
    found = _shapes.get(meta)
    if found is None:
        if len(_shapes) > 256:
            _shapes.clear()
        found = _shapes[meta] = pickle.loads(meta)
    return found


def _numpy_if_loaded() -> Any:
    import sys

    return sys.modules.get("numpy")


def target(enc: int, meta: bytes, length: int) -> tuple[Any, memoryview]:
    """A fresh buffer for a payload (the array it becomes, for arrays) and a byte view of it."""
    if enc == ENC_ARRAY:
        import numpy as np

        dtype, shape = _dtype_shape(meta)
        arr: Any = np.empty(shape, dtype=dtype)
        flat: Any = arr.reshape(-1)  # a view of arr's memory (C order), never a copy
        return arr, memoryview(flat).cast("B") if arr.size else memoryview(b"")
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

        dtype, shape = _dtype_shape(meta)
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
        "direct",
        "eof",
        "fds",
        "holder",
        "inbox",
        "msg",
        "outq",
        "rank",
        "se",
        "shm",
        "sock",
        "sp",
        "stage",
        "sview",
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
        # incoming: small messages are parsed out of a staging buffer (one system call for
        # many of them); a large payload goes straight into its own buffer (``direct``)
        self.stage = bytearray(STAGE_BYTES)
        self.sview = memoryview(self.stage)
        self.sp = 0  # parse position in the staging buffer
        self.se = 0  # end of the data in it
        self.direct: memoryview | None = None  # rest of a large payload still to receive
        self.holder: Any = None
        self.msg: tuple[int, int, int] = (0, 0, 0)  # kind, enc, tag of the large payload
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

    def _recv(self, view: memoryview) -> int:
        """One receive into ``view`` (passed memfds are queued); -1 when nothing is there."""
        try:
            if self.shm:
                n, anc, _flags, _addr = self.sock.recvmsg_into([view], socket.CMSG_SPACE(16 * 4))
                for level, kind, data in anc:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        usable = len(data) - len(data) % 4
                        self.fds.extend(struct.unpack(f"{usable // 4}i", data[:usable]))
                return n
            return self.sock.recv_into(view)
        except (BlockingIOError, InterruptedError):
            return -1
        except OSError:
            return 0

    def read(self) -> None:
        """Read what is there; complete messages go to ``inbox``. Sets ``eof`` at the end."""
        while True:
            if self.direct is not None:
                n = self._recv(self.direct)
                if n > 0:
                    self.direct = self.direct[n:]
                    if not len(self.direct):
                        self.direct = None
                        kind, enc, tag = self.msg
                        value, self.holder = self.holder, None
                        self._deliver(
                            kind, enc, tag, finish(enc, value) if kind == DATA else bytes(value)
                        )
                    continue
            else:
                if self.sp == self.se:
                    self.sp = self.se = 0
                elif self.se == len(self.stage):  # keep the partial message, make room
                    rest = self.se - self.sp
                    self.stage[:rest] = self.stage[self.sp : self.se]
                    self.sp, self.se = 0, rest
                if self.se == len(self.stage):
                    self._grow(len(self.stage) + 1)
                n = self._recv(self.sview[self.se :])
                if n > 0:
                    self.se += n
                    self._parse()
                    continue
            if n == 0:
                self.eof = True
            return

    def _parse(self) -> None:
        buf, view = self.stage, self.sview
        while self.direct is None:
            avail = self.se - self.sp
            if avail < HEADER_SIZE:
                return
            kind, enc, tag, _src, meta_len, length = HEADER.unpack_from(buf, self.sp)
            head_end = self.sp + HEADER_SIZE + meta_len
            if head_end > self.se:
                if HEADER_SIZE + meta_len > len(buf):
                    self._grow(HEADER_SIZE + meta_len)
                    buf, view = self.stage, self.sview
                return
            meta = bytes(view[self.sp + HEADER_SIZE : head_end])
            if enc & SHM_FLAG:
                self.sp = head_end
                self._deliver(
                    kind,
                    enc & ~SHM_FLAG,
                    tag,
                    from_shm(enc & ~SHM_FLAG, meta, self.fds.popleft(), length),
                )
                continue
            end = head_end + length
            if end <= self.se:  # whole message staged
                holder, target_view = target(enc, meta, length)
                target_view[:] = view[head_end:end]
                self.sp = end
                self._deliver(
                    kind, enc, tag, finish(enc, holder) if kind == DATA else bytes(holder)
                )
                continue
            if HEADER_SIZE + meta_len + length <= len(buf):
                return  # it fits: wait for the rest in the staging buffer
            # large: its own buffer, what is staged copied in, the rest received straight into it
            self.holder, target_view = target(enc, meta, length)
            got = self.se - head_end
            target_view[:got] = view[head_end : self.se]
            self.sp = self.se
            self.direct = target_view[got:]
            self.msg = (kind, enc, tag)

    def _grow(self, need: int) -> None:
        new = bytearray(max(need, 2 * len(self.stage)))
        rest = self.se - self.sp
        new[:rest] = self.stage[self.sp : self.se]
        self.sview.release()
        self.stage, self.sview = new, memoryview(new)
        self.sp, self.se = 0, rest

    def _deliver(self, kind: int, enc: int, tag: int, value: Any) -> None:
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

            dtype, shape = _dtype_shape(meta)
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
