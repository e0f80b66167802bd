"""The directory store of a serverless process: an append-only log plus snapshots.

One directory per process (``<root>/<uid>/<name>``, mode 0700, owned by the process's owner)::

    manifest.json   {"seq", "snapshot", "log", "keys": {key: [offset, length, crc32c, file]}}
                    (written to manifest.tmp, fsynced, renamed: always a whole snapshot)
    snap-<seq>.bin  values copied at ``seq``, back to back (a compaction); a snapshot leaves
                    values in the log they were committed to while little of it is garbage
    log-<seq>.bin   records committed after the snapshot at ``seq``, in order
    head            8 bytes: the last sequence number committed in memory (pwrite per commit)
    lock            flock'ed by the one live instance of the process; holds its lease id
    inbox/          messages from other processes (one file each, renamed into place)
    files/          the process's private directory for files

A log record is ``<4sQQQI`` (magic, seq, index length, data length, CRC-32C of the index),
the index (per key: ``<HBQI`` key length, op, value length, value CRC-32C, then the key) and
the values. A process killed while appending leaves a prefix of the file: a record counts
only when all its bytes are there and its seq follows the previous one, so a restore never
sees half of an update. Values are checked against their CRC-32C when first loaded.
Values are pickles (protocol 5); the store itself never unpickles.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import pickle
import shutil
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import crc32c

from colocate.errors import ColocateError, ConfigError, Forbidden

MAGIC = b"CPL2"
RECORD = struct.Struct("<4sQQQI")
ENTRY = struct.Struct("<HBQI")
HEAD = struct.Struct("<Q")
SET, DELETE = 0, 1
MANIFEST = "manifest.json"
_MAX_KEY = 0xFFFF


class ProcessLiveElsewhere(ColocateError):
    """The process is live in another lease of its owner (``lease_id``): the client attaches
    to that one."""

    def __init__(self, message: str, lease_id: str) -> None:
        self.lease_id = lease_id
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.lease_id))


class StateCorrupt(ColocateError):
    """A stored value does not match its checksum (storage lost or damaged bytes)."""


@dataclass(frozen=True, slots=True)
class Loc:
    """Where a value's pickle lies: file name in the process directory, offset, length, CRC-32C."""

    file: str
    offset: int
    length: int
    crc: int


@dataclass(frozen=True, slots=True)
class Restored:
    """What a restore found: the consistent sequence number, the key index, and how many
    updates committed in memory never reached the store (``lost``)."""

    seq: int
    keys: dict[str, Loc]
    log: str
    log_size: int
    lost: int
    snapshot: str | None


Parts = tuple[bytes | memoryview, ...]  # a value's bytes as written, in pieces (no join)
_ZERO_COPY_BYTES = 64 << 10


def checksum(data: bytes | memoryview, value: int = 0) -> int:
    """CRC-32C (hardware-accelerated): cheap enough to check every value of a GiB state."""
    return int(crc32c.crc32c(data, value))


_BYTES_OP = b"\x80\x05\x8e"  # PROTO 5, BINBYTES8
_BYTES_HEAD = struct.Struct("<3sQ")


def _new_bytes_api() -> tuple[Any, Any]:
    """CPython's ``PyBytes_FromStringAndSize(NULL, n)`` (a bytes object to fill before anyone
    sees it, as the C API documents) and libc's ``madvise``; (None, None) elsewhere."""
    try:
        new = ctypes.pythonapi.PyBytes_FromStringAndSize
        new.restype, new.argtypes = ctypes.py_object, [ctypes.c_void_p, ctypes.c_ssize_t]
        madvise = ctypes.CDLL(None, use_errno=True).madvise
        madvise.restype = ctypes.c_int
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    except (AttributeError, OSError):
        return None, None
    return new, madvise


_NEW_BYTES, _MADVISE = _new_bytes_api()
_BYTES_DATA = bytes.__basicsize__ - 1  # offset of a bytes object's data (ob_sval) in CPython
_MADV_POPULATE_WRITE = 23  # Linux 5.14: fault a range in with one call
_PAGE = os.sysconf("SC_PAGESIZE")


