"""Event counters the agent increments as things happen: invocations, evictions, cold starts.

Counts and histograms are plain Python (no prometheus_client) so the replay can fill the
same structure; the collector turns them into metric families at scrape time. Thread-safe:
the agent's loop, its control API and executor callbacks may record concurrently.

Label values are bounded: an unknown invocation result or eviction reason is counted as
``other`` (and logged once) instead of creating a new series.
"""

from __future__ import annotations

import bisect
import enum
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from policies.model import EvictionReason

log = logging.getLogger(__name__)

#: Hot invocations take microseconds, cold ones and long functions seconds.
INVOCATION_BUCKETS_S: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
#: From eviction decision to executor gone and memory free.
EVICTION_BUCKETS_S: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
#: From lease grant to the executor ready for its first call.
COLD_START_BUCKETS_S: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


class InvocationResult(enum.StrEnum):
    OK = "ok"
    ERROR = "error"  # the function raised
    TIMEOUT = "timeout"
    EVICTED = "evicted"  # the lease was taken back during the call
    REJECTED = "rejected"  # bad request, bad token, payload too large


INVOCATION_RESULTS: tuple[str, ...] = (*(r.value for r in InvocationResult), "other")
EVICTION_REASONS: tuple[str, ...] = (*(r.value for r in EvictionReason), "other")


@dataclass(frozen=True, slots=True)
class HistogramCounts:
    """Cumulative bucket counts: ``buckets[i]`` observations <= ``bounds[i]``; +Inf is ``count``."""

    bounds: tuple[float, ...]
    buckets: tuple[int, ...]
    count: int
    sum: float


class LatencyHistogram:
    """A fixed-bucket histogram of durations in seconds (not thread-safe on its own)."""

    def __init__(self, bounds: Sequence[float]) -> None:
        if list(bounds) != sorted(bounds) or len(set(bounds)) != len(bounds):
            raise ValueError("histogram bounds must be strictly increasing")
        self.bounds = tuple(float(b) for b in bounds)
        self._counts = [0] * len(self.bounds)  # per bucket, not cumulative
        self._over = 0
        self._sum = 0.0

    def observe(self, seconds: float) -> None:
        i = bisect.bisect_left(self.bounds, seconds)
        if i < len(self._counts):
            self._counts[i] += 1
        else:
            self._over += 1
        self._sum += seconds

    def add(self, counts: HistogramCounts) -> None:
        """Add another histogram's observations (same bounds; e.g. a worker's increments)."""
        if counts.bounds != self.bounds:
            raise ValueError("histogram bounds differ; use the same bucket bounds on both sides")
        previous = 0
        for i, cumulative in enumerate(counts.buckets):
            self._counts[i] += cumulative - previous
            previous = cumulative
        self._over += counts.count - previous
        self._sum += counts.sum

    def counts(self) -> HistogramCounts:
        cumulative: list[int] = []
        running = 0
        for c in self._counts:
            running += c
            cumulative.append(running)
        return HistogramCounts(self.bounds, tuple(cumulative), running + self._over, self._sum)


@dataclass(frozen=True, slots=True)
class EventCounts:
    """A consistent copy of every event counter, taken at one instant."""

    invocations: dict[str, int]
    invocation_duration: HistogramCounts
    evictions: dict[str, int]
    eviction_latency: HistogramCounts
    cold_starts: int
    cold_start_duration: HistogramCounts


