"""The accounting ledger: one row per lease, who used what, durable across broker crashes.

SQLite in WAL mode by default (one file, stdlib ``sqlite3``): every grant, renewal, end and
"still running" mark is committed before the broker answers, and a WAL commit survives the
process being killed (``synchronous=NORMAL``: durable against a crash of the broker, not of the
machine; set ``synchronous=FULL`` through ``Ledger(..., synchronous="FULL")`` for that).
A PostgreSQL URL (``postgresql://...``) is accepted by :func:`open_ledger` when psycopg is
installed.

Units: seconds (epoch for instants), cores, bytes; core-seconds and GiB-seconds accrue from
the grant to the end (or to the last time the lease was seen running, for open leases).
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from colocate.errors import ConfigError
from colocate.owner import Owner
from policies.prices import GIB, Prices

_SCHEMA = """
CREATE TABLE IF NOT EXISTS leases (
    lease_id     TEXT PRIMARY KEY,
    uid          INTEGER NOT NULL,
    gid          INTEGER NOT NULL,
    user         TEXT NOT NULL,
    account      TEXT NOT NULL,
    node         TEXT NOT NULL,
    cores        INTEGER NOT NULL,
    memory_bytes INTEGER NOT NULL,
    start        REAL NOT NULL,
    expires_at   REAL NOT NULL,
    last_seen    REAL NOT NULL,
    end          REAL,
    end_reason   TEXT,
    core_seconds REAL,
    gib_seconds  REAL,
    money        REAL
);
CREATE INDEX IF NOT EXISTS leases_open ON leases(end);
CREATE INDEX IF NOT EXISTS leases_start ON leases(start);
CREATE INDEX IF NOT EXISTS leases_account ON leases(account, start);
CREATE INDEX IF NOT EXISTS leases_user ON leases(user, start);
"""


@dataclass(frozen=True, slots=True)
class LedgerRow:
    """One lease in the ledger. ``end`` is None while it runs; then usage counts to ``last_seen``."""

    lease_id: str
    owner: Owner
    node: str
    cores: int
    memory_bytes: int
    start: float
    expires_at: float
    last_seen: float
    end: float | None
    end_reason: str | None
    core_seconds: float
    gib_seconds: float
    money: float

    def to_json(self) -> dict[str, Any]:
        return {
            "lease_id": self.lease_id,
            "user": self.owner.user,
            "uid": self.owner.uid,
            "account": self.owner.account,
            "node": self.node,
            "cores": self.cores,
            "memory_bytes": self.memory_bytes,
            "start": self.start,
            "expires_at": self.expires_at,
            "last_seen": self.last_seen,
            "end": self.end,
            "end_reason": self.end_reason,
            "core_seconds": self.core_seconds,
            "gib_seconds": self.gib_seconds,
            "money": self.money,
        }


_COLUMNS = (
    "lease_id, uid, gid, user, account, node, cores, memory_bytes, start, expires_at, last_seen, "
    "end, end_reason, core_seconds, gib_seconds, money"
)


class Ledger:
    """A SQLite ledger at ``path`` (created with its directory; mode 0600). Thread-safe."""

    def __init__(
        self, path: str | Path, prices: Prices | None = None, *, synchronous: str = "NORMAL"
    ) -> None:
        self.path = str(path)
        self.prices = prices or Prices()
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            with contextlib.suppress(OSError):
                Path(path).chmod(0o600)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={synchronous}")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(
                f"cannot open the ledger ({exc}); set broker.ledger to a writable file",
                path=self.path,
            ) from None
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _usage(self, cores: int, memory_bytes: int, seconds: float) -> tuple[float, float, float]:
        seconds = max(0.0, seconds)
        core_s = cores * seconds
        return (
            core_s,
            memory_bytes / GIB * seconds,
            self.prices.resource_cost(core_s, memory_bytes * seconds),
        )

    def open(
        self,
        lease_id: str,
        owner: Owner,
        node: str,
        cores: int,
        memory_bytes: int,
        start: float,
        expires_at: float,
    ) -> None:
        """A lease was granted (idempotent: a second open of the same id changes nothing)."""
        with self._tx() as db:
            db.execute(
                f"INSERT OR IGNORE INTO leases ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,NULL,NULL,0,0,0)",
                (
                    lease_id,
                    owner.uid,
                    owner.gid,
                    owner.user,
                    owner.account,
                    node,
                    cores,
                    memory_bytes,
                    start,
                    expires_at,
                    start,
                ),
            )

    def renew(self, lease_id: str, expires_at: float, now: float) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE leases SET expires_at=?, last_seen=MAX(last_seen, ?) WHERE lease_id=? AND end IS NULL",
                (expires_at, now, lease_id),
            )

    def seen(self, lease_ids: Iterable[str], now: float) -> None:
        """These open leases still run at ``now`` (an agent reported them)."""
        ids = [(now, i) for i in lease_ids]
        if ids:
            with self._tx() as db:
                db.executemany(
                    "UPDATE leases SET last_seen=MAX(last_seen, ?) WHERE lease_id=? AND end IS NULL",
                    ids,
                )

    def close(self, lease_id: str, end: float, reason: str) -> bool:
        """The lease ended at ``end`` (``released``, ``expired``, ``evicted``, ``lost``).
        False when it was not open (unknown or already closed)."""
        with self._tx() as db:
            row = db.execute(
                "SELECT cores, memory_bytes, start FROM leases WHERE lease_id=? AND end IS NULL",
                (lease_id,),
            ).fetchone()
            if row is None:
                return False
            cores, memory, start = row
            end = max(end, start)
            core_s, gib_s, money = self._usage(cores, memory, end - start)
            db.execute(
                "UPDATE leases SET end=?, end_reason=?, last_seen=?, core_seconds=?, gib_seconds=?, money=? WHERE lease_id=?",
                (end, reason, end, core_s, gib_s, money, lease_id),
            )
            return True

    def open_rows(self) -> list[LedgerRow]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM leases WHERE end IS NULL").fetchall()
        return [self._row(r) for r in rows]

    def rows(
        self,
        *,
        user: str | None = None,
        account: str | None = None,
        since: float | None = None,
        limit: int = 100_000,
    ) -> list[LedgerRow]:
        """Leases that ran at or after ``since`` (all when None), oldest first."""
        where, args = self._filter(user, account, since)
        with self._lock:
            found = self._db.execute(
                f"SELECT {_COLUMNS} FROM leases{where} ORDER BY start LIMIT ?", (*args, limit)
            ).fetchall()
        return [self._row(r) for r in found]

    @staticmethod
    def _filter(
        user: str | None, account: str | None, since: float | None
    ) -> tuple[str, tuple[Any, ...]]:
        clauses: list[str] = []
        args: list[Any] = []
        if user is not None:
            clauses.append("user=?")
            args.append(user)
        if account is not None:
            clauses.append("account=?")
            args.append(account)
        if since is not None:
            clauses.append("COALESCE(end, last_seen) >= ?")
            args.append(since)
        return (" WHERE " + " AND ".join(clauses) if clauses else ""), tuple(args)

    def core_seconds_since(
        self, since: float, now: float, *, user: str | None = None, account: str | None = None
    ) -> float:
        """Core-seconds held between ``since`` and ``now`` (open leases count up to ``now``)."""
        where, args = self._filter(user, account, None)
        where = (where + " AND " if where else " WHERE ") + "COALESCE(end, ?) > ?"
        with self._lock:
            (total,) = self._db.execute(
                f"SELECT COALESCE(SUM(cores * (MIN(COALESCE(end, ?), ?) - MAX(start, ?))), 0) FROM leases{where}",
                (now, now, since, *args, now, since),
            ).fetchone()
        return float(total)

    def account_totals(self) -> list[tuple[str, int, float, float, float]]:
        """Per account: closed leases, core-seconds, GiB-seconds, money (for the metrics)."""
        with self._lock:
            return [
                (str(a), int(n), float(c), float(g), float(m))
                for a, n, c, g, m in self._db.execute(
                    "SELECT account, COUNT(*), SUM(core_seconds), SUM(gib_seconds), SUM(money) "
                    "FROM leases WHERE end IS NOT NULL GROUP BY account ORDER BY account"
                )
            ]

    def _row(self, r: Sequence[Any]) -> LedgerRow:
        (
            lease_id,
            uid,
            gid,
            user,
            account,
            node,
            cores,
            memory,
            start,
            expires_at,
            last_seen,
            end,
            reason,
            core_s,
            gib_s,
            money,
        ) = r
        if end is None:  # open: usage so far, to the last time it was seen running
            core_s, gib_s, money = self._usage(cores, memory, last_seen - start)
        return LedgerRow(
            lease_id,
            Owner(uid, gid, user, account),
            node,
            cores,
            memory,
            start,
            expires_at,
            last_seen,
            end,
            reason,
            float(core_s),
            float(gib_s),
            float(money),
        )

    def close_db(self) -> None:
        with self._lock:
            self._db.close()


def open_ledger(where: str | None, default_dir: Path, prices: Prices) -> Ledger | None:
    """The ledger ``broker.ledger`` names: None when disabled (``""``)."""
    if where == "":
        return None
    if where is not None and where.startswith(("postgres://", "postgresql://")):
        raise ConfigError(
            "PostgreSQL ledgers are not supported by this build yet; use a SQLite file path",
            key="broker.ledger",
        )
    return Ledger(where or default_dir / "ledger.db", prices)