def read_bytes(fd: int, n: int, offset: int) -> bytes:
    """``os.pread(fd, n, offset)`` for a large value, into a new bytes object whose pages
    are faulted in by one ``madvise(MADV_POPULATE_WRITE)`` first: half of a cold 100 MiB
    restore went into a page fault per fresh 4 KiB page of the copy (measured: a read from
    the page cache 53 -> 46 ms per 100 MiB). Short reads return what was read."""
    if _NEW_BYTES is None or n < _ZERO_COPY_BYTES:
        return os.pread(fd, n, offset)
    out: bytes = _NEW_BYTES(None, n)
    addr = id(out) + _BYTES_DATA
    start, end = -(-addr // _PAGE) * _PAGE, (addr + n) // _PAGE * _PAGE
    if end > start:
        _MADVISE(start, end - start, _MADV_POPULATE_WRITE)  # an old kernel: faults as before
    got = 0
    with memoryview((ctypes.c_char * n).from_address(addr)).cast("B") as view:
        while got < n:
            k = os.preadv(fd, [view[got:]], offset + got)
            if k <= 0:
                break
            got += k
    return out if got == n else out[:got]


def encode_value(obj: Any, dumps: Any) -> Parts:
    """A value's pickle in parts: a large ``bytes`` is framed as its own pickle (BINBYTES8)
    around the object itself, never copied; anything else is ``dumps(obj)``."""
    if type(obj) is bytes and len(obj) >= _ZERO_COPY_BYTES:
        return (_BYTES_HEAD.pack(_BYTES_OP, len(obj)), obj, b"\x94.")
    return (dumps(obj),)


def size_of(parts: Parts) -> int:
    return sum(len(p) for p in parts)


def encode_record(
    seq: int, entries: Iterable[tuple[str, int, Parts]]
) -> tuple[list[bytes | memoryview], int, list[tuple[str, int, int, int, int, Parts]]]:
    """One log record for ``entries`` (key, op, value pickle in parts): its parts, its size
    and, per entry, (key, op, offset of the value within the record, length, crc, parts)."""
    index = bytearray()
    values: list[bytes | memoryview] = []
    placed: list[tuple[str, int, int, int, Parts]] = []
    total = 0
    for key, op, value in entries:
        raw = key.encode()
        if len(raw) > _MAX_KEY:
            raise ValueError(f"state key of {len(raw)} bytes: keys are at most {_MAX_KEY} bytes")
        crc, length = 0, 0
        for part in value:
            crc = checksum(part, crc)
            length += len(part)
        index += ENTRY.pack(len(raw), op, length, crc) + raw
        values.extend(value)
        placed.append((key, op, length, crc, value))
        total += length
    idx = bytes(index)
    head = RECORD.pack(MAGIC, seq, len(idx), total, checksum(idx))
    offset = len(head) + len(idx)
    out: list[tuple[str, int, int, int, int, Parts]] = []
    for key, op, length, crc, value in placed:
        out.append((key, op, offset, length, crc, value))
        offset += length
    return [head, idx, *values], offset, out


def _write_holder(fd: int, lease_id: str) -> None:
    """Write ``lease_id`` into the lock file ``fd`` as one whole page padded with spaces
    (readers strip them). Neither truncate nor partial write: truncating a non-empty file to
    0 makes ext4 (auto_da_alloc) flush it at close, and writing part of a page not in the
    page cache reads it from the disk first; each cost a few ms of every process open."""
    data = lease_id.encode()
    os.pwrite(fd, data.ljust(_HOLDER_PAGE, b" ") if len(data) < _HOLDER_PAGE else data, 0)
    if os.fstat(fd).st_size > max(len(data), _HOLDER_PAGE):
        os.ftruncate(fd, max(len(data), _HOLDER_PAGE))


_HOLDER_PAGE = 4096


def scan_log(
    read: Callable[[int, int], bytes],
    size: int,
    name: str,
    after_seq: int,
    keys: dict[str, Loc],
    start: int = 0,
    changed: dict[str, int] | None = None,
) -> tuple[int, int]:
    """Apply the complete records of log ``name`` (``size`` bytes, ``read(offset, n)``; seq
    after ``after_seq``, in order, from offset ``start``) to ``keys``; returns (last seq,
    bytes of the consistent prefix). Reads indexes only. ``changed`` gets key -> seq of the
    record that changed it."""
    pos, seq = start, after_seq
    while pos + RECORD.size <= size:
        magic, rseq, ilen, dlen, icrc = RECORD.unpack(read(pos, RECORD.size))
        end = pos + RECORD.size + ilen + dlen
        if magic != MAGIC or rseq != seq + 1 or end > size:
            break
        index = read(pos + RECORD.size, ilen)
        if checksum(index) != icrc:
            break
        vpos, i = pos + RECORD.size + ilen, 0
        while i < ilen:
            klen, op, vlen, vcrc = ENTRY.unpack_from(index, i)
            key = index[i + ENTRY.size : i + ENTRY.size + klen].decode()
            i += ENTRY.size + klen
            if op == DELETE:
                keys.pop(key, None)
            else:
                keys[key] = Loc(name, vpos, vlen, vcrc)
            if changed is not None:
                changed[key] = rseq
            vpos += vlen
        seq, pos = rseq, end
    return seq, pos


def check_name(name: str) -> None:
    """A process name: 1-200 characters without '/', optionally after its owner's user name
    and '/' ("alice/counter" is alice's "counter")."""
    owner, _, short = name.rpartition("/") if isinstance(name, str) else ("", "", "")
    if (
        not short
        or short in (".", "..")
        or len(short) > 200
        or "/" in owner
        or (owner in (".", "..") or (not owner and name.startswith("/")))
    ):
        raise ConfigError(
            f"process name {name!r}: use 1-200 characters without '/', or <user>/<name>"
        )


def own_name(name: str) -> str:
    """``name`` without its owner prefix, once the prefix is checked to be the caller: a
    process belongs to its owner only, and only the owner's leases (workers running as the
    owner's uid) reach its state."""
    check_name(name)
    owner, _, short = name.rpartition("/")
    if owner:
        import pwd

        try:
            uid = pwd.getpwnam(owner).pw_uid
        except KeyError:
            raise ConfigError(f"process {name!r}: there is no user {owner!r}") from None
        if uid != os.getuid():
            try:
                me = pwd.getpwuid(os.getuid()).pw_name
            except KeyError:
                me = f"uid {os.getuid()}"
            raise Forbidden(
                f"process {name!r} belongs to {owner}: only {owner}'s leases reach it "
                f"(this lease runs as {me}); your own processes are named without '{owner}/'"
            )
    return short


class DirStore:
    """One process's directory; owned by the worker that holds its lock."""

    def __init__(self, root: str, name: str) -> None:
        name = own_name(name)
        self.root = root
        self.name = name
        self.path = os.path.join(root, str(os.getuid()), name)
        self.lock_fd = self.log_fd = self.head_fd = self.call_fd = -1
        self._fds: dict[str, int] = {}

    # -- opening ----------------------------------------------------------------------------
    def open(self, wait_s: float, lease_id: str = "", shared: bool = False) -> bool:
        """Create the directory (0700) if needed and take the process's lock, waiting up to
        ``wait_s`` for an instance that is still swapping out; then write ``lease_id`` (ours)
        into it. Past ``wait_s``: ProcessLiveElsewhere naming the lease that holds it.

        ``shared``: the workers of one lease share the process; each holds the lock shared,
        the first writes the lease id and the others join it (a ``join`` lock orders them).
        Returns True for the first (or only) instance."""
        self._prepare()
        if shared:
            return self._join(wait_s, lease_id)
        fd = os.open(os.path.join(self.path, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    self._elsewhere(fd, wait_s, lease_id)
                time.sleep(0.01)
        _write_holder(fd, lease_id)
        self.lock_fd = fd
        return True

    def _elsewhere(self, fd: int, wait_s: float, lease_id: str) -> None:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
        os.close(fd)
        if holder and holder != lease_id:
            raise ProcessLiveElsewhere(f"process {self.name!r} is live in lease {holder}", holder)
        raise ColocateError(
            f"process {self.name!r} is live in another lease (its lock {self.path}/lock "
            f"stayed held {wait_s:g} s); release that one first"
        )

    def _join(self, wait_s: float, lease_id: str) -> bool:
        fd = os.open(os.path.join(self.path, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        join = os.open(
            os.path.join(self.path, "join"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
        )
        deadline = time.monotonic() + wait_s
        try:
            while True:
                fcntl.flock(join, fcntl.LOCK_EX)
                try:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        _write_holder(fd, lease_id)
                        fcntl.flock(fd, fcntl.LOCK_SH)  # the lease's other workers join
                        first = True
                        break
                    except BlockingIOError:
                        holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
                        if holder == lease_id and lease_id:
                            fcntl.flock(fd, fcntl.LOCK_SH)
                            first = False
                            break
                finally:
                    fcntl.flock(join, fcntl.LOCK_UN)
                if time.monotonic() >= deadline:
                    self._elsewhere(fd, wait_s, lease_id)
                time.sleep(0.01)
        finally:
            os.close(join)
        self.lock_fd = fd
        self.call_fd = os.open(
            os.path.join(self.path, "call.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
        )
        return first

    def manifest_stamp(self) -> tuple[int, int]:
        try:
            st = os.stat(os.path.join(self.path, MANIFEST))
        except FileNotFoundError:
            return (0, 0)
        return (st.st_ino, st.st_mtime_ns)

    def _prepare(self) -> None:
        mine = os.path.join(self.root, str(os.getuid()))
        try:
            os.makedirs(mine, mode=0o700, exist_ok=True)
            os.makedirs(self.path, mode=0o700, exist_ok=True)
            for sub in ("inbox", "files"):
                os.makedirs(os.path.join(self.path, sub), mode=0o700, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"process store {self.root} is not usable by uid {os.getuid()} ({exc.strerror}); "
                f"an admin creates it with `install -d -m 1733 {self.root}`, or pass store= a "
                "directory the lease's owner can write"
            ) from None
        top = os.stat(self.root)
        if top.st_mode & 0o002 and not top.st_mode & 0o1000:
            raise ConfigError(
                f"process store {self.root} is writable by everyone without the sticky bit "
                f"(another user could replace your directory); `chmod 1733 {self.root}`"
            )
        st = os.stat(mine)
        if st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise ConfigError(
                f"process store {mine} must be owned by uid {os.getuid()} with mode 0700"
            )

    def close(self) -> None:
        for fd in (self.log_fd, self.head_fd, self.call_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.log_fd = self.head_fd = self.call_fd = -1
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
        if self.lock_fd >= 0:
            os.close(self.lock_fd)  # releases the flock
            self.lock_fd = -1

    def fd(self, file: str) -> int:
        fd = self._fds.get(file)
        if fd is None:
            fd = self._fds[file] = os.open(
                os.path.join(self.path, file), os.O_RDONLY | os.O_CLOEXEC
            )
            # values are read in file order when a state comes back: a larger readahead
            with contextlib.suppress(OSError):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        return fd

    # -- restore ----------------------------------------------------------------------------
    def restore(self) -> Restored:
        """The last consistent state: the manifest's snapshot plus the complete records of its
        log. Reads indexes only (values load when first touched)."""
        keys: dict[str, Loc] = {}
        seq, snapshot, log = 0, None, "log-0.bin"
        try:
            with open(os.path.join(self.path, MANIFEST)) as f:
                manifest = json.load(f)
            seq, snapshot, log = int(manifest["seq"]), manifest["snapshot"], str(manifest["log"])
            keys = {
                k: Loc(str(at[3]) if len(at) > 3 else snapshot, at[0], at[1], at[2])
                for k, at in manifest["keys"].items()
            }
        except FileNotFoundError:
            pass
        path = os.path.join(self.path, log)
        if not os.path.exists(path):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
        # the indexes are read through a descriptor of their own: the jumps from one record's
        # index to the next would otherwise leave the values' descriptor with the readahead
        # of a random reader (loads of a cold 100 MiB state: 96 -> 80 ms, a plain read 60)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            seq, size = scan_log(
                lambda at, n: os.pread(fd, n, at), os.fstat(fd).st_size, log, seq, keys
            )
        finally:
            os.close(fd)
        head = self.read_head()
        return Restored(seq, keys, log, size, max(0, head - seq), snapshot)

    def read_head(self) -> int:
        try:
            with open(os.path.join(self.path, "head"), "rb") as f:
                data = f.read(HEAD.size)
        except FileNotFoundError:
            return 0
        return HEAD.unpack(data)[0] if len(data) == HEAD.size else 0

    def load_object(self, loc: Loc) -> Any:
        """The value at ``loc``; a ``bytes`` written as itself is read as itself (one read,
        no unpickling copy), anything else unpickled."""
        if loc.length > _ZERO_COPY_BYTES:
            fd = self.fd(loc.file)
            head = os.pread(fd, _BYTES_HEAD.size, loc.offset)
            if (
                len(head) == _BYTES_HEAD.size
                and head[:3] == _BYTES_OP
                and _BYTES_HEAD.unpack(head)[1] == loc.length - _BYTES_HEAD.size - 2
            ):
                n = loc.length - _BYTES_HEAD.size - 2
                data = read_bytes(fd, n, loc.offset + _BYTES_HEAD.size)
                tail = os.pread(fd, 2, loc.offset + _BYTES_HEAD.size + n)
                crc = checksum(tail, checksum(data, checksum(head)))
                if len(data) == n and tail == b"\x94." and crc == loc.crc:
                    return data
                raise StateCorrupt(
                    f"process {self.name!r}: a value in {self.path}/{loc.file} at {loc.offset} "
                    "is damaged (checksum mismatch); the storage lost bytes"
                )
        return pickle.loads(self.load(loc))

    def load(self, loc: Loc) -> bytes:
        data = read_bytes(self.fd(loc.file), loc.length, loc.offset)
        if len(data) != loc.length or checksum(data) != loc.crc:
            raise StateCorrupt(
                f"process {self.name!r}: a value in {self.path}/{loc.file} at {loc.offset} is damaged "
                "(checksum mismatch); the storage lost bytes"
            )
        return data

    # -- writing ----------------------------------------------------------------------------
    # -- the live instance's writes -------------------------------------------------------
    max_log = 1 << 62

    def start(self, log: str, size: int, seq: int) -> None:
        """Open ``log`` for appending (cut to its consistent prefix ``size``) and the head."""
        self.log_fd = self.open_append(log, size)
        self.head_fd = self.open_head()
        self.set_head(seq)

    unsynced = False  # the log has writes not yet fsynced

    def append(self, parts: list[bytes | memoryview]) -> None:
        self.unsynced = True
        write_parts(self.log_fd, parts)

    def set_head(self, seq: int) -> None:
        os.pwrite(self.head_fd, HEAD.pack(seq), 0)

    def sync(self) -> None:
        # An fsync costs a device flush (~4 ms on a VM disk) even with nothing to write:
        # a process opened and let go without a commit does not pay it.
        if self.unsynced:
            self.unsynced = False
            os.fsync(self.log_fd)

    def roll(self, log: str) -> None:
        """Append to the new, empty ``log`` from now on."""
        os.close(self.log_fd)
        self.log_fd = self.open_append(log, 0)
        self.unsynced = True

    def destroy(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def files_dir(self) -> str:
        return os.path.join(self.path, "files")

    def peek(self, taken: list[str]) -> tuple[str, bytes] | None:
        """The oldest message not in ``taken``: (its id, its bytes)."""
        inbox = os.path.join(self.path, "inbox")
        for name in sorted(n for n in os.listdir(inbox) if n.endswith(".msg") and n not in taken):
            try:
                with open(os.path.join(inbox, name), "rb") as f:
                    return name, f.read()
            except FileNotFoundError:
                continue
        return None

    def take(self, ids: list[str]) -> None:
        for name in ids:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.path, "inbox", name))

    def open_append(self, log: str, size: int) -> int:
        """The log open for appending, cut to its consistent prefix ``size``."""
        fd = os.open(os.path.join(self.path, log), os.O_WRONLY | os.O_CLOEXEC)
        if os.fstat(fd).st_size != size:  # a torn tail; else no truncate (ext4 journals it)
            os.ftruncate(fd, size)
        os.lseek(fd, size, os.SEEK_SET)
        return fd

    def open_head(self) -> int:
        return os.open(
            os.path.join(self.path, "head"), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600
        )

    def size(self, file: str) -> int:
        return os.fstat(self.fd(file)).st_size

    def write_snapshot(
        self, seq: int, where: dict[str, Loc | Parts], reuse: bool
    ) -> tuple[str | None, str, dict[str, Loc]]:
        """A snapshot at ``seq`` of the values in ``where`` (bytes: not in the store yet; Loc:
        where they lie) with an empty log after it, made current by renaming the manifest;
        returns (snapshot file or None, log file, key index). ``reuse``: values already in
        the store stay in their files (fsynced), else they are copied into the snapshot."""
        snap, log = f"snap-{seq}.bin", f"log-{seq}.bin"
        keys: dict[str, Loc] = {}
        fd = os.open(
            os.path.join(self.path, snap),
            os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
            0o600,
        )
        try:
            pos = 0
            for key, src in where.items():
                if isinstance(src, Loc) and reuse:
                    keys[key] = src
                    continue
                if isinstance(src, Loc):
                    _copy_range(self.fd(src.file), fd, src.offset, src.length)
                    length, crc = src.length, src.crc
                else:
                    write_parts(fd, list(src))
                    length, crc = size_of(src), 0
                    for part in src:
                        crc = checksum(part, crc)
                keys[key] = Loc(snap, pos, length, crc)
                pos += keys[key].length
            if pos:
                os.fsync(fd)
        finally:
            os.close(fd)
        if not pos:
            os.unlink(os.path.join(self.path, snap))
        for file in {loc.file for loc in keys.values()} - {snap}:
            os.fsync(self.fd(file))  # the values left where they are reach the disk
        lfd = os.open(
            os.path.join(self.path, log),
            os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
            0o600,
        )
        os.fsync(lfd)
        os.close(lfd)
        manifest = {
            "seq": seq,
            "snapshot": snap if pos else None,
            "log": log,
            "keys": {k: [v.offset, v.length, v.crc, v.file] for k, v in keys.items()},
        }
        tmp = os.path.join(self.path, "manifest.tmp")
        with open(tmp, "w") as f:
            json.dump(manifest, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(self.path, MANIFEST))
        dfd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        return (snap if pos else None), log, keys

    def remove_old(self, keep: Iterable[str]) -> None:
        """Delete snapshots and logs no manifest points to any more."""
        kept = set(keep)
        for entry in os.listdir(self.path):
            if entry.startswith(("snap-", "log-")) and entry not in kept:
                fd = self._fds.pop(entry, None)
                if fd is not None:
                    os.close(fd)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.path, entry))


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _copy_range(src: int, dst: int, offset: int, length: int) -> None:
    """``length`` bytes of ``src`` from ``offset`` appended to ``dst`` in the kernel."""
    end = offset + length
    while offset < end:
        n = os.copy_file_range(src, dst, end - offset, offset)
        if n <= 0:
            raise OSError(f"copy_file_range stopped {end - offset} bytes short")
        offset += n


def write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is out (large writes return short)."""
    _write_all(fd, data)


def write_parts(fd: int, parts: list[bytes | memoryview]) -> None:
    """os.writev of ``parts`` until every byte is out: one system call for a record's
    header, index and values, none of them joined first."""
    views = [memoryview(p) for p in parts if len(p)]
    while views:
        n = os.writev(fd, views[:512])
        while n and views:
            if n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][n:]
                n = 0


def open_store(root: str, name: str) -> Any:
    """The store of process ``name`` under ``root``: a directory, or ``redis://...``."""
    if root.startswith(("redis://", "rediss://", "unix://")):
        from colocate.process.redis_store import RedisStore

        return RedisStore(root, name)
    return DirStore(root, name)


def deliver(root: str, name: str, message: bytes) -> None:
    """Drop a message into process ``name``'s inbox (the same owner's): written to a
    temporary name and renamed, so a reader sees whole messages only."""
    if root.startswith(("redis://", "rediss://", "unix://")):
        from colocate.process.redis_store import deliver as redis_deliver

        redis_deliver(root, name, message)
        return
    inbox = os.path.join(root, str(os.getuid()), own_name(name), "inbox")
    os.makedirs(inbox, mode=0o700, exist_ok=True)
    stamp = f"{time.time_ns():020d}-{os.getpid()}-{os.urandom(4).hex()}"
    tmp = os.path.join(inbox, f".{stamp}.tmp")
    with open(tmp, "wb") as f:
        f.write(message)
    os.replace(tmp, os.path.join(inbox, f"{stamp}.msg"))
