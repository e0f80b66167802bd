"""The optional PostgreSQL ledger against a real, throwaway PostgreSQL server (the machine's
``initdb``/``pg_ctl``, Unix socket only): the same records as SQLite, through a real broker."""

from __future__ import annotations

import glob
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from colocate import Client
from colocate.broker.ledger import Ledger
from colocate.owner import Owner
from policies.prices import Prices
from tests.conftest import require
from tests.integration.leasing import (
    _launch,
    _ready,
    node_registered,
    services,
    start_agent,
    wait_until,
)

pytestmark = [pytest.mark.root, pytest.mark.slow]
ROOT = str(Path(__file__).resolve().parents[2])


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    require(
        importlib.util.find_spec("psycopg") is not None,
        "psycopg is not installed (pip install -e .[dev])",
    )
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))  # Debian keeps them off PATH
    initdb = shutil.which("initdb") or (found[-1] if found else None)
    require(
        initdb is not None,
        "PostgreSQL server binaries are not installed (apt-get install postgresql)",
    )
    assert initdb is not None
    pg_ctl = str(Path(initdb).with_name("pg_ctl"))
    base = Path(tempfile.mkdtemp(prefix="colocate-pg-"))
    base.chmod(0o755)
    data, sock = base / "data", base / "sock"
    sock.mkdir()
    shutil.chown(base, "postgres")
    shutil.chown(sock, "postgres")
    run_as = ["/usr/sbin/runuser", "-u", "postgres", "--"]
    subprocess.run(
        [*run_as, initdb, "-D", str(data), "-A", "trust", "-U", "postgres"],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            *run_as,
            pg_ctl,
            "-D",
            str(data),
            "-l",
            str(base / "log"),
            "-w",
            "-o",
            f"-k {sock} -c listen_addresses=''",
            "start",
        ],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql://postgres@/postgres?host={sock}"
    finally:
        subprocess.run(
            [*run_as, pg_ctl, "-D", str(data), "-m", "immediate", "stop"],
            check=False,
            capture_output=True,
        )
        shutil.rmtree(base, ignore_errors=True)


def test_postgres_ledger_keeps_the_same_records_as_sqlite(
    postgres_url: str, tmp_path: Path
) -> None:
    ledgers = [
        Ledger.postgres(postgres_url, Prices(core_hour=1.0)),
        Ledger(tmp_path / "l.db", Prices(core_hour=1.0)),
    ]
    alice = Owner(1000, 1000, "alice", "physics")
    seen = []
    for ledger in ledgers:
        ledger.open("l-pg1", alice, "n1", 2, 1024**3, 0.0, 7200.0)
        ledger.seen(["l-pg1"], 1800.0)
        ledger.renew("l-pg1", 9000.0, 1900.0)
        assert ledger.close("l-pg1", 3600.0, "released") and not ledger.close(
            "l-pg1", 4000.0, "expired"
        )
        seen.append(([r.to_json() for r in ledger.rows(account="physics")], ledger.account_totals(),
                     ledger.core_seconds_since(1800.0, 10_000.0, user="alice")))  # fmt: skip
        ledger.close_db()
    assert seen[0] == seen[1]
    assert seen[0][0][0]["core_seconds"] == 7200.0 and seen[0][0][0]["money"] == pytest.approx(
        2.0 + 1.0 * 0.0015  # 2 core-hours, 1 GiB-hour
    )


def test_broker_with_a_postgres_ledger_reports_usage(postgres_url: str, tmp_path: Path) -> None:
    log = tmp_path / "broker.log"
    argv = [
        "broker",
        "--listen",
        "127.0.0.1:0",
        "--secret-file",
        str(tmp_path / "secret"),
        "--ledger",
        postgres_url,
    ]
    broker = _ready("broker", _launch(argv, log), log)
    agent = start_agent(tmp_path, broker.url, node="pg1", cores=1, memory="1GiB")
    with services(broker, agent):
        wait_until(lambda: node_registered(broker.url, "pg1"), what="agent registration")
        with (
            Client(broker.url) as client,
            client.lease(cores=1, memory="128MiB", duration="1m", account="pgacct") as lease,
        ):
            lease_id = lease.lease_id
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "colocate",
                "usage",
                "--broker",
                broker.url,
                "--account",
                "pgacct",
                "--json",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        assert done.returncode == 0, done.stderr
        (record,) = json.loads(done.stdout)["records"]
        assert (
            record["lease_id"] == lease_id
            and record["end_reason"] == "released"
            and record["user"] == "root"
        )
