"""The broker's soft state, driven directly with a scripted clock (agent calls go nowhere)."""

from __future__ import annotations

import asyncio

import pytest

from colocate.broker import Broker
from colocate.broker.api import LeaseRequest, NodeReport, RenewRequest, ReportedLease
from colocate.config import BrokerConfig
from colocate.errors import LeaseDenied, LeaseError, LeaseEvicted, LeaseExpired

GiB = 1024**3
NOWHERE = "http://127.0.0.1:9"  # nothing listens: agent calls fail fast


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def live(
    lease_id: str, cpu_ids: list[int], expires_at: float, generation: int = 1
) -> ReportedLease:
    return ReportedLease(
        lease_id=lease_id,
        cpu_ids=cpu_ids,
        memory_bytes=GiB,
        granted_at=0.0,
        expires_at=expires_at,
        address="tcp://127.0.0.1:1",
        generation=generation,
    )


def report(leases: list[ReportedLease], generation: int = 1, cores: int = 2) -> NodeReport:
    return NodeReport(
        url=NOWHERE,
        cpu_ids=list(range(cores)),
        memory_bytes=4 * GiB,
        generation=generation,
        leases=leases,
    )


def test_restarted_broker_relearns_and_keeps_the_cores_taken() -> None:
    clock = Clock()
    broker = Broker(BrokerConfig(), b"s" * 32, clock=clock)
    reply = broker.report("n1", report([live("l-a", [0], clock.t + 60)]))
    assert reply.learned == ["l-a"] and reply.release == []
    status = broker.status()
    assert [(le.lease_id, le.cpu_ids) for le in status.leases] == [("l-a", [0])]
    assert status.nodes[0].free_cpu_ids == [1]


def test_a_late_report_of_a_released_lease_asks_the_agent_to_stop_it() -> None:
    async def scenario() -> None:
        clock = Clock()
        broker = Broker(BrokerConfig(agent_timeout_s=1), b"s" * 32, clock=clock)
        await broker.start()
        try:
            broker.report("n1", report([live("l-a", [0], clock.t + 60)]))
            released = await broker.release("l-a")  # the agent cannot be told now
            assert released.released
            again = await broker.release("l-a")
            assert not again.released  # idempotent
            reply = broker.report("n1", report([live("l-a", [0], clock.t + 60)], generation=2))
            assert reply.release == ["l-a"] and reply.learned == []
            assert broker.status().leases == []
        finally:
            await broker.close()

    asyncio.run(scenario())


def test_ended_leases_say_why_on_renew() -> None:
    async def scenario() -> None:
        clock = Clock()
        broker = Broker(BrokerConfig(), b"s" * 32, clock=clock)
        await broker.start()
        try:
            broker.report(
                "n1", report([live("l-old", [0], clock.t + 5), live("l-gone", [1], clock.t + 60)])
            )
            broker.report("n1", report([live("l-old", [0], clock.t + 5)], generation=2))
            with pytest.raises(LeaseEvicted, match="l-gone"):
                await broker.renew("l-gone", RenewRequest(duration=10))
            clock.t += 5
            broker.book.expire(clock.t)
            with pytest.raises(LeaseExpired, match="l-old"):
                await broker.renew("l-old", RenewRequest(duration=10))
            with pytest.raises(LeaseError, match="not known"):
                await broker.renew("l-never", RenewRequest(duration=10))
        finally:
            await broker.close()

    asyncio.run(scenario())


def test_silent_nodes_get_no_leases_and_denials_name_the_best_node() -> None:
    async def scenario() -> None:
        clock = Clock()
        broker = Broker(BrokerConfig(node_timeout_s=3), b"s" * 32, clock=clock)
        await broker.start()
        try:
            broker.report("n1", report([], cores=2))
            with pytest.raises(LeaseDenied, match=r"best node \(n1\) has 2 cores") as denied:
                await broker.lease(LeaseRequest(cores=3, memory=GiB, duration=60))
            assert denied.value.available["cores"] == 2
            clock.t += 4
            with pytest.raises(
                LeaseDenied, match="none of the 1 registered nodes reported in the last 3s"
            ):
                await broker.lease(LeaseRequest(cores=1, memory=GiB, duration=60))
        finally:
            await broker.close()

    asyncio.run(scenario())
