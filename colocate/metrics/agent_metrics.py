"""Everything a node agent needs for its metrics, behind four calls.

::

    metrics = AgentMetrics(node, config.prices, listen=config.agent.metrics_listen)  # serves /metrics
    # each cycle, after the policy decided:
    metrics.observe(snapshot_or_view, decision.offer, leases, executors=[(h.lease_id, h.pids) ...],
                    evicting=ids_in_grace, now=now)
    # as things happen:
    metrics.evicted(reason, latency_s)      # ExecutorBackend.evict(...) returns the latency
    metrics.cold_start(duration_s)          # lease granted -> executor ready
    metrics.invocation(result, duration_s)  # or metrics.events.add_invocations(...) for batches
    metrics.close()

The registry is the agent's own (never the global one); ``registry`` and ``collector`` are
exposed for agents that mount the exposition in their own HTTP server instead.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Sequence

from prometheus_client.registry import CollectorRegistry

from colocate.metrics.collector import NodeCollector
from colocate.metrics.events import NodeEvents
from colocate.metrics.executor_meter import ExecutorMeter
from colocate.metrics.exposition import MetricsServer, serve_metrics
from colocate.metrics.state import LeaseState, NodeState, snapshot_from_view
from monitors.snapshot import NodeSnapshot
from policies.model import LeaseView, NodeView, Offer
from policies.prices import Prices

log = logging.getLogger(__name__)

__all__ = ["AgentMetrics"]


class AgentMetrics:
    """One node's collector, executor meter and (optionally) exposition server.

    ``listen``: ``host:port`` to serve ``/metrics`` on (``AgentConfig.metrics_listen``), or
    None to serve nothing (mount ``registry`` yourself). Raises ConfigError if the address
    is bad or taken.
    """

    def __init__(
        self, node: str, prices: Prices, *, listen: str | None = None, max_gap_s: float = 60.0
    ) -> None:
        self.node = node
        self.registry = CollectorRegistry()
        self.collector = NodeCollector(prices, registry=self.registry, max_gap_s=max_gap_s)
        self.events: NodeEvents = self.collector.events(node)
        self._meter = ExecutorMeter()
        self.server: MetricsServer | None = serve_metrics(self.registry, listen) if listen else None

    def observe(
        self,
        node: NodeSnapshot | NodeView,
        offer: Offer,
        leases: Iterable[LeaseView],
        *,
        executors: Iterable[tuple[str, Sequence[int]]] = (),
        evicting: Collection[str] = (),
        now: float,
    ) -> None:
        """One cycle: the node (a monitor snapshot, or the policy's view without one), the
        offer decided, the leases held, each executor's (lease_id, pids), and the lease ids
        in their eviction grace period. Money accrues up to ``now`` (epoch seconds).

        Never raises for odd input from a live node: a failure is logged and the previous
        state stays exported, since metrics must not take the agent down.
        """
        try:
            snapshot = node if isinstance(node, NodeSnapshot) else snapshot_from_view(node, now)
            if snapshot.node != self.node:
                snapshot = _renamed(snapshot, self.node)
            lease_states = tuple(
                LeaseState.from_view(lease, "evicting" if lease.lease_id in evicting else "active")
                for lease in leases
            )
            measured = self._meter.measure(executors, now, stopping=evicting)
            self.collector.update(NodeState(snapshot, offer, lease_states, measured), now=now)
        except Exception as exc:  # a metrics bug must not stop the agent's loop
            log.warning(
                "metrics: could not take this cycle's state (%r); keeping the previous one", exc
            )
            log.debug("metrics: cycle state error", exc_info=True)

    def evicted(self, reason: str, latency_s: float | None = None) -> None:
        """A lease was taken back (``EvictionReason``), ``latency_s`` to memory free."""
        self.events.record_eviction(reason, latency_s)

    def cold_start(self, duration_s: float) -> None:
        """An executor started for a lease, ``duration_s`` from grant to ready."""
        self.events.record_cold_start(duration_s)

    def invocation(self, result: str, duration_s: float) -> None:
        """One invocation ended with ``result`` (``InvocationResult``) after ``duration_s``."""
        self.events.record_invocation(result, duration_s)

    def close(self) -> None:
        """Stop serving (if serving); the registry stays readable."""
        if self.server is not None:
            self.server.close()
            self.server = None


def _renamed(snapshot: NodeSnapshot, node: str) -> NodeSnapshot:
    from dataclasses import replace

    return replace(snapshot, node=node)
