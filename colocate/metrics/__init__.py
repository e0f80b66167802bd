"""colocate's Prometheus metrics: utilization, leases, invocations, evictions, wasted and
recovered money.

An agent uses :class:`AgentMetrics` (four calls, see its module). Underneath, the agent (or
broker) owns a registry, registers a :class:`NodeCollector` on it, feeds it a
:class:`NodeState` per cycle and records events; :func:`serve_metrics` exposes it::

    registry = CollectorRegistry()
    metrics = NodeCollector(config.prices, registry=registry)
    server = serve_metrics(registry, config.agent.metrics_listen)
    ...
    metrics.update(NodeState(snapshot, offer=decision.offer, leases=..., executors=...))
    metrics.events(snapshot.node).record_invocation("ok", 0.0004)

The broker mounts a :class:`BrokerCollector` over its status the same way. The pure parts
(``accounting``, ``events``, ``state``) import no prometheus_client.

The names below are imported on first use (PEP 562): every worker process imports
``colocate.metrics.events`` for one counter class, and must not pay for prometheus_client,
psutil and pydantic through this package.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from colocate.metrics.accounting import CostAccount, cpu_efficiency, memory_efficiency
    from colocate.metrics.agent_metrics import AgentMetrics
    from colocate.metrics.broker import BrokerCollector
    from colocate.metrics.collector import NodeCollector
    from colocate.metrics.events import InvocationResult, NodeEvents
    from colocate.metrics.executor_meter import ExecutorMeter
    from colocate.metrics.exposition import MetricsServer, parse_listen, render, serve_metrics
    from colocate.metrics.state import (
        EXECUTOR_STATES,
        LEASE_STATES,
        NODE_STATES,
        ExecutorState,
        LeaseState,
        NodeState,
    )

# public name -> the module that defines it
_WHERE = {
    "CostAccount": "accounting",
    "cpu_efficiency": "accounting",
    "memory_efficiency": "accounting",
    "AgentMetrics": "agent_metrics",
    "BrokerCollector": "broker",
    "NodeCollector": "collector",
    "InvocationResult": "events",
    "NodeEvents": "events",
    "ExecutorMeter": "executor_meter",
    "MetricsServer": "exposition",
    "parse_listen": "exposition",
    "render": "exposition",
    "serve_metrics": "exposition",
    "EXECUTOR_STATES": "state",
    "LEASE_STATES": "state",
    "NODE_STATES": "state",
    "ExecutorState": "state",
    "LeaseState": "state",
    "NodeState": "state",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "EXECUTOR_STATES",
    "LEASE_STATES",
    "NODE_STATES",
    "AgentMetrics",
    "BrokerCollector",
    "CostAccount",
    "ExecutorMeter",
    "ExecutorState",
    "InvocationResult",
    "LeaseState",
    "MetricsServer",
    "NodeCollector",
    "NodeEvents",
    "NodeState",
    "cpu_efficiency",
    "memory_efficiency",
    "parse_listen",
    "render",
    "serve_metrics",
]
