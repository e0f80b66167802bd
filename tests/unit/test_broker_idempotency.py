"""Idempotent lease requests on the broker: the same key never grants twice, on one broker or
on another of the same cluster. The agent is played by a function counting its starts (the
real agents and brokers: tests/integration/test_broker_failover.py)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from colocate.auth.identity import Identity
from colocate.broker import Broker
from colocate.broker.api import LeaseRequest, NodeReport, ReportedLease
from colocate.config import BrokerConfig
from colocate.errors import LeaseExpired

GiB = 1024**3
SECRET = b"s" * 32
ALICE = Identity(1000, 1000, "alice", (), False, "munge")
BOB = Identity(1001, 1001, "bob", (), False, "munge")


def node_report(leases: list[ReportedLease] = (), cores: int = 4) -> NodeReport:  # type: ignore[assignment]
    return NodeReport(
        url="http://agent", cpu_ids=list(range(cores)), memory_bytes=8 * GiB, generation=1,
        leases=list(leases),
    )  # fmt: skip


class FakeAgent:
    """Answers the broker's start like an agent (optionally slowly) and counts the starts."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.starts: list[str] = []
        self.delay_s = delay_s

    async def __call__(self, node: str, method: str, url: str, body: Any = None) -> Any:
        if method == "POST":
            self.starts.append(body["lease_id"])
            await asyncio.sleep(self.delay_s)
            return {
                "lease_id": body["lease_id"], "address": f"tcp://{node}:1", "pids": [1],
                "generation": 2, "max_payload_bytes": 1 << 20,
            }  # fmt: skip
        return {}


def broker_with(agent: FakeAgent) -> Broker:
    broker = Broker(BrokerConfig(), SECRET, clock=time.time)
    broker._agent = agent  # type: ignore[method-assign]
    broker.report("n1", node_report())
    return broker


REQUEST = LeaseRequest(cores=1, memory=GiB, duration=60)


def test_the_same_key_answers_the_same_grant_and_starts_once() -> None:
    async def scenario() -> None:
        agent = FakeAgent()
        broker = broker_with(agent)
        first = await broker.lease(REQUEST, ALICE, key="k-12345678")
        again = await broker.lease(REQUEST, ALICE, key="k-12345678", retry=True)
        other = await broker.lease(REQUEST, ALICE, key="k-87654321")
        assert again.lease_id == first.lease_id and again.cpu_ids == first.cpu_ids
        assert other.lease_id != first.lease_id
        assert agent.starts == [first.lease_id, other.lease_id]
        assert len(broker.book.leases()) == 2

    asyncio.run(scenario())


def test_a_duplicate_arriving_while_the_first_is_starting_waits_for_its_grant() -> None:
    async def scenario() -> None:
        agent = FakeAgent(delay_s=0.2)
        broker = broker_with(agent)
        a, b = await asyncio.gather(
            broker.lease(REQUEST, ALICE, key="k-12345678"),
            broker.lease(REQUEST, ALICE, key="k-12345678", retry=True),
        )
        assert a.lease_id == b.lease_id and len(agent.starts) == 1

    asyncio.run(scenario())


def test_keys_are_per_user_and_a_released_lease_is_never_granted_again() -> None:
    async def scenario() -> None:
        agent = FakeAgent()
        broker = broker_with(agent)
        mine = await broker.lease(REQUEST, ALICE, key="k-12345678")
        theirs = await broker.lease(REQUEST, BOB, key="k-12345678")
        assert mine.lease_id != theirs.lease_id
        await broker.release(mine.lease_id, ALICE)
        with pytest.raises(LeaseExpired, match="released"):
            await broker.lease(REQUEST, ALICE, key="k-12345678", retry=True)
        assert len(agent.starts) == 2

    asyncio.run(scenario())


def test_a_retry_on_another_broker_gets_the_lease_its_node_reports() -> None:
    """Broker A granted the lease and died before answering; the client retries on broker B
    (same cluster secret). B waits for the node's next report instead of placing it again."""

    async def scenario() -> None:
        a_agent, b_agent = FakeAgent(), FakeAgent()
        a, b = broker_with(a_agent), broker_with(b_agent)
        granted = await a.lease(REQUEST, ALICE, key="k-12345678")
        held = ReportedLease(
            lease_id=granted.lease_id, cpu_ids=granted.cpu_ids, memory_bytes=GiB,
            granted_at=granted.granted_at, expires_at=granted.expires_at,
            address=granted.address, generation=2,
        )  # fmt: skip

        async def next_report() -> None:
            await asyncio.sleep(0.3)
            b.report("n1", node_report([held]))

        reporting = asyncio.create_task(next_report())
        again = await b.lease(REQUEST, ALICE, key="k-12345678", retry=True)
        await reporting
        assert again.lease_id == granted.lease_id and again.cpu_ids == granted.cpu_ids
        assert b_agent.starts == []  # B never placed it a second time
        assert again.token  # B signs a token the node's executor accepts (same node key)

    asyncio.run(scenario())


def test_a_first_request_is_placed_at_once() -> None:
    """Only a retry waits for reports: a first request with a key costs nothing extra."""

    async def scenario() -> None:
        broker = broker_with(FakeAgent())
        started = time.monotonic()
        await broker.lease(REQUEST, ALICE, key="k-12345678")
        assert time.monotonic() - started < 0.5

    asyncio.run(scenario())
