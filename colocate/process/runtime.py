"""The worker side of serverless processes: live state, transactions, write-through, swap-out.

A process's state lives in the worker that serves it (:class:`LiveProcess`, one per process
name in ``_live``). Each invocation runs ``fn(state, *args)`` on a :class:`State`, a
transaction over the committed state: writes and deletes go to an overlay, reads of mutable
values mark the key as touched (an in-place change is a change). When ``fn`` returns, the
overlay commits: the changed keys are pickled into one log record, applied in memory, and
the record is written to the store (inline when small and nothing is queued, else by a
background writer, so a large update does not hold the caller). When ``fn`` raises, or the
lease is being taken back, nothing commits and the touched keys are dropped from memory (they
reload from their committed bytes). The sequence number of every commit goes to the store's
``head`` at once, so a restore can tell the user when the last updates never reached it.

At eviction, expiry or release the worker runs :func:`_swap_out` before it leaves
(``colocate.executor.worker.exit_hooks``): the records still queued are written within the
time the supervisor leaves, the log fsynced and the lock dropped. A worker killed mid-write
leaves a record prefix that the next restore ignores: the last consistent state wins.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pickle
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from typing import Any, cast

from colocate.errors import ColocateError, ConfigError
from colocate.process import direct
from colocate.process.direct import Mailbox
from colocate.process.store import (
    DELETE,
    SET,
    DirStore,
    Loc,
    Parts,
    ProcessLiveElsewhere,
    deliver,
    encode_record,
    encode_value,
    open_store,
    own_name,
    scan_log,
    size_of,
)

Placed = tuple[str, int, int, int, int, Parts]

__all__ = ["Call", "LiveProcess", "ProcessLiveElsewhere", "State"]

INLINE_BYTES = 2 << 20  # records up to this size are written by the committing call itself
COMPACT_MIN_BYTES = 64 << 20  # a log longer than this and than twice the state: snapshot
LOCK_WAIT_S = 10.0  # how long a new instance waits for the old one to finish swapping out
PEEK_WAIT_S = 0.5  # how long a call waits before it tells the client where the process is live
CALL_PREFIX = "\x00call:"  # + a call's id: its kept result, for the last KEEP_CALLS calls
KEEP_CALLS = 64
CONFLICT_RETRIES = 50  # a shared process's call re-run when others changed what it read
SERIAL_AFTER = 3  # after this many lost races a call runs holding the call lock
KEEP_RESULT_BYTES = 64 << 10
NOT_KEPT = "\x00colocate: result not kept"
_NOT_KEPT_PICKLE = pickle.dumps(NOT_KEPT, protocol=5)
# signal.pthread_sigmask turns the old mask into a set of enums (a fifth of a commit's time);
# the builtin gives ints, which SIG_SETMASK takes back as they are
_sigmask: Callable[[int, Iterable[int]], set[int]] = getattr(
    signal, "_signal", signal
).pthread_sigmask
_IMMUTABLE = (int, float, complex, str, bytes, bool, type(None), frozenset, range)
_BLOCKED = {signal.SIGTERM, signal.SIGALRM, *range(int(signal.SIGRTMIN), int(signal.SIGRTMIN) + 4)}


class ProcessInterrupted(ColocateError):
    """The lease is being taken back: the invocation's changes were discarded."""


class ResultNotKept(ColocateError):
    """A retried call had committed on the previous lease, but its result was too large to
    keep: the call is not run twice, and its result is gone."""


def _dumps(value: Any) -> bytes:
    try:
        return pickle.dumps(value, protocol=5)
    except Exception:
        import cloudpickle

        return bytes(cloudpickle.dumps(value, protocol=5))


def _log_seq(log: str) -> int:
    """The sequence number a log begins after ("log-12.bin", "log-12": 12)."""
    return int(log.split("-", 1)[1].split(".", 1)[0])


def _keep(result: Any) -> bytes | None:
    """The result's pickle as a retry gets it back; None past KEEP_RESULT_BYTES or unpicklable."""
    try:
        kept = _dumps(result)
    except Exception:
        return None
    return kept if len(kept) <= KEEP_RESULT_BYTES else None


