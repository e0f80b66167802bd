"""The broker closes ledger rows of leases that ended while it was down (pure: a fake clock,
no agents), and knows their owners again from the ledger after a restart."""

from __future__ import annotations

from pathlib import Path

from colocate.broker.broker import Broker
from colocate.broker.ledger import Ledger
from colocate.config import BrokerConfig
from colocate.owner import Owner

SECRET = b"0123456789abcdef0123456789abcdef"


def test_restarted_broker_restores_owners_and_closes_what_no_agent_reports(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.db")
    alice = Owner(1000, 1000, "alice", "physics")
    ledger.open("l-expired", alice, "n1", 1, 1 << 20, 100.0, 200.0)
    ledger.open("l-lost", alice, "n1", 1, 1 << 20, 100.0, 10_000.0)
    ledger.seen(["l-lost"], 150.0)
    now = [300.0]
    broker = Broker(BrokerConfig(node_timeout_s=10), SECRET, clock=lambda: now[0], ledger=ledger)
    assert broker._owners["l-lost"] == alice  # known again before any agent reports
    broker._reconcile(now[0])
    rows = {r.lease_id: r for r in ledger.rows()}
    assert (rows["l-expired"].end, rows["l-expired"].end_reason) == (200.0, "expired")
    assert rows["l-lost"].end is None  # agents get two node timeouts to report it
    now[0] = 330.0
    broker._reconcile(now[0])
    lost = next(r for r in ledger.rows() if r.lease_id == "l-lost")
    assert (lost.end, lost.end_reason, lost.core_seconds) == (
        150.0,
        "lost",
        50.0,
    )  # used until last seen
