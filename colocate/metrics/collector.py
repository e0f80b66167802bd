"""The Prometheus collector: metric families computed at scrape time from the latest state.

The agent calls :meth:`NodeCollector.update` once per sampling cycle (that is when money
accrues) and records events on :meth:`NodeCollector.events`; Prometheus scrapes whenever it
likes and sees the state of the last cycle. One collector can carry several nodes (the
broker, or one agent serving several slurmd of a dev cluster); every series has a ``node``
label, jobs add ``job_id`` and vanish with the job.

Register it on a registry you own (never the global one)::

    registry = CollectorRegistry()
    collector = NodeCollector(prices, registry=registry)
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.registry import Collector, CollectorRegistry

from colocate.metrics.accounting import CostAccount
from colocate.metrics.events import EventCounts, HistogramCounts, NodeEvents
from colocate.metrics.job_series import job_families
from colocate.metrics.money_series import money_families
from colocate.metrics.state import (
    EXECUTOR_STATES,
    LEASE_STATES,
    NODE_STATES,
    OTHER,
    NodeState,
    bounded_state,
)
from policies.prices import GIB, Prices

log = logging.getLogger(__name__)

Metric = GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily | InfoMetricFamily


@dataclass(slots=True)
class _NodeEntry:
    state: NodeState
    account: CostAccount


class NodeCollector(Collector):
    """Exports the ``colocate_*`` metrics of the nodes it is fed, plus prices and build info.

    ``max_gap_s``: sampling gaps longer than this accrue no money (see ``CostAccount``).
    ``version`` defaults to the installed colocate version.
    """

    def __init__(
        self,
        prices: Prices,
        *,
        registry: CollectorRegistry | None = None,
        max_gap_s: float = 60.0,
        version: str = "",
    ) -> None:
        self.prices = prices
        self.max_gap_s = max_gap_s
        self._version = version or _package_version()
        self._lock = threading.Lock()
        self._nodes: dict[str, _NodeEntry] = {}
        self._events: dict[str, NodeEvents] = {}
        if registry is not None:
            registry.register(self)

    # --- feeding -----------------------------------------------------------------------

    def update(self, state: NodeState, now: float | None = None) -> None:
        """Take the state of one node's latest cycle; money accrues up to ``now``.

        ``now`` defaults to ``state.snapshot.t`` (the sample's own time, so a slow agent
        cycle does not distort the integral).
        """
        node = state.snapshot.node
        t = state.snapshot.t if now is None else now
        with self._lock:
            entry = self._nodes.get(node)
            if entry is None:
                entry = _NodeEntry(state, CostAccount(self.prices, self.max_gap_s))
                self._nodes[node] = entry
            entry.account.advance(state.snapshot, state.cores_leased, state.memory_leased_bytes, t)
            entry.state = state
            if node not in self._events:
                self._events[node] = NodeEvents()

    def events(self, node: str) -> NodeEvents:
        """The event counters of ``node`` (created on first use); record on them directly."""
        with self._lock:
            return self._events.setdefault(node, NodeEvents())

    def forget(self, node: str) -> None:
        """Stop exporting ``node`` (the agent for it went away)."""
        with self._lock:
            self._nodes.pop(node, None)
            self._events.pop(node, None)

    # --- scraping ----------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        # Built under the lock: update() mutates the accounts, and building takes ~1 ms.
        with self._lock:
            entries = [(name, self._nodes[name]) for name in sorted(self._nodes)]
            events = {name: ev.counts() for name, ev in sorted(self._events.items())}
            families = [
                *self._build_info(),
                *self._prices(),
                *self._node_families(entries),
                *job_families([(e.state.snapshot, e.account) for _, e in entries]),
                *self._lease_families(entries),
                *self._event_families(events),
                *money_families([(name, e.account) for name, e in entries]),
            ]
        yield from families

    def _build_info(self) -> Iterator[Metric]:
        info = InfoMetricFamily("colocate_build", "colocate version running this exporter")
        info.add_metric([], {"version": self._version})
        yield info

    def _prices(self) -> Iterator[Metric]:
        p = self.prices
        info = InfoMetricFamily(
            "colocate_price", "currency and charging model of every *_cost_total"
        )
        info.add_metric([], {"currency": p.currency, "charging": p.charging})
        yield info
        yield GaugeMetricFamily(
            "colocate_price_per_core_second",
            "price of one core for one second (core-hour price / 3600)",
            value=p.core_hour / 3600.0,
        )
        yield GaugeMetricFamily(
            "colocate_price_per_byte_second",
            "price of one byte for one second (GiB-hour price / 2^30 / 3600)",
            value=p.gib_hour / GIB / 3600.0,
        )
        yield GaugeMetricFamily(
            "colocate_price_per_node_second",
            "price of one node for one second (node-hour price / 3600)",
            value=p.node_hour / 3600.0,
        )

    def _node_families(self, entries: list[tuple[str, _NodeEntry]]) -> Iterator[Metric]:
        cores = GaugeMetricFamily(
            "colocate_node_cores",
            "node cores by state; states overlap: allocated = used_by_jobs + idle_allocated, "
            "total = allocated + unallocated, leased <= offered",
            labels=["node", "state"],
        )
        memory = GaugeMetricFamily(
            "colocate_node_memory_bytes",
            "node memory by state (same states as colocate_node_cores)",
            labels=["node", "state"],
        )
        jobs = GaugeMetricFamily(
            "colocate_node_jobs", "running batch jobs on the node", labels=["node"]
        )
        slurm_up = GaugeMetricFamily(
            "colocate_node_slurm_up",
            "1 if the last sample reached Slurm, 0 if it did not",
            labels=["node"],
        )
        cpu_psi = GaugeMetricFamily(
            "colocate_node_cpu_pressure_ratio",
            "node-wide PSI cpu some avg10 (/proc/pressure), 0..1",
            labels=["node"],
        )
        mem_psi = GaugeMetricFamily(
            "colocate_node_memory_pressure_ratio",
            "node-wide PSI memory some avg10 (/proc/pressure), 0..1",
            labels=["node"],
        )
        sampled = GaugeMetricFamily(
            "colocate_node_sample_timestamp_seconds",
            "epoch seconds of the node's latest sample",
            labels=["node"],
        )
        for name, entry in entries:
            st = entry.state
            snap = st.snapshot
            core_values = {
                "total": float(snap.cores_total),
                "allocated": float(sum(j.cores_allocated for j in snap.jobs)),
                "used_by_jobs": sum(j.cores_used for j in snap.jobs),
                "idle_allocated": sum(j.cores_idle for j in snap.jobs),
                "unallocated": float(snap.cores_unallocated),
                "offered": float(st.offer.cores),
                "leased": float(st.cores_leased),
                "used_by_functions": st.cores_used_by_functions,
            }
            memory_values = {
                "total": snap.memory_total_bytes,
                "allocated": sum(j.memory_allocated_bytes for j in snap.jobs),
                "used_by_jobs": sum(j.memory_used_bytes for j in snap.jobs),
                "idle_allocated": sum(j.memory_unused_bytes for j in snap.jobs),
                "unallocated": snap.memory_unallocated_bytes,
                "offered": st.offer.memory_bytes,
                "leased": st.memory_leased_bytes,
                "used_by_functions": st.memory_used_by_functions_bytes,
            }
            for state in NODE_STATES:
                cores.add_metric([name, state], core_values[state])
                memory.add_metric([name, state], float(memory_values[state]))
            jobs.add_metric([name], float(len(snap.jobs)))
            slurm_up.add_metric([name], 1.0 if snap.slurm_ok else 0.0)
            sampled.add_metric([name], snap.t)
            if snap.cpu_pressure is not None:
                cpu_psi.add_metric([name], snap.cpu_pressure / 100.0)
            if snap.memory_pressure is not None:
                mem_psi.add_metric([name], snap.memory_pressure / 100.0)
        yield from (cores, memory, jobs, slurm_up, sampled, cpu_psi, mem_psi)

    def _lease_families(self, entries: list[tuple[str, _NodeEntry]]) -> Iterator[Metric]:
        leases = GaugeMetricFamily(
            "colocate_leases", "leases on the node by state", labels=["node", "state"]
        )
        executors = GaugeMetricFamily(
            "colocate_executors",
            "executor processes on the node by state",
            labels=["node", "state"],
        )
        for name, entry in entries:
            lease_counts = dict.fromkeys((*LEASE_STATES, OTHER), 0)
            for lease in entry.state.leases:
                lease_counts[bounded_state(lease.state, LEASE_STATES)] += 1
            exec_counts = dict.fromkeys((*EXECUTOR_STATES, OTHER), 0)
            for ex in entry.state.executors:
                exec_counts[bounded_state(ex.state, EXECUTOR_STATES)] += 1
            for state, n in lease_counts.items():
                leases.add_metric([name, state], float(n))
            for state, n in exec_counts.items():
                executors.add_metric([name, state], float(n))
        yield from (leases, executors)

    def _event_families(self, events: dict[str, EventCounts]) -> Iterator[Metric]:
        invocations = CounterMetricFamily(
            "colocate_invocations",
            "finished function invocations by result",
            labels=["node", "result"],
        )
        evictions = CounterMetricFamily(
            "colocate_evictions", "leases taken back, by reason", labels=["node", "reason"]
        )
        cold = CounterMetricFamily(
            "colocate_cold_starts", "executors started for a lease", labels=["node"]
        )
        inv_hist = HistogramMetricFamily(
            "colocate_invocation_duration_seconds",
            "invocation wall time as the executor saw it",
            labels=["node"],
        )
        ev_hist = HistogramMetricFamily(
            "colocate_eviction_latency_seconds",
            "from eviction decision to executor gone and memory free",
            labels=["node"],
        )
        cold_hist = HistogramMetricFamily(
            "colocate_cold_start_duration_seconds",
            "from lease grant to the executor ready",
            labels=["node"],
        )
        for name, counts in events.items():
            for result, n in counts.invocations.items():
                invocations.add_metric([name, result], float(n))
            for reason, n in counts.evictions.items():
                evictions.add_metric([name, reason], float(n))
            cold.add_metric([name], float(counts.cold_starts))
            for family, hist in (
                (inv_hist, counts.invocation_duration),
                (ev_hist, counts.eviction_latency),
                (cold_hist, counts.cold_start_duration),
            ):
                _add_histogram(family, name, hist)
        yield from (invocations, evictions, cold, inv_hist, ev_hist, cold_hist)


def _add_histogram(family: HistogramMetricFamily, node: str, hist: HistogramCounts) -> None:
    buckets = [(_le(b), float(n)) for b, n in zip(hist.bounds, hist.buckets, strict=True)]
    buckets.append(("+Inf", float(hist.count)))
    family.add_metric([node], buckets, hist.sum)


def _le(bound: float) -> str:
    return repr(float(bound))


def _package_version() -> str:
    from colocate import __version__

    return __version__


__all__ = ["NodeCollector"]