class LiveProcess:
    """A process's committed state in this worker and its link to the store."""

    def __init__(
        self, root: str, name: str, wait_s: float = LOCK_WAIT_S, shared: bool = False
    ) -> None:
        self.name = name
        self.shared = shared
        self.store = open_store(root, name)
        if shared:
            if not isinstance(self.store, DirStore):
                raise ConfigError(
                    f"process {name!r}: several workers share a state through a directory "
                    "store only; use workers=1 with a Redis store"
                )
            self.store.open(wait_s, _lease_id(), shared=True)
        else:
            self.store.open(wait_s, _lease_id())
        restored = self.store.restore()
        self.seq = restored.seq
        self.where: dict[str, Loc | Parts] = dict(restored.keys)  # Parts: not in the store yet
        self.values: dict[str, Any] = {}
        self.log = restored.log
        self.log_size = restored.log_size
        self.snapshot_file = restored.snapshot
        if shared:  # appends go to the end under the call lock; no cut while others write
            self.store.log_fd = os.open(
                os.path.join(self.store.path, restored.log),
                os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC,
            )
            self.store.head_fd = self.store.open_head()
            self.stamp = self.store.manifest_stamp()
        else:
            self.store.start(restored.log, restored.log_size, self.seq)
        self.changed_at: dict[str, int] = {}  # key -> seq of its last change (shared)
        self.notes: list[str] = []
        if restored.lost:
            self.notes.append(
                f"process {name!r}: the last {restored.lost} committed update(s) did not reach the store "
                f"before the lease ended (grace period too short); restored the last consistent state "
                f"(update {restored.seq})"
            )
        self.restored_seq = restored.seq
        self.call_keys = deque(k for k in self.where if k.startswith(CALL_PREFIX))
        self.lock = threading.Condition()
        self.pending: deque[tuple[int, list[bytes | memoryview], int, list[Placed]]] = deque()
        self.writing = False
        self.writer: threading.Thread | None = None
        self.closed = False
        self.files = self.store.files_dir()
        # Direct messages: the listener (a socket and a thread, ~0.2 ms) starts after the
        # first call (listen()), not here: restoring the state does not wait for it, and a
        # message sent before it listens goes to the inbox, which recv reads first.
        self.mailbox: Mailbox | None = None
        self._listens = isinstance(self.store, DirStore) and not shared

    def listen(self) -> Mailbox | None:
        """Start taking direct messages (once; a directory store with one worker only)."""
        if self.mailbox is None and self._listens and not self.closed:
            self.mailbox = Mailbox(self.store.path, _net)
        return self.mailbox

    # -- reading ----------------------------------------------------------------------------
    def load(self, key: str) -> Any:
        try:
            return self.values[key]
        except KeyError:
            pass
        src = self.where[key]  # KeyError: no such key
        value = self.store.load_object(src) if isinstance(src, Loc) else pickle.loads(b"".join(src))
        self.values[key] = value
        return value

    # -- several workers (shared) ---------------------------------------------------------
    def catch_up(self) -> None:
        """Apply what the lease's other workers committed since we last looked (their
        records in the log, or a snapshot one of them made)."""
        store = self.store
        assert isinstance(store, DirStore)
        stamp = store.manifest_stamp()
        if stamp != self.stamp:  # another worker made a snapshot: start over from it
            restored = store.restore()
            old = self.where
            self.where = dict(restored.keys)
            self.values.clear()
            self.seq, self.log, self.log_size = restored.seq, restored.log, restored.log_size
            os.close(store.log_fd)
            store.log_fd = os.open(
                os.path.join(store.path, self.log), os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC
            )
            for key in old.keys() | self.where.keys():
                self.changed_at[key] = self.seq
            self.call_keys = deque(k for k in self.where if k.startswith(CALL_PREFIX))
            self.stamp = stamp
            return
        fd = store.fd(self.log)
        size = os.fstat(fd).st_size
        if size <= self.log_size:
            return
        changed: dict[str, int] = {}
        self.seq, self.log_size = scan_log(
            lambda at, n: os.pread(fd, n, at),
            size,
            self.log,
            self.seq,
            self.where,  # type: ignore[arg-type]  # Parts only in the unshared mode
            self.log_size,
            changed,
        )
        for key, seq in changed.items():
            self.values.pop(key, None)
            self.changed_at[key] = seq
            if key.startswith(CALL_PREFIX) and key in self.where and key not in self.call_keys:
                self.call_keys.append(key)

    def commit_shared(
        self,
        entries: list[tuple[str, int, Parts]],
        objects: dict[str, Any],
        reads: set[str],
        read_all: bool,
        start_seq: int,
    ) -> bool:
        """Commit under the process's call lock unless a key this call read changed since it
        began (``start_seq``): then False, and the caller runs the call again."""
        store = self.store
        assert isinstance(store, DirStore)
        fcntl.flock(store.call_fd, fcntl.LOCK_EX)
        try:
            self.catch_up()
            if read_all:
                conflict = any(seq > start_seq for seq in self.changed_at.values())
            else:
                conflict = any(self.changed_at.get(k, 0) > start_seq for k in reads)
            if conflict:
                return False
            if os.fstat(store.fd(self.log)).st_size > self.log_size:  # a killed writer's tail
                os.ftruncate(store.log_fd, self.log_size)
            seq = self.seq + 1
            record, size, placed = encode_record(seq, entries)
            base = self.log_size
            store.append(record)
            self.log_size, self.seq = base + size, seq
            for key, op, _value in entries:
                self.changed_at[key] = seq
                if op == DELETE:
                    self.where.pop(key, None)
                    self.values.pop(key, None)
                else:
                    self.values[key] = objects[key]
            for key, op, offset, length, crc, _parts in placed:
                if op == SET:
                    self.where[key] = Loc(self.log, base + offset, length, crc)
            store.set_head(seq)
            return True
        finally:
            fcntl.flock(store.call_fd, fcntl.LOCK_UN)

    def snapshot_shared(self) -> dict[str, Any]:
        store = self.store
        assert isinstance(store, DirStore)
        fcntl.flock(store.call_fd, fcntl.LOCK_EX)
        try:
            self.catch_up()
            info = self.snapshot()
            os.close(store.log_fd)  # the new log, appended to at its end by every worker
            store.log_fd = os.open(
                os.path.join(store.path, self.log), os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC
            )
            self.stamp = store.manifest_stamp()
            return info
        finally:
            fcntl.flock(store.call_fd, fcntl.LOCK_UN)

    def applied(self, call_id: str) -> tuple[bool, Any]:
        """Whether call ``call_id`` committed (one of the last KEEP_CALLS), and its result
        (NOT_KEPT when it was too large to keep)."""
        key = CALL_PREFIX + call_id
        if key not in self.where:
            return False, None
        return True, self.load(key)

    def user_keys(self) -> int:
        return len(self.where) - len(self.call_keys)

    def state_bytes(self) -> int:
        return sum(s.length if isinstance(s, Loc) else size_of(s) for s in self.where.values())

    # -- committing -------------------------------------------------------------------------
    def commit(self, entries: list[tuple[str, int, Parts]], objects: dict[str, Any]) -> None:
        seq = self.seq + 1
        record, size, placed = encode_record(seq, entries)
        if self.log_size + size > self.store.max_log and self.log_size:
            self.snapshot()  # a store with a bounded log (Redis: 512 MB a string) rolls it
        with self.lock:
            for key, op, value in entries:
                if op == DELETE:
                    self.where.pop(key, None)
                    self.values.pop(key, None)
                else:
                    self.where[key] = value
                    self.values[key] = objects[key]
            self.seq = seq
            if not self.pending and not self.writing and size <= INLINE_BYTES:
                self._append(seq, record, size, placed)
            else:
                self.pending.append((seq, record, size, placed))
                self._start_writer()
                self.lock.notify_all()
            self.store.set_head(seq)

    def _append(
        self, seq: int, record: list[bytes | memoryview], size: int, placed: list[Placed]
    ) -> None:
        """Write one record at the end of the log and point its keys at it (lock held, or the
        writer's turn)."""
        base = self.log_size
        self.store.append(record)
        self.log_size += size
        self._placed(base, placed)

    def _placed(self, base: int, placed: list[Placed]) -> None:
        for key, op, offset, length, crc, parts in placed:
            if op == SET and self.where.get(key) is parts:  # not rewritten since
                self.where[key] = Loc(self.log, base + offset, length, crc)

    def _start_writer(self) -> None:
        if self.writer is None:
            self.writer = threading.Thread(
                target=self._write_loop, name=f"process-{self.name}", daemon=True
            )
            self.writer.start()

    def _write_loop(self) -> None:
        while True:
            with self.lock:
                while not self.pending and not self.closed:
                    self.lock.wait()
                if self.closed:
                    return
                _seq, record, size, placed = self.pending[0]
                self.writing = True
            base = self.log_size
            self.store.append(record)  # without the lock: commits go on meanwhile
            with self.lock:
                self.pending.popleft()
                self.log_size = base + size
                self._placed(base, placed)
                self.writing = False
                self.lock.notify_all()
            if not self.pending and self.log_size > max(COMPACT_MIN_BYTES, 2 * self.state_bytes()):
                with contextlib.suppress(OSError):
                    self.snapshot()

    def drain(self, sync: bool = True) -> None:
        """Write every queued record (caller's thread), then fsync the log (``sync``)."""
        with self.lock:
            while self.writing:
                self.lock.wait(0.01)
            while self.pending:
                self._append(*self.pending[0])
                self.pending.popleft()
        if sync:
            self.store.sync()

    def snapshot(self) -> dict[str, Any]:
        """Swap out: a manifest of every key, made current atomically. Values already in the
        store stay where they are (their files fsynced) unless garbage (overwritten values)
        makes up more than half of those files; then every value is copied into a new
        snapshot file (copy_file_range, no trip through user space) and the old files go."""
        t0 = time.perf_counter()
        self.drain(sync=False)
        with self.lock:
            where = dict(self.where)
            seq = self.seq
            if self.log_size == 0 and _log_seq(self.log) == seq:  # nothing since the last
                keys = {k: v for k, v in where.items() if isinstance(v, Loc)}
            else:
                files = {v.file for v in where.values() if isinstance(v, Loc)}
                total = sum(self.store.size(f) for f in files)
                reuse = 2 * self.state_bytes() >= total
                snap, log, keys = self.store.write_snapshot(seq, where, reuse)
                self.store.roll(log)
                self.log, self.log_size, self.snapshot_file = log, 0, snap
                for key, loc in keys.items():
                    if self.where.get(key) is where[key]:
                        self.where[key] = loc
                self.store.remove_old({loc.file for loc in keys.values()} | {log})
        return {
            "seq": seq,
            "keys": sum(not k.startswith(CALL_PREFIX) for k in keys),
            "bytes": sum(k.length for k in keys.values()),
            "seconds": time.perf_counter() - t0,
        }

    def swap_out(self) -> None:
        """Leave: queued records out, log synced, lock dropped."""
        if self.closed:
            return
        if self.mailbox is not None:  # no more direct messages; those not taken: the inbox
            root, name = self.store.root, self.name
            self.mailbox.close(lambda data: deliver(root, name, data))
        with contextlib.suppress(OSError):
            self.drain()
        with self.lock:
            self.closed = True
            self.lock.notify_all()
        self.store.close()

    def delete(self) -> None:
        self.swap_out()
        self.store.destroy()


