"""The broker's cluster-wide view as metrics: offers, free capacity and leases per node.

The broker owns its lease book and reads it on its own event loop, so the collector asks
for a status object at scrape time through a callable (``Broker.status`` fits: any object
with the attributes of the protocols below). Names are ``colocate_broker_*`` so they never
add up with the agents' own ``colocate_node_*`` series in a ``sum``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

__all__ = ["LEASE_REQUEST_RESULTS", "BrokerCollector"]

LEASE_REQUEST_RESULTS: tuple[str, ...] = ("granted", "denied", "failed", "other")


class NodeLike(Protocol):
    @property
    def node(self) -> str: ...
    @property
    def alive(self) -> bool: ...
    @property
    def cpu_ids(self) -> Sequence[int]: ...
    @property
    def memory_bytes(self) -> int: ...
    @property
    def free_cpu_ids(self) -> Sequence[int]: ...
    @property
    def free_memory_bytes(self) -> int: ...
    @property
    def reported_at(self) -> float: ...


class LeaseLike(Protocol):
    @property
    def node(self) -> str: ...
    @property
    def cpu_ids(self) -> Sequence[int]: ...
    @property
    def memory_bytes(self) -> int: ...


class StatusLike(Protocol):
    """What the broker knows now (``colocate.broker.api.BrokerStatus`` has this shape)."""

    @property
    def now(self) -> float: ...
    @property
    def nodes(self) -> Sequence[NodeLike]: ...
    @property
    def leases(self) -> Sequence[LeaseLike]: ...


class BrokerCollector(Collector):
    """Exports the broker's status, read through ``status()`` at every scrape.

    ``record_lease_request(result)`` counts lease requests by ``granted``, ``denied``
    (no capacity) or ``failed`` (the agent could not start it); anything else is ``other``.
    """

    def __init__(
        self, status: Callable[[], StatusLike], *, registry: CollectorRegistry | None = None
    ) -> None:
        self._status = status
        self._lock = threading.Lock()
        self._requests = dict.fromkeys(LEASE_REQUEST_RESULTS, 0)
        if registry is not None:
            registry.register(self)

    def record_lease_request(self, result: str) -> None:
        with self._lock:
            key = result if result in self._requests else "other"
            self._requests[key] += 1

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        status = self._status()
        with self._lock:
            requests = dict(self._requests)
        nodes = GaugeMetricFamily(
            "colocate_broker_nodes", "nodes whose agent reported, by alive|silent", labels=["state"]
        )
        cores = GaugeMetricFamily(
            "colocate_broker_cores",
            "cores per node as the broker books them: offered, leased, free",
            labels=["node", "state"],
        )
        memory = GaugeMetricFamily(
            "colocate_broker_memory_bytes",
            "memory per node as the broker books it: offered, leased, free",
            labels=["node", "state"],
        )
        leases = GaugeMetricFamily(
            "colocate_broker_leases", "leases booked per node", labels=["node"]
        )
        age = GaugeMetricFamily(
            "colocate_broker_report_age_seconds",
            "seconds since the node's agent last reported",
            labels=["node"],
        )
        counts = {"alive": 0, "silent": 0}
        per_node: dict[str, list[int]] = {}
        for lease in status.leases:
            held = per_node.setdefault(lease.node, [0, 0, 0])
            held[0] += 1
            held[1] += len(lease.cpu_ids)
            held[2] += lease.memory_bytes
        for n in status.nodes:
            counts["alive" if n.alive else "silent"] += 1
            n_leases, leased_cores, leased_memory = per_node.get(n.node, [0, 0, 0])
            for state, c, m in (
                ("offered", len(n.cpu_ids), n.memory_bytes),
                ("leased", leased_cores, leased_memory),
                ("free", len(n.free_cpu_ids), n.free_memory_bytes),
            ):
                cores.add_metric([n.node, state], float(c))
                memory.add_metric([n.node, state], float(m))
            leases.add_metric([n.node], float(n_leases))
            age.add_metric([n.node], max(0.0, status.now - n.reported_at))
        for state, k in counts.items():
            nodes.add_metric([state], float(k))
        requests_family = CounterMetricFamily(
            "colocate_broker_lease_requests", "lease requests by result", labels=["result"]
        )
        for result, k in requests.items():
            requests_family.add_metric([result], float(k))
        yield from (nodes, cores, memory, leases, age, requests_family)
