"""The accounting ledger: one row per lease, who used what, durable across broker crashes.

SQLite in WAL mode by default (one file, stdlib ``sqlite3``): every grant, renewal, end and
"still running" mark is committed before the broker answers, and a WAL commit survives the
process being killed (``synchronous=NORMAL``: durable against a crash of the broker, not of the
machine; set ``synchronous=FULL`` through ``Ledger(..., synchronous="FULL")`` for that).
A PostgreSQL URL (``postgresql://user@host/db``) gives the same table in a site's database
(``pip install 'slurm-colocate[postgres]'``, psycopg 3); the SQL is shared, only placeholders
and GREATEST/LEAST differ.

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

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS leases (
    lease_id     TEXT PRIMARY KEY,
    uid          BIGINT NOT NULL,
    gid          BIGINT NOT NULL,
    user_name    TEXT NOT NULL,
    account      TEXT NOT NULL,
    node         TEXT NOT NULL,
    cores        BIGINT NOT NULL,
    memory_bytes BIGINT NOT NULL,
    start        DOUBLE PRECISION NOT NULL,
    expires_at   DOUBLE PRECISION NOT NULL,
    last_seen    DOUBLE PRECISION NOT NULL,
    ended        DOUBLE PRECISION,
    end_reason   TEXT,
    core_seconds DOUBLE PRECISION,
    gib_seconds  DOUBLE PRECISION,
    money        DOUBLE PRECISION
)""",
    "CREATE INDEX IF NOT EXISTS leases_open ON leases(ended)",
    "CREATE INDEX IF NOT EXISTS leases_start ON leases(start)",
    "CREATE INDEX IF NOT EXISTS leases_account ON leases(account, start)",
    "CREATE INDEX IF NOT EXISTS leases_user ON leases(user_name, start)",
)


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
    "lease_id, uid, gid, user_name, account, node, cores, memory_bytes, start, expires_at, last_seen, "
    "ended, end_reason, core_seconds, gib_seconds, money"
)