class State(MutableMapping[str, Any]):
    """What a function of a process receives: the process's keys (a transaction over them),
    ``dir`` (its private directory for files), ``send`` / ``recv`` (messages)."""

    def __init__(self, proc: LiveProcess, root: str) -> None:
        self._proc = proc
        self._root = root
        self._writes: dict[str, Any] = {}
        self._deleted: set[str] = set()
        self._touched: dict[str, Any] = {}
        self._outbox: list[tuple[str, bytes]] = []
        self._taken: list[str] = []
        self._taken_direct = 0
        self._reads: set[str] = set()
        self._read_all = False
        self.name = proc.name
        self.dir = proc.files

    def __getitem__(self, key: str) -> Any:
        if key in self._writes:
            return self._writes[key]
        if key in self._deleted:
            raise KeyError(key)
        self._reads.add(key)
        value = self._proc.load(key)
        if not isinstance(value, _IMMUTABLE):
            self._touched[key] = value
        return value

    def __setitem__(self, key: str, value: Any) -> None:
        if not isinstance(key, str):
            raise TypeError(f"process state keys are str, not {type(key).__name__}")
        if key.startswith("\x00"):
            raise KeyError(f"process state keys may not start with NUL: {key!r}")
        self._writes[key] = value
        self._deleted.discard(key)

    def __delitem__(self, key: str) -> None:
        if key not in self:
            raise KeyError(key)
        self._writes.pop(key, None)
        self._touched.pop(key, None)
        self._deleted.add(key)

    def __contains__(self, key: object) -> bool:
        if key in self._writes:
            return True
        if isinstance(key, str):
            self._reads.add(key)
        return (
            isinstance(key, str)
            and not key.startswith(CALL_PREFIX)
            and key not in self._deleted
            and key in self._proc.where
        )

    def __iter__(self) -> Iterator[str]:
        self._read_all = True
        seen = [
            k
            for k in self._proc.where
            if k not in self._deleted and k not in self._writes and not k.startswith(CALL_PREFIX)
        ]
        return iter(seen + list(self._writes))

    def __len__(self) -> int:
        return sum(1 for _ in self)

    @property
    def nbytes(self) -> int:
        """Bytes of the committed state (its pickles), as the store holds it."""
        return self._proc.state_bytes()

    # -- messages ---------------------------------------------------------------------------
    def send(self, process: str, obj: Any) -> None:
        """Send ``obj`` to process ``process`` of the same owner; delivered when this call
        commits (not at all if it raises)."""
        self._outbox.append((process, _dumps(obj)))

    def recv(self, timeout: float = 0.0) -> Any:
        """The oldest message for this process; waits up to ``timeout`` seconds, then raises
        TimeoutError. It is taken from the inbox when this call commits."""
        if self._proc.shared:
            raise ConfigError(
                f"process {self.name!r}: recv needs a process with one worker (several would "
                "take the same message); send works from any"
            )
        deadline = time.monotonic() + timeout
        mailbox = self._proc.listen()
        while True:
            found = self._proc.store.peek(self._taken)
            if found is not None:
                self._taken.append(found[0])
                return pickle.loads(found[1])
            if mailbox is not None:
                with mailbox.cond:
                    if len(mailbox.messages) > self._taken_direct:
                        data = mailbox.messages[self._taken_direct]
                        self._taken_direct += 1
                        return pickle.loads(data)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"process {self.name!r}: no message within {timeout:g} s")
            if mailbox is not None:
                mailbox.wait(min(left, 0.05))  # woken by a direct message
            else:
                time.sleep(min(left, 0.005))

    # -- end of the call ------------------------------------------------------------------
    def _commit(
        self, call_id: str = "", kept: bytes | None = None, result: Any = None, start: int = 0
    ) -> bool:
        """Commit the call's changes; False when they conflict with another worker's (shared
        process), and nothing was committed."""
        entries: list[tuple[str, int, Parts]] = [(k, DELETE, ()) for k in self._deleted]
        objects = dict(self._touched)
        objects.update(self._writes)
        entries += [(k, SET, encode_value(v, _dumps)) for k, v in objects.items()]
        if call_id and (entries or self._outbox or self._taken):
            # The call's id commits with its changes: a retry of it (the client did not hear
            # back) finds it here and gets its result instead of applying it twice.
            # One small entry per call (and the oldest one's deletion), not a table rewritten.
            key = CALL_PREFIX + call_id
            if kept is None:  # too large or not picklable: the retry learns it committed
                kept, result = _NOT_KEPT_PICKLE, NOT_KEPT
            entries.append((key, SET, (kept,)))  # the result's own pickle: loads to it
            objects[key] = result
            calls = self._proc.call_keys
            dropped = calls[0] if len(calls) >= KEEP_CALLS else None
            if dropped is not None:
                entries.append((dropped, DELETE, ()))
            if not self._write(entries, objects, start):
                return False
            if dropped is not None and calls and calls[0] == dropped:
                calls.popleft()
            if key not in calls:
                calls.append(key)
        elif entries and not self._write(entries, objects, start):
            return False
        for process, data in self._outbox:
            if not self._send_direct(process, data):
                deliver(self._root, process, data)
        if self._taken:
            self._proc.store.take(self._taken)
        mailbox = self._proc.mailbox
        if self._taken_direct and mailbox is not None:
            with mailbox.cond:
                for _ in range(min(self._taken_direct, len(mailbox.messages))):
                    mailbox.messages.popleft()
        return True

    def _write(
        self, entries: list[tuple[str, int, Parts]], objects: dict[str, Any], start: int
    ) -> bool:
        proc = self._proc
        if proc.shared:
            return proc.commit_shared(entries, objects, self._reads, self._read_all, start)
        proc.commit(entries, objects)
        return True

    def _send_direct(self, process: str, data: bytes) -> bool:
        if not isinstance(self._proc.store, DirStore):
            return False
        target = os.path.join(self._root, str(os.getuid()), own_name(process))
        return direct.send(target, data, _net)

    def _abort(self) -> None:
        for key in self._touched:  # maybe changed in place: reload from the committed bytes
            self._proc.values.pop(key, None)


