"""The Redis store of a serverless process (``store="redis://host:port/db"``), for sites
without a shared filesystem: the directory store's layout and semantics in Redis keys.

Keys of process ``name`` of uid ``uid`` (prefix ``colocate:process:<uid>:<name>:``)::

    manifest        the directory store's manifest.json, the same JSON (SET: atomic)
    snap-<seq>      values copied at a compaction, back to back (a string)
    log-<seq>       records committed after it, in the directory store's format (APPEND of
                    a whole record is atomic: a restore never sees half of one)
    head            the last sequence number committed in memory
    lock            "<lease id>|<nonce>" of the one live instance; it expires LOCK_TTL_MS
                    after its holder stops refreshing it (a killed worker)
    inbox           a list of messages (RPUSH by senders, taken from the head at commit)

Values load lazily by GETRANGE and are checked against their CRC-32C. A Redis string holds at
most 512 MB: a log near MAX_LOG rolls (the process snapshots, leaving values where they are).
Durability is the Redis server's (its appendonly/fsync settings); ``sync`` waits for nothing.
The owner's uid is in every key, but Redis itself does not check it: give each user their own
Redis ACL user (``redis://user:password@host/``) when users must not read each other's state.
``state.dir`` is a private local directory that does not follow the process to a new lease.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable
from typing import Any

from colocate.errors import ColocateError, ConfigError
from colocate.process.store import (
    HEAD,
    MANIFEST,
    Loc,
    Parts,
    ProcessLiveElsewhere,
    Restored,
    StateCorrupt,
    checksum,
    own_name,
    scan_log,
)

LOCK_TTL_MS = 15_000
MAX_LOG = 400 << 20
_clients: dict[str, Any] = {}


def _client(url: str) -> Any:
    client = _clients.get(url)
    if client is None:
        try:
            import redis
        except ImportError:
            raise ConfigError(
                f"process store {url}: the redis package is missing on the node (pip install redis)"
            ) from None
        client = _clients[url] = redis.Redis.from_url(url, socket_timeout=30)
    return client


def _prefix(name: str) -> str:
    return f"colocate:process:{os.getuid()}:{own_name(name)}:"


def deliver(url: str, name: str, message: bytes) -> None:
    """RPUSH ``message`` to process ``name``'s inbox (the same owner's)."""
    _client(url).rpush(_prefix(name) + "inbox", message)


class RedisStore:
    """One process's keys; written by the worker that holds its lock."""

    max_log = MAX_LOG

    def __init__(self, url: str, name: str) -> None:
        self.url = url
        self.name = own_name(name)
        self.prefix = _prefix(name)
        self.path = f"{url.split('@')[-1]}/{self.prefix}"  # for messages only
        self.redis = _client(url)
        self.log = ""
        self.token = ""
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None
        self._files: str | None = None

    def _key(self, file: str) -> str:
        return self.prefix + file

    # -- opening ----------------------------------------------------------------------------
    def open(self, wait_s: float, lease_id: str = "") -> None:
        token = f"{lease_id}|{uuid.uuid4().hex}"
        deadline = time.monotonic() + wait_s
        try:
            while not self.redis.set(self._key("lock"), token, nx=True, px=LOCK_TTL_MS):
                if time.monotonic() >= deadline:
                    holder = (self.redis.get(self._key("lock")) or b"").decode().split("|")[0]
                    if holder and holder != lease_id:
                        raise ProcessLiveElsewhere(
                            f"process {self.name!r} is live in lease {holder}", holder
                        )
                    raise ColocateError(
                        f"process {self.name!r} is live in another lease (its lock in {self.url} "
                        f"stayed held {wait_s:g} s); release that one first"
                    )
                time.sleep(0.01)
        except ColocateError:
            raise
        except Exception as exc:  # redis.ConnectionError and friends: one line
            raise ConfigError(f"process store {self.url} did not answer: {exc}") from None
        self.token = token
        self._refresher = threading.Thread(target=self._refresh, daemon=True)
        self._refresher.start()

    def _refresh(self) -> None:
        while not self._stop.wait(LOCK_TTL_MS / 3000):
            try:
                if self.redis.get(self._key("lock")) == self.token.encode():
                    self.redis.pexpire(self._key("lock"), LOCK_TTL_MS)
            except Exception:
                continue

    def close(self) -> None:
        self._stop.set()
        if self.token:
            try:
                if self.redis.get(self._key("lock")) == self.token.encode():
                    self.redis.delete(self._key("lock"))
            except Exception:
                pass
            self.token = ""

    # -- restore ----------------------------------------------------------------------------
    def restore(self) -> Restored:
        keys: dict[str, Loc] = {}
        seq, snapshot, log = 0, None, "log-0"
        raw = self.redis.get(self._key(MANIFEST))
        if raw is not None:
            manifest = json.loads(raw)
            seq, snapshot, log = int(manifest["seq"]), manifest["snapshot"], str(manifest["log"])
            keys = {k: Loc(str(at[3]), at[0], at[1], at[2]) for k, at in manifest["keys"].items()}
        key = self._key(log)
        seq, size = scan_log(
            lambda at, n: bytes(self.redis.getrange(key, at, at + n - 1)) if n else b"",
            int(self.redis.strlen(key)),
            log,
            seq,
            keys,
        )
        head = self.redis.get(self._key("head"))
        lost = max(0, HEAD.unpack(head)[0] - seq) if head and len(head) == HEAD.size else 0
        return Restored(seq, keys, log, size, lost, snapshot)

    def load_object(self, loc: Loc) -> Any:
        return pickle.loads(self.load(loc))

    def load(self, loc: Loc) -> bytes:
        end = loc.offset + loc.length - 1
        data = (
            bytes(self.redis.getrange(self._key(loc.file), loc.offset, end)) if loc.length else b""
        )
        if len(data) != loc.length or checksum(data) != loc.crc:
            raise StateCorrupt(
                f"process {self.name!r}: a value in {self.url} {self._key(loc.file)} at "
                f"{loc.offset} is damaged (checksum mismatch)"
            )
        return data

    def size(self, file: str) -> int:
        return int(self.redis.strlen(self._key(file)))

    # -- the live instance's writes -------------------------------------------------------
    def start(self, log: str, size: int, seq: int) -> None:
        self.log = log
        key = self._key(log)
        if int(self.redis.strlen(key)) > size:  # records past the consistent prefix: cut
            self.redis.set(key, self.redis.getrange(key, 0, size - 1) if size else b"")
        self.set_head(seq)

    def append(self, parts: list[bytes | memoryview]) -> None:
        data = b"".join(parts)
        if len(data) > 512 << 20:
            raise ConfigError(
                f"process {self.name!r}: one update of {len(data)} bytes is more than a Redis "
                "string holds (512 MB); split it into several keys"
            )
        self.redis.append(self._key(self.log), data)

    def set_head(self, seq: int) -> None:
        self.redis.set(self._key("head"), HEAD.pack(seq))

    def sync(self) -> None:
        """Durability is the Redis server's (appendonly, fsync policy)."""

    def roll(self, log: str) -> None:
        self.log = log

    def write_snapshot(
        self, seq: int, where: dict[str, Loc | Parts], reuse: bool
    ) -> tuple[str | None, str, dict[str, Loc]]:
        snap, log = f"snap-{seq}", f"log-{seq}"
        keys: dict[str, Loc] = {}
        pos = 0
        self.redis.delete(self._key(snap))
        for key, src in where.items():
            if isinstance(src, Loc) and reuse:
                keys[key] = src
                continue
            data = self.load(src) if isinstance(src, Loc) else b"".join(src)
            self.redis.append(self._key(snap), data)
            keys[key] = Loc(snap, pos, len(data), checksum(data))
            pos += len(data)
        self.redis.delete(self._key(log))
        manifest = {
            "seq": seq,
            "snapshot": snap if pos else None,
            "log": log,
            "keys": {k: [v.offset, v.length, v.crc, v.file] for k, v in keys.items()},
        }
        self.redis.set(self._key(MANIFEST), json.dumps(manifest))
        return (snap if pos else None), log, keys

    def remove_old(self, keep: Iterable[str]) -> None:
        kept = {self._key(k) for k in keep}
        for pattern in ("snap-*", "log-*"):
            for key in self.redis.scan_iter(match=self._key(pattern)):
                if key.decode() not in kept:
                    self.redis.delete(key)

    def destroy(self) -> None:
        self.close()
        for key in self.redis.scan_iter(match=self.prefix + "*"):
            self.redis.delete(key)
        if self._files is not None:
            shutil.rmtree(self._files, ignore_errors=True)

    def files_dir(self) -> str:
        if self._files is None:
            self._files = tempfile.mkdtemp(prefix=f"colocate-process-{self.name}-")
        return self._files

    # -- messages ---------------------------------------------------------------------------
    def peek(self, taken: list[str]) -> tuple[str, bytes] | None:
        data = self.redis.lindex(self._key("inbox"), len(taken))
        return None if data is None else (str(len(taken)), bytes(data))

    def take(self, ids: list[str]) -> None:
        self.redis.ltrim(self._key("inbox"), len(ids), -1)