class Ledger:
    """A SQLite ledger at ``path`` (created with its directory; mode 0600), or a PostgreSQL
    one through :meth:`postgres`. Thread-safe (one connection, one lock)."""

    def __init__(
        self, path: str | Path, prices: Prices | None = None, *, synchronous: str = "NORMAL"
    ) -> None:
        self.path = str(path)
        self.prices = prices or Prices()
        self._postgres = False
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._db: Any = sqlite3.connect(
                self.path, check_same_thread=False, isolation_level=None
            )
            with contextlib.suppress(OSError):
                Path(path).chmod(0o600)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={synchronous}")
            self._db.execute("PRAGMA busy_timeout=5000")
            for statement in _SCHEMA:
                self._db.execute(statement)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(
                f"cannot open the ledger ({exc}); set broker.ledger to a writable file",
                path=self.path,
            ) from None
        self._lock = threading.Lock()

    @classmethod
    def postgres(cls, url: str, prices: Prices | None = None) -> Ledger:
        """A ledger in the PostgreSQL database at ``url`` (``postgresql://user@host/db``);
        needs ``pip install 'psycopg[binary]'``."""
        try:
            import psycopg
        except ImportError:
            raise ConfigError(
                "a PostgreSQL ledger needs psycopg: pip install 'psycopg[binary]'",
                key="broker.ledger",
            ) from None
        self = cls.__new__(cls)
        self.path = url.split("@")[-1]  # never the password
        self.prices = prices or Prices()
        self._postgres = True
        try:
            self._db = psycopg.connect(url, autocommit=True, connect_timeout=10)
            for statement in _SCHEMA:
                self._db.execute(statement)
        except psycopg.Error as exc:
            raise ConfigError(
                f"cannot open the PostgreSQL ledger ({str(exc).strip()})", key="broker.ledger"
            ) from None
        self._lock = threading.Lock()
        return self

    def _sql(self, text: str) -> str:
        if not self._postgres:
            return text
        return text.replace("?", "%s").replace("MAX(", "GREATEST(").replace("MIN(", "LEAST(")

    def _run(self, text: str, args: Sequence[Any] = ()) -> Any:
        return self._db.execute(self._sql(text), tuple(args))

    @contextlib.contextmanager
    def _tx(self) -> Iterator[Ledger]:
        with self._lock:
            self._db.execute("BEGIN" if self._postgres else "BEGIN IMMEDIATE")
            try:
                yield self
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
        values = (lease_id, owner.uid, owner.gid, owner.user, owner.account, node, cores, memory_bytes, start,
                  expires_at, start)  # fmt: skip
        with self._tx() as db:
            db._run(
                f"INSERT INTO leases ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,NULL,NULL,0,0,0) "
                "ON CONFLICT (lease_id) DO NOTHING",
                values,
            )

    def renew(self, lease_id: str, expires_at: float, now: float) -> None:
        with self._tx() as db:
            db._run(
                "UPDATE leases SET expires_at=?, last_seen=MAX(last_seen, ?) WHERE lease_id=? AND ended IS NULL",
                (expires_at, now, lease_id),
            )

    def seen(self, lease_ids: Iterable[str], now: float) -> None:
        """These open leases still run at ``now`` (an agent reported them)."""
        ids = list(lease_ids)
        if ids:
            with self._tx() as db:
                for lease_id in ids:
                    db._run(
                        "UPDATE leases SET last_seen=MAX(last_seen, ?) WHERE lease_id=? AND ended IS NULL",
                        (now, lease_id),
                    )

    def close(self, lease_id: str, end: float, reason: str) -> bool:
        """The lease ended at ``end`` (``released``, ``expired``, ``evicted``, ``lost``).
        False when it was not open (unknown or already closed)."""
        with self._tx() as db:
            row = db._run(
                "SELECT cores, memory_bytes, start FROM leases WHERE lease_id=? AND ended IS NULL",
                (lease_id,),
            ).fetchone()
            if row is None:
                return False
            cores, memory, start = row
            end = max(end, start)
            core_s, gib_s, money = self._usage(cores, memory, end - start)
            db._run(
                "UPDATE leases SET ended=?, end_reason=?, last_seen=?, core_seconds=?, gib_seconds=?, money=? "
                "WHERE lease_id=?",
                (end, reason, end, core_s, gib_s, money, lease_id),
            )
            return True

    def row(self, lease_id: str) -> LedgerRow | None:
        """The lease's row, open or closed (None when the ledger never saw it): another broker
        sharing this ledger may have granted it."""
        with self._lock:
            found = self._run(
                f"SELECT {_COLUMNS} FROM leases WHERE lease_id=?", (lease_id,)
            ).fetchone()
        return None if found is None else self._row(found)

    @property
    def shared(self) -> bool:
        """True for a PostgreSQL ledger: the brokers of a cluster share it (SQLite is one
        broker's own file)."""
        return self._postgres

    def held(
        self, now: float, *, uid: int | None = None, account: str | None = None
    ) -> list[tuple[str, int, int]]:
        """(lease id, cores, memory) of the open, unexpired leases of ``uid`` or ``account``,
        whichever broker granted them."""
        clause, arg = ("uid=?", uid) if uid is not None else ("account=?", account)
        with self._lock:
            found = self._run(
                "SELECT lease_id, cores, memory_bytes FROM leases "
                f"WHERE ended IS NULL AND expires_at > ? AND {clause}",
                (now, arg),
            ).fetchall()
        return [(str(r[0]), int(r[1]), int(r[2])) for r in found]

    def open_rows(self) -> list[LedgerRow]:
        with self._lock:
            rows = self._run(f"SELECT {_COLUMNS} FROM leases WHERE ended IS NULL").fetchall()
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
            found = self._run(
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
            clauses.append("user_name=?")
            args.append(user)
        if account is not None:
            clauses.append("account=?")
            args.append(account)
        if since is not None:
            clauses.append("COALESCE(ended, last_seen) >= ?")
            args.append(since)
        return (" WHERE " + " AND ".join(clauses) if clauses else ""), tuple(args)

    def core_seconds_since(
        self, since: float, now: float, *, user: str | None = None, account: str | None = None
    ) -> float:
        """Core-seconds held between ``since`` and ``now`` (open leases count up to ``now``)."""
        where, args = self._filter(user, account, None)
        where = (where + " AND " if where else " WHERE ") + "COALESCE(ended, ?) > ?"
        with self._lock:
            (total,) = self._run(
                f"SELECT COALESCE(SUM(cores * (MIN(COALESCE(ended, ?), ?) - MAX(start, ?))), 0) FROM leases{where}",
                (now, now, since, *args, now, since),
            ).fetchone()
        return float(total)

    def account_totals(self) -> list[tuple[str, int, float, float, float]]:
        """Per account: closed leases, core-seconds, GiB-seconds, money (for the metrics)."""
        with self._lock:
            found = self._run(
                "SELECT account, COUNT(*), SUM(core_seconds), SUM(gib_seconds), SUM(money) "
                "FROM leases WHERE ended IS NOT NULL GROUP BY account ORDER BY account"
            ).fetchall()
        return [(str(a), int(n), float(c), float(g), float(m)) for a, n, c, g, m in found]

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
        return Ledger.postgres(where, prices)
    return Ledger(where or default_dir / "ledger.db", prices)
