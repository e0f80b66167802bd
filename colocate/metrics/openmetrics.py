"""A replayed history as OpenMetrics text with timestamps, in the live metric names.

``promtool tsdb create-blocks-from openmetrics FILE DIR`` turns the text into TSDB blocks a
Prometheus loads, so the dashboard shows a replayed "what-if" next to (or instead of) live
data. Every series carries ``node`` (the replay's name for the cluster, default
``replay``) and ``policy``; the dashboard's ``$policy`` variable picks one.

The replay gives per-interval samples (:class:`ReplaySample`): gauges as values at the
interval's end, counters as the increment over the interval; this module accumulates the
counters. Pure text generation: the caller opens the file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TextIO

from colocate.metrics.accounting import WASTE_STATES
from colocate.metrics.events import EVICTION_REASONS, INVOCATION_RESULTS
from colocate.metrics.state import NODE_STATES

__all__ = ["ReplaySample", "write_openmetrics"]


@dataclass(frozen=True, slots=True)
class ReplaySample:
    """One interval of one policy's replay, ending at ``t`` (epoch seconds).

    ``cores`` and ``memory_bytes``: values at ``t`` by node state (``NODE_STATES``; missing
    states are not written). ``wasted_cost`` (by (resource, state)), ``recovered_cost`` (by
    resource), ``evictions`` (by reason) and ``invocations`` (by result): increments over
    the interval, as are ``cold_starts``.
    """

    t: float
    cores: Mapping[str, float] = field(default_factory=dict)
    memory_bytes: Mapping[str, float] = field(default_factory=dict)
    wasted_cost: Mapping[tuple[str, str], float] = field(default_factory=dict)
    recovered_cost: Mapping[str, float] = field(default_factory=dict)
    evictions: Mapping[str, float] = field(default_factory=dict)
    invocations: Mapping[str, float] = field(default_factory=dict)
    leases: float | None = None
    cold_starts: float = 0.0


_Labels = tuple[tuple[str, str], ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: _Labels) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels) + "}"


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class _Family:
    """Samples of one metric family, grouped by series (OpenMetrics wants them together)."""

    def __init__(self, name: str, kind: str, help_text: str, unit: str = "") -> None:
        self.name = name
        self.kind = kind
        self.help = help_text
        self.unit = unit
        self.series: dict[_Labels, list[tuple[float, float]]] = {}

    def add(self, labels: _Labels, t: float, value: float) -> None:
        self.series.setdefault(labels, []).append((t, value))

    def write(self, out: TextIO) -> None:
        if not self.series:
            return
        out.write(f"# TYPE {self.name} {self.kind}\n")
        if self.unit:
            out.write(f"# UNIT {self.name} {self.unit}\n")
        out.write(f"# HELP {self.name} {self.help}\n")
        suffix = {"counter": "_total", "info": "_info"}.get(self.kind, "")
        for labels, points in self.series.items():
            text = _labels(labels)
            for t, value in points:
                out.write(f"{self.name}{suffix}{text} {_number(value)} {_number(t)}\n")


def write_openmetrics(
    replay: Mapping[str, Sequence[ReplaySample]],
    out: TextIO,
    *,
    node: str = "replay",
    currency: str = "EUR",
    charging: str = "resources",
    time_shift_s: float = 0.0,
) -> int:
    """Write every policy's samples (``replay``: policy name -> samples, oldest first).

    ``time_shift_s`` is added to every timestamp (e.g. to move an old trace next to now,
    inside the Prometheus retention). Returns the number of samples written. Samples of a
    policy that are not strictly later than the previous one are dropped (OpenMetrics
    requires increasing timestamps per series).
    """
    fam = {
        "cores": _Family("colocate_node_cores", "gauge", "node cores by state (replayed)"),
        "memory": _Family(
            "colocate_node_memory_bytes", "gauge", "node memory by state (replayed)", "bytes"
        ),
        "leases": _Family("colocate_leases", "gauge", "leases by state (replayed)"),
        "wasted": _Family("colocate_wasted_cost", "counter", "cost of idle resources (replayed)"),
        "recovered": _Family(
            "colocate_recovered_cost", "counter", "worth of leased resources (replayed)"
        ),
        "evictions": _Family(
            "colocate_evictions", "counter", "leases taken back, by reason (replayed)"
        ),
        "invocations": _Family(
            "colocate_invocations", "counter", "invocations by result (replayed)"
        ),
        "cold_starts": _Family(
            "colocate_cold_starts", "counter", "executors started for a lease (replayed)"
        ),
        "price": _Family(
            "colocate_price", "info", "currency and charging model of every *_cost_total"
        ),
    }
    written = 0
    for policy in sorted(replay):
        base: _Labels = (("node", node), ("policy", policy))
        totals: dict[tuple[str, _Labels], float] = {}
        last_t = -math.inf
        for sample in replay[policy]:
            t = sample.t + time_shift_s
            if t <= last_t:
                continue
            last_t = t
            written += _write_sample(fam, totals, base, sample, t, currency, charging)
    for family in fam.values():
        family.write(out)
    out.write("# EOF\n")
    return written


def _write_sample(
    fam: dict[str, _Family],
    totals: dict[tuple[str, _Labels], float],
    base: _Labels,
    sample: ReplaySample,
    t: float,
    currency: str,
    charging: str,
) -> int:
    n = 0
    for state in NODE_STATES:
        if state in sample.cores:
            fam["cores"].add((*base, ("state", state)), t, sample.cores[state])
            n += 1
        if state in sample.memory_bytes:
            fam["memory"].add((*base, ("state", state)), t, sample.memory_bytes[state])
            n += 1
    if sample.leases is not None:
        fam["leases"].add((*base, ("state", "active")), t, sample.leases)
        n += 1

    def accumulate(key: str, labels: _Labels, increment: float) -> None:
        nonlocal n
        total = totals.get((key, labels), 0.0) + max(0.0, increment)
        totals[(key, labels)] = total
        fam[key].add(labels, t, total)
        n += 1

    for resource in ("node",) if charging == "node" else ("cores", "memory"):
        for state in WASTE_STATES:
            labels = (*base, ("resource", resource), ("state", state))
            accumulate("wasted", labels, sample.wasted_cost.get((resource, state), 0.0))
        accumulate(
            "recovered", (*base, ("resource", resource)), sample.recovered_cost.get(resource, 0.0)
        )
    # Only the reasons and results the replay gives (unknown ones folded into "other"):
    # writing every known label value as zeros would double a long replay's file.
    for reason in _present(sample.evictions, EVICTION_REASONS):
        accumulate(
            "evictions",
            (*base, ("reason", reason)),
            _bounded_sum(sample.evictions, reason, EVICTION_REASONS),
        )
    for result in _present(sample.invocations, INVOCATION_RESULTS):
        accumulate(
            "invocations",
            (*base, ("result", result)),
            _bounded_sum(sample.invocations, result, INVOCATION_RESULTS),
        )
    accumulate("cold_starts", base, sample.cold_starts)
    fam["price"].add((*base, ("charging", charging), ("currency", currency)), t, 1.0)
    return n + 1


def _present(values: Mapping[str, float], known: Sequence[str]) -> list[str]:
    return sorted({k if k in known else "other" for k in values})


def _bounded_sum(values: Mapping[str, float], key: str, known: Sequence[str]) -> float:
    if key != "other":
        return values.get(key, 0.0)
    return sum(v for k, v in values.items() if k not in known or k == "other")
