"""Node money series: wasted cost by resource and state, recovered cost, and the
resource-seconds behind them (see :mod:`colocate.metrics.accounting` for the definitions)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from prometheus_client.core import CounterMetricFamily

from colocate.metrics.accounting import WASTE_STATES, CostAccount


def money_families(accounts: Sequence[tuple[str, CostAccount]]) -> Iterator[CounterMetricFamily]:
    """The ``colocate_wasted_*`` and ``colocate_recovered_*`` counters of each (node, account)."""
    wasted = CounterMetricFamily(
        "colocate_wasted_cost",
        "cost of idle resources (idle inside allocations, unallocated), currency: colocate_price_info",
        labels=["node", "resource", "state"],
    )
    recovered = CounterMetricFamily(
        "colocate_recovered_cost",
        "worth of the resources leased to functions at the same prices",
        labels=["node", "resource"],
    )
    wasted_core_s = CounterMetricFamily(
        "colocate_wasted_core_seconds", "idle core-seconds by state", labels=["node", "state"]
    )
    wasted_mem_bs = CounterMetricFamily(
        "colocate_wasted_memory_byte_seconds",
        "idle memory byte-seconds by state",
        labels=["node", "state"],
    )
    rec_core_s = CounterMetricFamily(
        "colocate_recovered_core_seconds", "core-seconds leased to functions", labels=["node"]
    )
    rec_mem_bs = CounterMetricFamily(
        "colocate_recovered_memory_byte_seconds",
        "memory byte-seconds leased to functions",
        labels=["node"],
    )
    skipped = CounterMetricFamily(
        "colocate_accounting_skipped_seconds",
        "sampling gaps longer than max_gap_s, not accounted (agent paused, node down)",
        labels=["node"],
    )
    for name, m in accounts:
        for (resource, state), cost in sorted(m.wasted_cost.items()):
            wasted.add_metric([name, resource, state], cost)
        for resource, cost in sorted(m.recovered_cost.items()):
            recovered.add_metric([name, resource], cost)
        for state in WASTE_STATES:
            wasted_core_s.add_metric([name, state], m.wasted_core_seconds[state])
            wasted_mem_bs.add_metric([name, state], m.wasted_memory_byte_seconds[state])
        rec_core_s.add_metric([name], m.recovered_core_seconds)
        rec_mem_bs.add_metric([name], m.recovered_memory_byte_seconds)
        skipped.add_metric([name], m.skipped_s)
    yield from (
        wasted,
        recovered,
        wasted_core_s,
        wasted_mem_bs,
        rec_core_s,
        rec_mem_bs,
        skipped,
    )
