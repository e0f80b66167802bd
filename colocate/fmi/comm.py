"""The communicator a function gets on every rank of an FMI group (mpi4py's vocabulary).

``comm.rank`` and ``comm.size``; point to point ``send``/``recv`` (tags, ``ANY_SOURCE``,
``ANY_TAG``) and the non-blocking ``isend``/``irecv`` (a :class:`Request` with ``wait`` and
``test``); collectives ``barrier``, ``bcast``, ``reduce``, ``allreduce``, ``gather``,
``allgather``, ``scatter`` and ``scan`` with ``SUM``, ``PROD``, ``MIN``, ``MAX`` or any
two-argument function (folded in rank order, so it need not commute). Objects travel pickled;
numpy arrays and bytes-like buffers travel as their bytes (no pickling, no extra copy).

Failures end every rank, never hang one: a rank whose function raises sends an abort to its
peers, which raise :class:`GroupAborted` naming it; a peer that vanishes (its lease evicted,
its worker killed) or a rank whose own lease is being evicted ends the call with
``LeaseEvicted`` on every rank.
"""

from __future__ import annotations

import contextlib
import operator
import pickle
import select
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from colocate.errors import ColocateError, LeaseEvicted
from colocate.fmi import channels as ch

ANY_SOURCE = -1
ANY_TAG = -1
_COLL = -2  # collectives: FIFO per pair, all ranks call them in the same order
_POLL_MS = 50  # how often a waiting rank looks at its own lease's eviction
HOT_WAIT_S = 0.0005  # a waiting rank busy-polls this long before it blocks


class GroupAborted(ColocateError):
    """Another rank of the group raised; ``rank`` says which, ``reason`` what it raised."""

    def __init__(self, rank: int, reason: str) -> None:
        self.rank = rank
        self.reason = reason
        super().__init__(f"rank {rank} of the group raised {reason}; this rank stopped too")

    def __reduce__(self) -> Any:
        return (GroupAborted, (self.rank, self.reason))


class Op:
    """A reduction: ``ufunc`` for numpy arrays (in place, no temporaries), ``fn`` otherwise."""

    __slots__ = ("fn", "name", "uf", "ufunc")

    def __init__(self, name: str, fn: Callable[[Any, Any], Any], ufunc: str = "") -> None:
        self.name = name
        self.fn = fn
        self.ufunc = ufunc
        self.uf: Any = None  # the numpy ufunc, once looked up

    def __repr__(self) -> str:
        return self.name


SUM = Op("SUM", operator.add, "add")
PROD = Op("PROD", operator.mul, "multiply")
MIN = Op("MIN", min, "minimum")
MAX = Op("MAX", max, "maximum")


def _combine(low: Any, high: Any, op: Op, spare: Any = None) -> Any:
    """``op(low, high)`` as a new value (an array of the slot is read, never kept); into
    ``spare`` (one of the two, an array this rank owns) when its dtype and shape fit."""
    if op.ufunc:
        np = sys.modules.get("numpy")
        if np is not None and type(low) is np.ndarray and type(high) is np.ndarray:
            ufunc = op.uf
            if ufunc is None:
                ufunc = op.uf = getattr(np, op.ufunc)
            if spare is None:
                return ufunc(low, high)
            if low.shape == high.shape and np.result_type(low, high) == spare.dtype:
                return ufunc(low, high, out=spare)
            return ufunc(low, high)
        if np is not None and isinstance(high, np.ndarray):
            high = high.copy()
        if np is not None and isinstance(low, np.ndarray):
            low = low.copy()
    return op.fn(low, high)


def fold(values: Sequence[Any], op: Op | Callable[[Any, Any], Any]) -> Any:
    """``op`` over ``values`` in rank order (left fold)."""
    if isinstance(op, Op) and op.ufunc:
        import sys

        np = sys.modules.get("numpy")
        if np is not None and all(type(v) is np.ndarray for v in values):
            ufunc = getattr(np, op.ufunc)
            if len(values) == 1:
                return np.array(values[0], copy=True)
            acc = ufunc(values[0], values[1])  # a new array: the inputs stay as they were
            for v in values[2:]:
                ufunc(acc, v, out=acc)
            return acc
    fn = op.fn if isinstance(op, Op) else op
    acc = values[0]
    for v in values[1:]:
        acc = fn(acc, v)
    return acc


