"""FMI channels: how one rank's messages reach another, and which channel a pair uses.

Every message is a header, an optional meta block and a payload::

    kind u8 | enc u8 | tag i32 | src u32 | meta_len u32 | payload_len u64

``enc`` says what the payload is: a pickled object, a numpy array (meta: dtype and shape,
payload: its bytes as they lie in memory, never pickled) or bytes. The payload goes straight
from the sender's buffer to the channel and from the channel into the receiver's new array
(for allreduce, the received array then takes the fold: no second fresh array).

Channels (:func:`route` picks one, FMI's cost model):

- ``shm``: ranks of the same lease (same node, one sandbox): a shared-memory segment per
  pair (a memfd the dialing rank makes and passes over the pair's authenticated Unix socket):
  a lock-free single-producer ring per direction carries the messages with no system call,
  and two slots per direction carry small collective exchanges (``Comm.allreduce`` and
  ``barrier`` by recursive doubling: no header, no pickling for None, floats, ints and small
  arrays). A waiting rank spins, then sleeps in poll on the Unix socket, which the producer
  rings (one byte) only when the consumer said it sleeps. No HMAC per message: the segment
  is mapped by the two ranks alone (it has no name; the fd went only over a connection that
  proved the group key), so nothing else can write into it.
- ``local``: the same ranks over the Unix socket alone (when forced; a pair whose segment
  cannot be made or mapped ends the setup with the reason instead).
- ``tcp``: ranks of different leases or nodes: TCP made by the supervisor outside the
  sandbox (``colocate.executor.fmi_sockets``), TCP_NODELAY, large socket buffers.
- ``redis``: every message through a real Redis list per receiving rank (FMI's storage
  channel), when a user forces it or direct connections are impossible (for the whole group
  at once); every message carries an HMAC under the group key and a per-sender sequence
  number.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import mmap
import os
import pickle
import platform
import socket
import struct
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

HEADER = struct.Struct("<BBiIIQ")
HEADER_SIZE = HEADER.size
DATA, ABORT = 1, 2
ENC_OBJ, ENC_ARRAY, ENC_BYTES = 0, 1, 2
STAGE_BYTES = 256 * 1024  # receive staging buffer per peer
DIRECT_MIN_BYTES = 64 * 1024  # shm: a payload this large skips the staging buffer
SOCKET_BUFFER_BYTES = 4 * 1024 * 1024
CHANNELS = ("auto", "shm", "local", "tcp", "redis")
_CHUNK = 1 << 20


def route(same_lease: bool, direct: bool, forced: str = "auto", same_node: bool = False) -> str:
    """The channel between two ranks: ``forced`` unless "auto"; Redis when direct
    connections are impossible; shared memory within a lease, and between leases on the same
    node when ``same_node`` (both ranks can get the pair's segment from the node's
    supervisor), TCP otherwise. ``local`` forced between leases is TCP (a lease's /tmp is its
    own), so is ``shm`` between leases that cannot share a segment; either is Redis without
    direct connections. Redis is all or nothing: ``direct`` is the whole group's (every
    member has a listener), so every pair agrees."""
    if forced not in CHANNELS:
        raise ValueError(f"channel {forced!r}: choose one of {', '.join(CHANNELS)}")
    if not same_lease and (forced == "local" or (forced == "shm" and not (same_node and direct))):
        return "tcp" if direct else "redis"
    if forced != "auto":
        return forced
    if not direct:
        return "redis"
    return "shm" if same_lease or same_node else "tcp"


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
        return bytes(holder)
    return holder


class StreamPeer:
    """The connection to one peer rank over a socket (``local``: Unix, ``tcp``): a
    non-blocking socket, its send queue and the message being received."""

    __slots__ = (
        "direct",
        "eof",
        "holder",
        "inbox",
        "kind",
        "msg",
        "outq",
        "rank",
        "se",
        "sock",
        "sp",
        "stage",
        "sview",
    )

    def __init__(self, rank: int, sock: socket.socket, kind: str = "tcp") -> None:
        self.rank = rank
        self.sock = sock
        self.kind = kind  # the channel's name: "local", "tcp" or "shm"
        sock.setblocking(False)
        if kind != "shm":
            for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER_BYTES)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.outq: deque[memoryview] = deque()
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
        head = HEADER.pack(kind, enc, tag, src, len(meta), len(payload))
        if len(payload) <= 65536:
            self.outq.append(memoryview(head + meta + payload))
        else:
            self.outq.append(memoryview(head + meta))
            self.outq.append(payload)

    def _send(self, view: memoryview) -> int:
        """Bytes of ``view`` taken now; -1: none (full); raises OSError when the peer is gone."""
        try:
            return self.sock.send(view[: _CHUNK * 8]) or -1
        except (BlockingIOError, InterruptedError):
            return -1

    def flush(self) -> bool:
        """Send what the channel takes now; True when everything queued went out."""
        outq = self.outq
        while outq:
            view = outq[0]
            try:
                sent = self._send(view)
            except OSError:  # the peer is gone: what it was sent can never arrive
                self.eof = True
                self.drop_queue()
                return True
            if sent < 0:
                return False
            if sent < len(view):
                outq[0] = view[sent:]
                continue
            outq.popleft()
        return True

    def _recv(self, view: memoryview) -> int:
        """One receive into ``view``; -1 when nothing is there, 0 at the end of the stream."""
        try:
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
        self.outq.clear()

    def close(self) -> None:
        self.drop_queue()
        self.sock.close()


# -- the shared-memory channel -----------------------------------------------------------------
# One memfd per pair of ranks of the same lease, made by the dialing rank and passed over the
# pair's (HMAC-authenticated) Unix socket. Two directions, each with a control block, two
# collective slots and a byte ring:
#
#   control (256 B per direction, counters on their own cache lines, native u64):
#     W  bytes written into the ring (producer)     R  bytes read from it (consumer)
#     SLEEP  the consumer sleeps in poll: ring the doorbell (a byte on the Unix socket)
#     SEQ  collective slot exchanges published (producer)
#     SPACE  the producer sleeps waiting for ring space: ring it after reading
#   slots: 2 x SLOT_BYTES per direction (exchange n uses slot n % 2): kind u32, meta_len u32,
#     length u32, pad u32, key u64 (an array's: 8 bytes of BLAKE2b of its meta, so the
#     receiver maps a known dtype and shape to a cached view of the slot without reading the
#     meta), meta, payload (aligned to 16)
#   ring: ring_bytes(peers) per direction (the segment's size says which)
#
# Single producer, single consumer, no lock: the producer copies data in, then publishes W
# (or SEQ); the consumer reads W (SEQ), then the data, then publishes R. x86-64 keeps stores in
# order and loads in order (TSO), so that is enough there; elsewhere every publish is fenced.
# A consumer about to sleep sets SLEEP, fences, and looks once more; a producer publishes,
# fences, and rings when SLEEP is set (Dekker: both fences needed). The fence is an
# uncontended lock's acquire/release (an atomic read-modify-write in libc).
RING_BYTES = 4 * 1024 * 1024  # per direction, for a rank with one same-lease peer
RING_BUDGET = 32 * 1024 * 1024  # ring memory of one rank, all its same-lease pairs together
MIN_RING_BYTES = 256 * 1024
SLOT_BYTES = 1024
SLOT_HEAD = struct.Struct("=III4xQ")  # kind, meta_len, length, key (arrays: of the meta)
_SLOT_DATA = 32  # meta, then the payload at the next multiple of 16
SLOT_MAX = SLOT_BYTES - _SLOT_DATA - 16  # meta + payload that fit a slot
_CTRL = 256
_SLOTS = 512
_RING = _SLOTS + 4 * SLOT_BYTES
_W, _R, _SLEEP, _SEQ, _SPACE = 0, 8, 16, 24, 28  # u64 indexes in a direction's control
_TSO = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
_fence_lock = threading.Lock()
SLOT_NONE, SLOT_FLOAT, SLOT_INT, SLOT_ARRAY, SLOT_OBJ, SLOT_STREAM = range(6)


def fence() -> None:
    """A full memory barrier (an atomic read-modify-write in the lock)."""
    _fence_lock.acquire()
    _fence_lock.release()


def ring_bytes(same_lease_peers: int) -> int:
    """Ring size per direction when a rank has ``same_lease_peers`` shm peers: 4 MiB for
    one, less for many (a rank's rings stay within ``RING_BUDGET``, counted against its
    lease's memory as they are touched), never under 256 KiB; a power of two."""
    size = RING_BYTES
    while size > MIN_RING_BYTES and 2 * size * max(1, same_lease_peers) > RING_BUDGET:
        size //= 2
    return size


def segment_bytes(ring: int) -> int:
    return _RING + 2 * ring


def new_segment(ring: int = RING_BYTES) -> tuple[int, mmap.mmap]:
    """A zeroed memfd for one pair with rings of ``ring`` bytes, and its mapping (the
    dialing rank makes it)."""
    fd = os.memfd_create("colocate-fmi-pair", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, segment_bytes(ring))
        return fd, mmap.mmap(fd, segment_bytes(ring), flags=mmap.MAP_SHARED)
    except BaseException:
        os.close(fd)
        raise


def map_segment(fd: int, ring: int = RING_BYTES) -> mmap.mmap:
    """The mapping of a pair's memfd received from the dialing rank (checked for size)."""
    try:
        if os.fstat(fd).st_size != segment_bytes(ring):
            raise ConnectionError("the peer's shared-memory segment has the wrong size")
        return mmap.mmap(fd, segment_bytes(ring), flags=mmap.MAP_SHARED)
    finally:
        os.close(fd)


class ShmPeer(StreamPeer):
    """A peer on the same node: messages through the pair's shared rings (the same framing
    as the sockets, with no system call), the pair's socket (Unix within a lease, TCP
    between leases) kept as doorbell and end-of-stream;
    small collectives through the slots (:meth:`put_slot`, :meth:`take_slot`)."""

    __slots__ = (
        "ctrl",
        "ibase",
        "in_views",
        "iring",
        "islots",
        "mm",
        "obase",
        "oring",
        "oslots",
        "out_views",
        "ring",
        "seq_in",
        "seq_out",
        "view",
        "written",
    )

    def __init__(self, rank: int, sock: socket.socket, mm: mmap.mmap, low: bool) -> None:
        super().__init__(rank, sock, "shm")
        self.mm = mm
        self.view = memoryview(mm)
        self.ctrl = self.view[: 2 * _CTRL].cast("Q")
        out, inc = (0, 1) if low else (1, 0)  # direction 0: lower rank -> higher rank
        self.obase, self.ibase = out * (_CTRL // 8), inc * (_CTRL // 8)
        self.oslots = self.view[_SLOTS + out * 2 * SLOT_BYTES : _SLOTS + (out + 1) * 2 * SLOT_BYTES]
        self.islots = self.view[_SLOTS + inc * 2 * SLOT_BYTES : _SLOTS + (inc + 1) * 2 * SLOT_BYTES]
        ring = self.ring = (len(mm) - _RING) // 2
        self.oring = self.view[_RING + out * ring : _RING + (out + 1) * ring]
        self.iring = self.view[_RING + inc * ring : _RING + (inc + 1) * ring]
        self.seq_out = 0  # slot exchanges this rank published to the peer
        self.seq_in = 0  # slot exchanges it took from the peer
        self.out_views: dict[tuple[int, Any, tuple[int, ...]], tuple[Any, int, bytes, int]] = {}
        self.written = [0, 0]  # per slot: key of the array meta it holds (0: none)
        self.in_views: dict[tuple[int, int], Any] = {}
        if _ndarray is None:
            np = _numpy_if_loaded()
            _set_ndarray(np.ndarray if np is not None else None)

    def _ring(self) -> None:
        """After a publish: wake the peer if it sleeps in poll."""
        fence()
        if self.ctrl[self.obase + _SLEEP]:
            with contextlib.suppress(OSError):
                self.sock.send(b"!")

    def _send(self, view: memoryview) -> int:
        ctrl, base = self.ctrl, self.obase
        w = ctrl[base + _W]
        ring = self.ring
        n = min(len(view), ring - (w - ctrl[base + _R]))
        if n <= 0:
            return -1
        i = w % ring
        first = min(n, ring - i)
        self.oring[i : i + first] = view[:first]
        if n > first:
            self.oring[: n - first] = view[first:n]
        if not _TSO:
            fence()
        ctrl[base + _W] = w + n
        self._ring()
        return n

    def _recv(self, view: memoryview) -> int:
        ctrl, base = self.ctrl, self.ibase
        r = ctrl[base + _R]
        n = min(len(view), ctrl[base + _W] - r)
        if n <= 0:
            return -1
        if not _TSO:
            fence()
        ring = self.ring
        i = r % ring
        first = min(n, ring - i)
        view[:first] = self.iring[i : i + first]
        if n > first:
            view[first:n] = self.iring[: n - first]
        ctrl[base + _R] = r + n
        fence()
        if ctrl[base + _SPACE]:
            with contextlib.suppress(OSError):
                self.sock.send(b"!")
        return n

    def read(self) -> None:
        """As :meth:`StreamPeer.read`; a large message at the head of the ring goes from the
        ring straight into its array (not through the staging buffer)."""
        if self.direct is None and self.sp == self.se:
            self._large_head()
        StreamPeer.read(self)

    def _large_head(self) -> None:
        ctrl, base, ring = self.ctrl, self.ibase, self.ring
        r = ctrl[base + _R]
        avail = ctrl[base + _W] - r
        if avail < HEADER_SIZE:
            return
        i = r % ring
        if i + HEADER_SIZE <= ring:
            head = HEADER.unpack_from(self.iring, i)
        else:
            head = HEADER.unpack(
                bytes(self.iring[i:]) + bytes(self.iring[: HEADER_SIZE - (ring - i)])
            )
        kind, enc, tag, _src, meta_len, length = head
        if length < DIRECT_MIN_BYTES or avail < HEADER_SIZE + meta_len:
            return
        front = bytearray(HEADER_SIZE + meta_len)
        self._recv(memoryview(front))  # header and meta: all there (avail said so)
        self.holder, self.direct = target(enc, bytes(front[HEADER_SIZE:]), length)
        self.msg = (kind, enc, tag)

    def pending(self) -> bool:
        """Something to read: ring bytes or a slot exchange."""
        ctrl, base = self.ctrl, self.ibase
        return ctrl[base + _W] != ctrl[base + _R] or ctrl[base + _SEQ] > self.seq_in

    def ring_pending(self) -> bool:
        """Ring bytes to read (a published slot waits for its collective to take it)."""
        ctrl, base = self.ctrl, self.ibase
        return bool(ctrl[base + _W] != ctrl[base + _R])

    def sleeping(self, on: bool) -> None:
        """Ask the peer to ring when it writes (and, with messages queued here, when it
        frees ring space); off again after the sleep."""
        self.ctrl[self.ibase + _SLEEP] = 1 if on else 0
        self.ctrl[self.obase + _SPACE] = 1 if on and self.outq else 0

    def writable(self) -> bool:
        """Queued messages and room in the ring for some of them."""
        ctrl, base = self.ctrl, self.obase
        return bool(self.outq) and ctrl[base + _W] - ctrl[base + _R] < self.ring

    def wake(self) -> None:
        """The doorbell rang or the socket ended: drain it; at its end, the last ring bytes
        are read and ``eof`` is set."""
        while True:
            try:
                data = self.sock.recv(4096)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                StreamPeer.read(self)  # what was written before the end
                self.eof = True
                self.drop_queue()  # it finished or died: what it was sent is never read
                return

    # -- slots (small collective exchanges) ----------------------------------------------------
    def put_slot(self, value: Any) -> bool:
        """Publish ``value`` in the next slot; False when it does not fit (send it by the
        stream: the slot then says so)."""
        seq = self.seq_out + 1
        off = (seq & 1) * SLOT_BYTES
        slot = self.oslots
        cls = type(value)
        fits = True
        if cls is _ndarray:
            ent = self.out_views.get((seq & 1, value.dtype, value.shape))
            if ent is None:
                ent = self._out_view(seq & 1, value)
            if ent is not None:
                dst, key, meta, length = ent
                if self.written[seq & 1] != key:  # the slot's meta is another's: rewrite it
                    slot[off + _SLOT_DATA : off + _SLOT_DATA + len(meta)] = meta
                    self.written[seq & 1] = key
                dst[...] = value
                SLOT_HEAD.pack_into(slot, off, SLOT_ARRAY, len(meta), length, key)
            else:
                SLOT_HEAD.pack_into(slot, off, SLOT_STREAM, 0, 0, 0)
                fits = False
        elif value is None:
            SLOT_HEAD.pack_into(slot, off, SLOT_NONE, 0, 0, 0)
        elif cls is float:
            SLOT_HEAD.pack_into(slot, off, SLOT_FLOAT, 0, 8, 0)
            _F64.pack_into(slot, off + _SLOT_DATA, value)
        elif cls is int and -(1 << 63) <= value < (1 << 63):
            SLOT_HEAD.pack_into(slot, off, SLOT_INT, 0, 8, 0)
            _I64.pack_into(slot, off + _SLOT_DATA, value)
        else:
            np = _numpy_if_loaded()
            if np is not None and cls is np.ndarray:  # numpy came after the mesh
                _set_ndarray(np.ndarray)
                return self.put_slot(value)
            enc, _meta_b, payload = encode(value)
            if enc != ENC_OBJ or len(payload) > SLOT_MAX:
                SLOT_HEAD.pack_into(slot, off, SLOT_STREAM, 0, 0, 0)
                fits = False
            else:
                SLOT_HEAD.pack_into(slot, off, SLOT_OBJ, 0, len(payload), 0)
                slot[off + _SLOT_DATA : off + _SLOT_DATA + len(payload)] = payload
        if cls is not _ndarray:
            self.written[seq & 1] = 0  # the meta area now holds something else
        if not _TSO:
            fence()
        self.ctrl[self.obase + _SEQ] = seq
        self.seq_out = seq
        self._ring()
        return fits

    def _out_view(self, parity: int, value: Any) -> tuple[Any, int, bytes, int] | None:
        """(array view of the outgoing slot, key, meta, payload length) for arrays of
        ``value``'s dtype and shape; None when they do not fit."""
        if value.dtype.hasobject:
            return None
        meta = _meta(value.dtype, value.shape)
        start = _SLOT_DATA + _aligned(len(meta))
        if start + value.nbytes > SLOT_BYTES:
            return None
        import numpy as np

        off = parity * SLOT_BYTES
        key = _meta_key(meta)
        dst = np.frombuffer(self.oslots, value.dtype, value.size, off + start).reshape(value.shape)
        if len(self.out_views) > 64:
            self.out_views.clear()
        ent = (dst, key, meta, value.nbytes)
        self.out_views[(parity, value.dtype, value.shape)] = ent
        return ent

    def slot_ready(self) -> bool:
        return self.ctrl[self.ibase + _SEQ] > self.seq_in

    def take_slot(self) -> tuple[bool, Any]:
        """(True, value) of the peer's next slot exchange (an array is a view of the slot,
        valid until this rank's next exchange with the peer); (False, None) when the value
        comes by the stream. Call after :meth:`slot_ready`."""
        if not _TSO:
            fence()
        seq = self.seq_in + 1
        self.seq_in = seq
        off = (seq & 1) * SLOT_BYTES
        slot = self.islots
        kind, meta_len, length, key = SLOT_HEAD.unpack_from(slot, off)
        if kind == SLOT_ARRAY:
            view = self.in_views.get((seq & 1, key))
            return True, view if view is not None else self._in_view(seq & 1, key, meta_len)
        if kind == SLOT_FLOAT:
            return True, _F64.unpack_from(slot, off + _SLOT_DATA)[0]
        if kind == SLOT_INT:
            return True, _I64.unpack_from(slot, off + _SLOT_DATA)[0]
        if kind == SLOT_NONE:
            return True, None
        if kind == SLOT_OBJ and length <= SLOT_MAX:
            return True, pickle.loads(slot[off + _SLOT_DATA : off + _SLOT_DATA + length])
        return False, None  # SLOT_STREAM

    def _in_view(self, parity: int, key: int, meta_len: int) -> Any:
        off = parity * SLOT_BYTES
        if meta_len > SLOT_MAX:
            raise ConnectionError(f"rank {self.rank} wrote a malformed collective slot")
        meta = bytes(self.islots[off + _SLOT_DATA : off + _SLOT_DATA + meta_len])
        if _meta_key(meta) != key:
            raise ConnectionError(f"rank {self.rank} wrote a malformed collective slot")
        import numpy as np

        dtype, shape = _dtype_shape(meta)
        count = 1
        for dim in shape:
            count *= dim
        start = off + _SLOT_DATA + _aligned(meta_len)
        if start - off + count * np.dtype(dtype).itemsize > SLOT_BYTES:
            raise ConnectionError(f"rank {self.rank} wrote a malformed collective slot")
        view = np.frombuffer(self.islots, dtype, count, start).reshape(shape)
        if len(self.in_views) > 64:
            self.in_views.clear()
        self.in_views[(parity, key)] = view
        return view

    def close(self) -> None:
        super().close()
        self.in_views.clear()  # numpy views of the mapping go first
        self.out_views.clear()
        with contextlib.suppress(BufferError):
            for view in (self.ctrl, self.oslots, self.islots, self.oring, self.iring, self.view):
                view.release()
            self.mm.close()


_F64 = struct.Struct("=d")
_I64 = struct.Struct("=q")
_ndarray: Any = None  # numpy.ndarray once numpy is loaded (set by ShmPeer)


def _set_ndarray(cls: Any) -> None:
    global _ndarray
    _ndarray = cls


def _aligned(n: int) -> int:
    return (n + 15) & ~15


def _meta_key(meta: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(meta, digest_size=8).digest(), "little")


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