_live: dict[tuple[str, str], LiveProcess] = {}
_net: direct.Net | None = None  # this worker's way to processes on other nodes
PEER_NOTE = "\x00peer "  # a note for the client, not the user: an address for its ticket


def _take_ticket(ticket: str, sig: str) -> None:
    """The ticket the client signed for this lease (``colocate.fmi_ticket``): the host its
    listeners bind to and the addresses it may connect to."""
    global _net
    if _net is not None and _net.ticket == ticket:
        return
    from colocate.executor import worker

    current = worker.current()
    try:
        _group, _lease, host, _expires, peers = json.loads(ticket)
        known = frozenset((str(h), int(p)) for h, p in peers)
    except (ValueError, TypeError):
        return
    node = current.spec.node if current is not None else socket.gethostname()
    wanted = _net.wanted - known if _net is not None else set()
    _net = direct.Net(node, str(host), ticket, sig, known, current, wanted)


def _peer_notes() -> list[str]:
    if _net is None or not _net.wanted:
        return []
    wanted, _net.wanted = sorted(_net.wanted), set()
    return [PEER_NOTE + json.dumps([list(w) for w in wanted])]


def _evicting() -> bool:
    from colocate.executor import worker

    current = worker.current()
    return bool(current is not None and current.evicting)


def _lease_id() -> str:
    from colocate.executor import worker

    current = worker.current()
    return current.spec.lease_id if current is not None else ""