class Request:
    """A non-blocking operation: ``wait()`` returns its value (the message for ``irecv``,
    None for ``isend``), ``test()`` says whether it is done without blocking."""

    __slots__ = ("_comm", "_done", "_key", "_value")

    def __init__(self, comm: Comm, key: tuple[int, int] | None, value: Any = None) -> None:
        self._comm = comm
        self._key = key  # (source, tag) of an irecv; None: a send
        self._done = key is None and value is True
        self._value = value

    def test(self) -> bool:
        if self._done:
            return True
        comm = self._comm
        comm._progress(0)
        if self._key is None:
            self._done = comm._sent_all(self._value)
        else:
            found = comm._take(*self._key)
            if found is not None:
                self._value, self._done = found, True
        return self._done

    def wait(self) -> Any:
        comm = self._comm
        if self._key is None:
            comm._wait_sent(self._value)
            self._done = True
            return None
        if not self._done:
            self._value = comm._wait_recv(*self._key)[1]
            self._done = True
        return self._value


class Comm:
    """One rank's view of its group. Built by ``colocate.fmi.rank``; not made by users."""

    def __init__(
        self,
        rank: int,
        size: int,
        peers: dict[int, ch.StreamPeer],
        redis: ch.RedisInbox | None = None,
        evicting: Callable[[], bool] = lambda: False,
        describe: Callable[[int], str] = str,
    ) -> None:
        self.rank = rank
        self.size = size
        self._peers = peers
        self._redis = redis
        self._evicting = evicting
        self._describe = describe
        self._inbox: dict[tuple[int, int], deque[Any]] = {}
        self._arrivals: deque[tuple[int, int]] = deque()  # order, for ANY_SOURCE / ANY_TAG
        self._poller = select.poll()
        self._by_fd: dict[int, ch.StreamPeer] = {}
        self._shm = [p for p in peers.values() if isinstance(p, ch.ShmPeer)]
        self._sockets = len(self._shm) < len(peers)  # any peer over a socket (poll it)
        # allreduce (builtin ops) and barrier by recursive doubling when every peer is in
        # shared memory. _doubling also works in mixed groups (shm partners through the slots,
        # the others through their sockets; tested), but measured on this 2-core machine with
        # 3-4 ranks it took ~1.1 ms for 8 bytes against 50-600 us by gathering, so mixed groups
        # gather until that is understood. Every rank must make the same choice: a group is
        # all shm on every rank or on none (the mesh is all one lease or one node, or not).
        self._fast = bool(peers) and not self._sockets
        for peer in peers.values():
            peer.inbox = self._arrived
            self._by_fd[peer.sock.fileno()] = peer
            self._poller.register(peer.sock.fileno(), select.POLLIN)
        self._writing: set[int] = set()
        self._closed = False
        self._aborted = False
        self._gone: set[int] = set()  # peers whose stream ended (finished, evicted or lost)
        self._finishing = False

    @property
    def channels(self) -> dict[int, str]:
        """The channel to each other rank (``shm``, ``local``, ``tcp`` or ``redis``)."""
        if self._redis is not None:
            return {r: "redis" for r in range(self.size) if r != self.rank}
        return {r: p.kind for r, p in sorted(self._peers.items())}

    # -- point to point -------------------------------------------------------------------
    def send(self, obj: Any, dest: int, tag: int = 0) -> None:
        """Send ``obj`` to rank ``dest``; returns once it has left this rank's buffers."""
        self.isend(obj, dest, tag).wait()

    def isend(self, obj: Any, dest: int, tag: int = 0) -> Request:
        """Start sending ``obj``; an array or buffer must not change until ``wait()``."""
        self._check_tag(tag)
        return self._isend(obj, dest, tag)

    def recv(self, source: int = ANY_SOURCE, tag: int = ANY_TAG) -> Any:
        """The next message from ``source`` with ``tag`` (``ANY_SOURCE``/``ANY_TAG``: any)."""
        return self._wait_recv(self._check_rank(source, True), tag)[1]

    def irecv(self, source: int = ANY_SOURCE, tag: int = ANY_TAG) -> Request:
        return Request(self, (self._check_rank(source, True), tag))

    def _check_tag(self, tag: int) -> None:
        if not isinstance(tag, int) or tag < 0:
            raise ValueError(f"tag {tag!r}: tags are integers >= 0")

    def _check_rank(self, rank: int, any_ok: bool = False) -> int:
        if any_ok and rank == ANY_SOURCE:
            return rank
        if not isinstance(rank, int) or not 0 <= rank < self.size:
            raise ValueError(f"rank {rank!r}: this group has ranks 0..{self.size - 1}")
        return rank

    def _isend(self, obj: Any, dest: int, tag: int) -> Request:
        self._check_rank(dest)
        if dest == self.rank:
            self._arrived(self.rank, ch.DATA, ch.ENC_OBJ, tag, obj)
            return Request(self, None, True)
        enc, meta, payload = ch.encode(obj)
        if self._redis is not None:
            self._redis.send(dest, ch.DATA, enc, tag, meta, payload)
            return Request(self, None, True)
        peer = self._peers[dest]
        peer.queue(ch.DATA, enc, tag, self.rank, meta, payload)
        if not peer.flush():
            self._want_write(peer)
        return Request(self, None, peer)

    def _sent_all(self, what: Any) -> bool:
        return what is True or not what.outq

    def _wait_sent(self, what: Any) -> None:
        hot_until = time.perf_counter() + HOT_WAIT_S
        while not self._sent_all(what):
            now = time.perf_counter()
            if self._progress(0 if now < hot_until else _POLL_MS):
                hot_until = now + HOT_WAIT_S

    def _want_write(self, peer: ch.StreamPeer) -> None:
        if isinstance(peer, ch.ShmPeer):
            return  # the ring drains as the peer reads; _progress pushes the rest
        fd = peer.sock.fileno()
        if fd not in self._writing:
            self._writing.add(fd)
            self._poller.modify(fd, select.POLLIN | select.POLLOUT)

    def _arrived(self, src: int, kind: int, enc: int, tag: int, value: Any) -> None:
        if self._finishing:
            return  # this rank's function returned: nothing more is wanted
        if kind == ch.ABORT:
            failed, what, reason = pickle.loads(value)
            if what == "evicted":
                raise self._evicted(failed, "was evicted; the group's call ended")
            raise GroupAborted(failed, reason)
        self._inbox.setdefault((src, tag), deque()).append(value)
        self._arrivals.append((src, tag))

    def _take(self, source: int, tag: int) -> tuple[int, Any] | None:
        if source != ANY_SOURCE and tag != ANY_TAG:
            queue = self._inbox.get((source, tag))
            if queue:
                self._arrivals.remove((source, tag))
                return source, queue.popleft()
            return None
        for key in self._arrivals:
            src, t = key
            if (source == ANY_SOURCE or src == source) and (
                t == tag or (tag == ANY_TAG and t >= 0)
            ):
                self._arrivals.remove(key)
                return src, self._inbox[key].popleft()
        return None

    def _wait_recv(self, source: int, tag: int) -> tuple[int, Any]:
        hot_until = 0.0
        while True:
            found = self._take(source, tag)
            if found is not None:
                return found
            if source in self._gone:
                self._lost(source)
            if source == ANY_SOURCE and self._gone and len(self._gone) == len(self._peers):
                self._lost(min(self._gone))
            # spin a little before sleeping in poll: a peer's answer usually comes within
            # microseconds, and waking from poll costs more than that (MPI spins for good);
            # bytes moving (a large message streaming) keep the rank spinning
            now = time.perf_counter()
            if not hot_until:
                hot_until = now + HOT_WAIT_S
            if self._progress(0 if now < hot_until else _POLL_MS):
                hot_until = now + HOT_WAIT_S

    # -- progress ---------------------------------------------------------------------------
    def _progress(self, timeout_ms: int) -> bool:
        """Move bytes: send what channels take, read what arrived (or wait ``timeout_ms``).
        True when something moved."""
        if self._evicting():
            self.abort("evicted", "its lease was evicted")
            raise self._evicted(self.rank, "the node took the lease back")
        if self._redis is not None:
            got = self._redis.receive(timeout_ms / 1000)
            if got is not None:
                self._arrived(*got)
            return got is not None
        moved = False
        for shm in self._shm:  # shared memory: no system call to look
            if shm.outq:
                before = len(shm.outq[0])
                if shm.flush() or len(shm.outq[0]) != before:
                    moved = True
            # ring bytes only: a slot published for a later collective is not progress
            # (counted as such, it would starve the sockets of a mixed group)
            if shm.ring_pending():
                shm.read()
                moved = True
        if moved:
            return True
        asked = bool(timeout_ms and self._shm)
        if asked:
            # about to sleep: ask the shm peers to ring, then look once more (see channels)
            for shm in self._shm:
                shm.sleeping(True)
            ch.fence()
            if any(shm.pending() or shm.writable() for shm in self._shm):
                timeout_ms = 0
        elif not timeout_ms and not self._sockets:
            return False
        try:
            events = self._poller.poll(timeout_ms)
        finally:
            if asked:
                for shm in self._shm:
                    shm.sleeping(False)
        for fd, ev in events:
            peer = self._by_fd[fd]
            moved = True
            if isinstance(peer, ch.ShmPeer):
                if ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
                    peer.wake()
            else:
                if ev & select.POLLOUT and peer.flush():
                    self._writing.discard(fd)
                    self._poller.modify(fd, select.POLLIN)
                if ev & (select.POLLIN | select.POLLHUP | select.POLLERR) and not peer.eof:
                    peer.read()
            if peer.eof and peer.rank not in self._gone:
                # what it sent is delivered; it is missed only when a wait needs it
                self._gone.add(peer.rank)
                self._writing.discard(fd)
                self._poller.unregister(fd)
        return moved

    def _lost(self, rank: int) -> None:
        raise self._evicted(
            rank, "left the group (evicted or its worker lost); the group's call ended"
        )

    def _evicted(self, rank: int, what: str) -> LeaseEvicted:
        exc = LeaseEvicted(f"rank {rank} ({self._describe(rank)}) {what}")
        exc.fmi_rank = rank  # type: ignore[attr-defined]
        return exc

    # -- collectives ------------------------------------------------------------------------
    def _send_coll(self, obj: Any, dest: int) -> Request:
        return self._isend(obj, dest, _COLL)

    def _recv_coll(self, source: int) -> Any:
        return self._wait_recv(source, _COLL)[1]

    def _wait_all(self, requests: list[Request]) -> None:
        for req in requests:
            req.wait()

    def barrier(self) -> None:
        """Return once every rank has called ``barrier``."""
        if self._fast:
            self._doubling(None, None)
            return
        self.allgather(None)

    def bcast(self, obj: Any = None, root: int = 0) -> Any:
        """``obj`` of rank ``root``, on every rank."""
        self._check_rank(root)
        if self.rank == root:
            self._wait_all([self._send_coll(obj, r) for r in range(self.size) if r != root])
            return obj
        return self._recv_coll(root)

    def gather(self, obj: Any, root: int = 0) -> list[Any] | None:
        """Every rank's ``obj`` in rank order on ``root`` (None elsewhere)."""
        self._check_rank(root)
        if self.rank != root:
            self._send_coll(obj, root).wait()
            return None
        return [obj if r == root else self._recv_coll(r) for r in range(self.size)]

    def allgather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` in rank order, on every rank."""
        sends = [self._send_coll(obj, r) for r in range(self.size) if r != self.rank]
        values = [obj if r == self.rank else self._recv_coll(r) for r in range(self.size)]
        self._wait_all(sends)
        return values

    def scatter(self, objs: Sequence[Any] | None = None, root: int = 0) -> Any:
        """Item ``rank`` of ``root``'s sequence ``objs`` (one item per rank), on each rank."""
        self._check_rank(root)
        if self.rank == root:
            if objs is None or len(objs) != self.size:
                raise ValueError(f"scatter needs one item per rank ({self.size}) on the root")
            self._wait_all([self._send_coll(objs[r], r) for r in range(self.size) if r != root])
            return objs[root]
        return self._recv_coll(root)

    def reduce(self, obj: Any, op: Op | Callable[[Any, Any], Any] = SUM, root: int = 0) -> Any:
        """``op`` over every rank's ``obj`` (rank order) on ``root``; None elsewhere."""
        values = self.gather(obj, root)
        return None if values is None else fold(values, op)

    def allreduce(self, obj: Any, op: Op | Callable[[Any, Any], Any] = SUM) -> Any:
        """``op`` over every rank's ``obj`` (rank order), the same result on every rank."""
        if self._fast and isinstance(op, Op):
            return self._doubling(obj, op)
        return fold(self.allgather(obj), op)

    def _doubling(self, obj: Any, op: Op | None) -> Any:
        """Recursive doubling (over the shared-memory slots with shm partners, the sockets
        with the others): in round k a rank swaps its
        partial result with the rank 2**k away and folds the two as (lower ranks' part,
        higher ranks' part), so every rank computes the same value in rank order. For a size
        that is not a power of two, the first 2 * (size - p2) ranks pair up first (the even
        one hands its value to the odd one, which gets the result back at the end; MPICH's
        scheme), so every block stays contiguous in rank order. A value too big for a slot
        goes by the ring (the slot says so). ``op`` None: a barrier."""
        size, rank = self.size, self.rank
        p2 = 1
        while p2 * 2 <= size:
            p2 *= 2
        rem = size - p2
        acc = obj
        if rank < 2 * rem:
            if rank % 2 == 0:  # hands its value on, gets the result back
                send = self._slot_send(acc, rank + 1)
                if send is not None:
                    send.wait()
                result = self._slot_recv(rank + 1)
                if op is None:
                    return None
                np = sys.modules.get("numpy")
                inline, value = result
                return value.copy() if inline and np and type(value) is np.ndarray else value
            inline, theirs = self._slot_recv(rank - 1)
            if op is not None:
                acc = _combine(theirs, acc, op, None if inline else theirs)
            me = rank // 2
        else:
            me = rank - rem
        bit = 1
        while bit < p2:
            other = me ^ bit
            partner = 2 * other + 1 if other < rem else other + rem
            send = self._slot_send(acc, partner)
            inline, theirs = self._slot_recv(partner)
            if send is not None:
                send.wait()
            if op is not None:
                low, high = (acc, theirs) if rank < partner else (theirs, acc)
                # a received array is this rank's own: fold into it (no fresh pages)
                acc = _combine(low, high, op, None if inline else theirs)
            bit <<= 1
        if rank < 2 * rem:
            send = self._slot_send(acc, rank - 1)
            if send is not None:
                send.wait()
        return acc

    def _slot_send(self, value: Any, dest: int) -> Request | None:
        """``value`` to ``dest`` through the next slot, or by the ring or socket (the Request
        to wait for) when it does not fit or ``dest`` is not in shared memory."""
        peer = self._peers[dest]
        if isinstance(peer, ch.ShmPeer) and peer.put_slot(value):
            return None
        return self._send_coll(value, dest)

    def _slot_recv(self, source: int) -> tuple[bool, Any]:
        """(inline, value) of ``source``'s next slot exchange; inline: a view of the slot,
        valid until the next exchange with it."""
        peer = self._peers[source]
        if not isinstance(peer, ch.ShmPeer):
            return False, self._recv_coll(source)
        self._wait_slot(peer)
        inline, value = peer.take_slot()
        if not inline:
            value = self._recv_coll(source)
        return inline, value

    def _wait_slot(self, peer: ch.ShmPeer) -> None:
        """Spin (then sleep) until ``peer`` published its next slot exchange; messages that
        arrive meanwhile (an abort) are read, a vanished peer ends the wait."""
        if peer.slot_ready():
            return
        spins = 0
        hot_until = time.perf_counter() + HOT_WAIT_S
        while not peer.slot_ready():
            spins += 1
            if spins & 63:
                continue
            if peer.rank in self._gone:
                self._lost(peer.rank)
            hot = time.perf_counter() < hot_until
            if self._progress(0 if hot else _POLL_MS) and not hot:
                hot_until = time.perf_counter() + HOT_WAIT_S

    def scan(self, obj: Any, op: Op | Callable[[Any, Any], Any] = SUM) -> Any:
        """Inclusive prefix: ``op`` over the ``obj`` of ranks 0..rank."""
        acc = obj if self.rank == 0 else fold([self._recv_coll(self.rank - 1), obj], op)
        if self.rank + 1 < self.size:
            self._send_coll(acc, self.rank + 1).wait()
        return acc

    # -- ending -------------------------------------------------------------------------------
    def abort(self, what: str, reason: str, failed: int | None = None) -> None:
        """Tell every peer that rank ``failed`` (default: this one) ended the call (``what``:
        "raised" or "evicted"), best effort within a second; the peers raise."""
        if self._aborted:
            return
        self._aborted = True
        body = memoryview(pickle.dumps((self.rank if failed is None else failed, what, reason)))
        if self._redis is not None:
            for r in range(self.size):
                if r != self.rank:
                    with contextlib.suppress(Exception):
                        self._redis.send(r, ch.ABORT, ch.ENC_OBJ, 0, b"", body)
            return
        deadline = time.monotonic() + 1.0
        for peer in self._peers.values():
            with contextlib.suppress(OSError):  # after what is queued (never cut a message)
                peer.queue(ch.ABORT, ch.ENC_OBJ, 0, self.rank, b"", body)
        for peer in self._peers.values():
            with contextlib.suppress(OSError):
                while not peer.flush() and time.monotonic() < deadline:
                    select.select([], [peer.sock], [], 0.05)

    def finish(self, timeout_s: float = 2.0) -> None:
        """End a call that succeeded on this rank: send what is queued, say so (end of
        stream), and read until every peer said so too, so no connection is reset with data
        in flight (a peer still finishing never sees an error)."""
        deadline = time.monotonic() + timeout_s
        while any(p.outq for p in self._peers.values()) and time.monotonic() < deadline:
            self._progress(_POLL_MS)
        self._finishing = True
        for peer in self._peers.values():
            with contextlib.suppress(OSError):
                peer.sock.shutdown(socket.SHUT_WR)
        while len(self._gone) < len(self._peers) and time.monotonic() < deadline:
            self._progress(_POLL_MS)
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for peer in self._peers.values():
            with contextlib.suppress(OSError):
                peer.close()
        if self._redis is not None:
            with contextlib.suppress(Exception):
                self._redis.close()