class NodeEvents:
    """Counters since the agent started (Prometheus handles the reset on restart)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._invocations = dict.fromkeys(INVOCATION_RESULTS, 0)
        self._invocation_duration = LatencyHistogram(INVOCATION_BUCKETS_S)
        self._evictions = dict.fromkeys(EVICTION_REASONS, 0)
        self._eviction_latency = LatencyHistogram(EVICTION_BUCKETS_S)
        self._cold_starts = 0
        self._cold_start_duration = LatencyHistogram(COLD_START_BUCKETS_S)
        self._warned: set[str] = set()

    def _bounded(self, value: str, known: dict[str, int], what: str) -> str:
        if value in known:
            return value
        if value not in self._warned:
            self._warned.add(value)
            log.warning("unknown %s %r counted as 'other'", what, value)
        return "other"

    def record_invocation(self, result: str, duration_s: float) -> None:
        """One finished invocation: ``result`` (an :class:`InvocationResult`), wall seconds."""
        with self._lock:
            key = self._bounded(str(result), self._invocations, "invocation result")
            self._invocations[key] += 1
            self._invocation_duration.observe(max(0.0, duration_s))

    def add_invocations(self, results: Mapping[str, int], durations: HistogramCounts) -> None:
        """Add invocations counted elsewhere (an executor process): ``results`` by result and
        their ``durations`` on ``INVOCATION_BUCKETS_S``, both increments since the last call.

        ValueError if the histogram uses other bounds.
        """
        with self._lock:
            self._invocation_duration.add(durations)
            for result, n in results.items():
                key = self._bounded(str(result), self._invocations, "invocation result")
                self._invocations[key] += int(n)

    def record_eviction(self, reason: str, latency_s: float | None = None) -> None:
        """One lease taken back for ``reason`` (an ``EvictionReason``).

        ``latency_s``: seconds from the eviction decision to the executor gone and its
        memory free; None when unknown (counted, not observed in the histogram).
        """
        with self._lock:
            key = self._bounded(str(reason), self._evictions, "eviction reason")
            self._evictions[key] += 1
            if latency_s is not None:
                self._eviction_latency.observe(max(0.0, latency_s))

    def record_cold_start(self, duration_s: float) -> None:
        """One executor started for a lease; seconds from grant to ready."""
        with self._lock:
            self._cold_starts += 1
            self._cold_start_duration.observe(max(0.0, duration_s))

    def counts(self) -> EventCounts:
        with self._lock:
            return EventCounts(
                invocations=dict(self._invocations),
                invocation_duration=self._invocation_duration.counts(),
                evictions=dict(self._evictions),
                eviction_latency=self._eviction_latency.counts(),
                cold_starts=self._cold_starts,
                cold_start_duration=self._cold_start_duration.counts(),
            )


class InvocationTally:
    """What an executor process counts of its own invocations, to hand to its agent.

    The worker calls :meth:`record` per call; every so often it sends :meth:`drain` (the
    increments since the last drain, as JSON-ready data) to the agent, which passes them to
    :meth:`NodeEvents.add_invocations` via :meth:`from_json`. Not thread-safe: one per worker
    thread, or guard it.
    """

    def __init__(self) -> None:
        self._results: dict[str, int] = {}
        self._durations = LatencyHistogram(INVOCATION_BUCKETS_S)

    def record(self, result: str, duration_s: float) -> None:
        self._results[str(result)] = self._results.get(str(result), 0) + 1
        self._durations.observe(max(0.0, duration_s))

    def drain(self) -> dict[str, object]:
        """Increments since the last drain: ``{"results": {...}, "buckets": [...], "count", "sum"}``."""
        counts = self._durations.counts()
        data: dict[str, object] = {
            "results": dict(self._results),
            "buckets": list(counts.buckets),
            "count": counts.count,
            "sum": counts.sum,
        }
        self._results.clear()
        self._durations = LatencyHistogram(INVOCATION_BUCKETS_S)
        return data

    @staticmethod
    def from_json(data: Mapping[str, object]) -> tuple[dict[str, int], HistogramCounts]:
        """``(results, durations)`` for ``NodeEvents.add_invocations``; ValueError if malformed."""
        results = data.get("results")
        buckets = data.get("buckets")
        count, total = data.get("count"), data.get("sum")
        if (
            not isinstance(results, dict)
            or not all(isinstance(v, int) and v >= 0 for v in results.values())
            or not isinstance(buckets, list)
            or len(buckets) != len(INVOCATION_BUCKETS_S)
            or not all(isinstance(b, int) for b in buckets)
            or buckets != sorted(buckets)
            or not isinstance(count, int)
            or (buckets and count < buckets[-1])
            or not isinstance(total, int | float)
        ):
            raise ValueError("not an invocation tally (results, buckets, count, sum)")
        return {str(k): int(v) for k, v in results.items()}, HistogramCounts(
            INVOCATION_BUCKETS_S, tuple(buckets), count, float(total)
        )