def _open(root: str, name: str, wait_s: float = LOCK_WAIT_S, shared: bool = False) -> LiveProcess:
    proc = _live.get((root, name))
    if proc is None or proc.closed:
        proc = _live[(root, name)] = LiveProcess(root, name, wait_s, shared)
        from colocate.executor import worker

        if _swap_out not in worker.exit_hooks:
            worker.exit_hooks.append(_swap_out)
        current = worker.current()
        if current is not None and len(current.spec.cpu_ids) > 1 and not shared:
            # The process's worker may use every core of the lease (its functions' threads,
            # numpy); the lease's other workers stay idle (the state lives in this one).
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, current.spec.cpu_ids)
    return proc


def _swap_out() -> None:
    for proc in list(_live.values()):
        with contextlib.suppress(Exception):
            proc.swap_out()


class Call:
    """A function bound to a process, as the client ships it: ``op`` "run" calls
    ``fn(state, *args)``; "snapshot", "delete" and "stats" act on the process itself. The
    first argument is the call's id ("" for none): a call whose id already committed is not
    run again. Returns (result, notices for the user).

    ``wait_s``: how long to wait for the process's lock when another lease holds it; past
    that, ProcessLiveElsewhere names that lease (the client attaches to it)."""

    __slots__ = ("_fn", "fn_bytes", "name", "op", "root", "shared", "wait_s")

    def __init__(
        self,
        root: str,
        name: str,
        fn_bytes: bytes,
        op: str = "run",
        wait_s: float = PEEK_WAIT_S,
        shared: bool = False,
    ) -> None:
        self.root = root
        self.name = name
        self.fn_bytes = fn_bytes
        self.op = op
        self.wait_s = wait_s
        self.shared = shared  # the lease's workers share the process (workers > 1)
        self._fn: Callable[..., Any] | None = None

    def __getstate__(self) -> tuple[str, str, bytes, str, float, bool]:
        return (self.root, self.name, self.fn_bytes, self.op, self.wait_s, self.shared)

    def __setstate__(self, state: tuple[str, str, bytes, str, float, bool]) -> None:
        self.root, self.name, self.fn_bytes, self.op, self.wait_s, self.shared = state
        self._fn = None

    def __call__(
        self, call_id: str | tuple[str, str, str] = "", *args: Any, **kwargs: Any
    ) -> tuple[Any, list[str]]:
        if isinstance(call_id, tuple):  # (id, ticket, signature): see _take_ticket
            call_id, ticket, sig = call_id
            _take_ticket(ticket, sig)
        if "/" in self.name:  # "<owner>/<name>": refused unless we run as the owner
            self.name = own_name(self.name)
        proc = _open(self.root, self.name, self.wait_s, self.shared)
        notes, proc.notes = proc.notes, []
        if proc.shared and self.op == "stats":
            proc.catch_up()
        if self.op == "snapshot":
            return (proc.snapshot_shared() if proc.shared else proc.snapshot()), notes
        if self.op == "stats":
            return {
                "seq": proc.seq,
                "keys": proc.user_keys(),
                "bytes": proc.state_bytes(),
                "restored_seq": proc.restored_seq,
                "messages_direct": proc.mailbox.received if proc.mailbox is not None else 0,
                "messages_direct_tcp": (
                    proc.mailbox.received_tcp if proc.mailbox is not None else 0
                ),
            }, notes
        if self.op == "delete":
            proc.delete()
            _live.pop((self.root, self.name), None)
            return True, notes
        if self.op != "run":
            raise ConfigError(f"unknown process operation {self.op!r}")
        fn = self._fn
        if fn is None:
            fn = self._fn = pickle.loads(self.fn_bytes)
        for attempt in range(CONFLICT_RETRIES):
            serial = proc.shared and attempt >= SERIAL_AFTER
            if serial:
                # Lost the race SERIAL_AFTER times: run this attempt under the call lock, so
                # no other worker commits meanwhile and it cannot lose again (no livelock).
                fcntl.flock(cast(DirStore, proc.store).call_fd, fcntl.LOCK_EX)
            try:
                done_call = self._attempt(proc, call_id, notes, args, kwargs, fn)
            finally:
                if serial:
                    fcntl.flock(cast(DirStore, proc.store).call_fd, fcntl.LOCK_UN)
            if done_call is not None:
                return done_call
        raise ColocateError(
            f"process {self.name!r}: the call conflicted with other workers' commits "
            f"{CONFLICT_RETRIES} times in a row; make calls touch fewer shared keys"
        )

    def _attempt(
        self,
        proc: LiveProcess,
        call_id: str,
        notes: list[str],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        fn: Callable[..., Any],
    ) -> tuple[Any, list[str]] | None:
        """One run of the call: its result and notes, or None when another worker's commit
        changed what it read (then it runs again)."""
        start = 0
        if proc.shared:  # see what the lease's other workers committed
            proc.catch_up()
            start = proc.seq
        if call_id:
            done, kept = proc.applied(call_id)
            if done:  # a retry of a call that committed: not twice
                if isinstance(kept, str) and kept == NOT_KEPT:
                    raise ResultNotKept(
                        f"process {self.name!r}: this call committed before the lease was "
                        f"lost; it is not run twice, and its result (over "
                        f"{KEEP_RESULT_BYTES} bytes or not picklable) was not kept"
                    )
                return kept, notes
        state = State(proc, self.root)
        try:
            result = fn(state, *args, **kwargs)
        except BaseException:
            state._abort()
            raise
        kept = _keep(result) if call_id else None  # before the commit: it may take a while
        # The eviction signals wait while the commit runs: a swap-out never sees half of it.
        old = _sigmask(signal.SIG_BLOCK, _BLOCKED)
        try:
            if _evicting():  # the client was told the lease is gone: this call did not happen
                state._abort()
                raise ProcessInterrupted(
                    f"process {self.name!r}: the lease is being taken back; the call's "
                    "changes were discarded"
                )
            committed = state._commit(call_id, kept, result, start)
        finally:
            _sigmask(signal.SIG_SETMASK, old)
        if committed:
            proc.listen()  # after the first call's work, not before it (see LiveProcess)
            return result, notes + _peer_notes()
        state._abort()  # another worker changed what this call read: run it again
        return None
