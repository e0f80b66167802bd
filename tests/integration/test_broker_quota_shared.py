"""Quotas across brokers: brokers sharing a PostgreSQL ledger count a user's held cores from it,
so a user cannot hold a quota's worth on each broker. Two in-process brokers with a real,
throwaway PostgreSQL server (tests/integration/test_ledger_postgres.py's fixture); each knows
only its own node, so the second broker's book never sees the first one's lease: only the
shared ledger can tell it."""

from __future__ import annotations

import asyncio
import time

import pytest

from colocate.auth.identity import Identity
from colocate.broker import Broker
from colocate.broker.api import LeaseRequest
from colocate.broker.ledger import Ledger
from colocate.config import BrokerConfig, Quota, QuotaConfig
from colocate.errors import QuotaExceeded
from tests.integration.test_ledger_postgres import postgres_url  # noqa: F401 (fixture)
from tests.unit.test_broker_idempotency import FakeAgent, node_report

pytestmark = [pytest.mark.root, pytest.mark.slow]

GiB = 1024**3
SECRET = b"q" * 32
CAROL = Identity(1002, 1002, "carol", (), False, "munge")


def _broker(config: BrokerConfig, ledger: Ledger, node: str) -> Broker:
    broker = Broker(config, SECRET, clock=time.time, ledger=ledger)
    broker._agent = FakeAgent()  # type: ignore[method-assign]
    broker.report(node, node_report())
    return broker


def test_a_users_cores_are_counted_across_brokers_sharing_the_ledger(
    postgres_url: str,  # noqa: F811
) -> None:
    config = BrokerConfig(quotas=QuotaConfig(users={"carol": Quota(cores=2)}))
    first = _broker(config, Ledger.postgres(postgres_url), "n1")
    second = _broker(config, Ledger.postgres(postgres_url), "n2")

    async def scenario() -> None:
        held = await first.lease(LeaseRequest(cores=2, memory=GiB, duration=60), CAROL)
        assert second.book.lease(held.lease_id) is None  # the second broker never saw it
        with pytest.raises(QuotaExceeded) as refused:
            await second.lease(LeaseRequest(cores=1, memory=GiB, duration=60), CAROL)
        assert refused.value.limit == "cores" and refused.value.used == 2
        assert "holds 2 cores" in str(refused.value)
        await first.release(held.lease_id, CAROL)
        again = await second.lease(LeaseRequest(cores=2, memory=GiB, duration=60), CAROL)
        assert again.node == "n2"

    asyncio.run(scenario())
    for broker in (first, second):
        assert broker.ledger is not None
        broker.ledger.close_db()
