"""The broker's cluster view as metrics, read from the broker's own status model."""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from colocate.broker.api import BrokerStatus, LeaseInfo, NodeInfo
from colocate.metrics import render
from colocate.metrics.broker import BrokerCollector

GIB = 1024**3


def status(now: float, leases: int) -> BrokerStatus:
    nodes = [
        NodeInfo(
            node="n1",
            url="http://n1:8643",
            alive=True,
            cpu_ids=[0, 1, 2, 3],
            memory_bytes=4 * GIB,
            free_cpu_ids=list(range(leases, 4)),
            free_memory_bytes=(4 - leases) * GIB,
            reported_at=now - 1,
        ),
        NodeInfo(
            node="n2",
            url="http://n2:8643",
            alive=False,
            cpu_ids=[0],
            memory_bytes=GIB,
            free_cpu_ids=[0],
            free_memory_bytes=GIB,
            reported_at=now - 40,
        ),
    ]
    held = [
        LeaseInfo(
            lease_id=f"L{i}",
            node="n1",
            address="n1:7000",
            cpu_ids=[i],
            memory_bytes=GIB,
            granted_at=now - 5,
            expires_at=now + 60,
        )
        for i in range(leases)
    ]
    return BrokerStatus(placement="best_fit", now=now, nodes=nodes, leases=held)


def scrape(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(render(registry).decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_each_scrape_reads_the_current_status() -> None:
    current = [status(100.0, 1)]
    registry = CollectorRegistry()
    collector = BrokerCollector(lambda: current[0], registry=registry)
    first = scrape(registry)
    assert first[("colocate_broker_cores", (("node", "n1"), ("state", "leased")))] == 1
    assert first[("colocate_broker_nodes", (("state", "silent"),))] == 1
    assert first[("colocate_broker_report_age_seconds", (("node", "n2"),))] == 40
    current[0] = status(200.0, 3)
    collector.record_lease_request("granted")
    collector.record_lease_request("no-such-result")
    second = scrape(registry)
    assert second[("colocate_broker_cores", (("node", "n1"), ("state", "free")))] == 1
    assert (
        second[("colocate_broker_memory_bytes", (("node", "n1"), ("state", "leased")))] == 3 * GIB
    )
    assert second[("colocate_broker_leases", (("node", "n1"),))] == 3
    assert second[("colocate_broker_lease_requests_total", (("result", "granted"),))] == 1
    assert second[("colocate_broker_lease_requests_total", (("result", "other"),))] == 1
