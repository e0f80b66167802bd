"""``predictive``: size each job from windowed percentiles and trends of its usage history.

Follows Autopilot's vertical scaling: a job's limit is a moving-window percentile of its
usage (``limits.percentile``, default p95, over ``limits.history_window_s``, default 300 s),
so a rare spike no longer holds cores back the way ``headroom``'s window maximum does.
Memory adds a linear trend (least squares over the window) extrapolated
``limits.trend_horizon_s`` ahead (default 60 s), so a growing job stops lending memory
before it reaches it.

Margins and floors, the same as ``headroom``: ``limits.core_margin`` cores on top of the
percentile and never fewer cores than the latest sample uses; memory is never offered below
``observed peak + max(memory_margin_bytes, memory_margin_ratio * allocation)``. A memory
percentile cannot exceed the peak, so on memory this policy differs from ``headroom`` only
by the trend: it lends less to growing jobs, never more.
"""

from __future__ import annotations

import math

from policies.headroom import harvest
from policies.limits import Limits
from policies.model import Decision, JobView, NodeView, UsageSample


def percentile(values: list[float], p: float) -> float:
    """The ``p``-th percentile (0..100) with linear interpolation (numpy's default); 0 if empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def memory_trend(samples: tuple[UsageSample, ...]) -> float:
    """Least-squares slope of memory used over time, bytes per second (0 with < 2 instants)."""
    n = len(samples)
    if n < 2:
        return 0.0
    mean_t = sum(s.t for s in samples) / n
    mean_m = sum(s.memory_used_bytes for s in samples) / n
    var = 0.0
    cov = 0.0
    for s in samples:
        dt = s.t - mean_t
        var += dt * dt
        cov += dt * (s.memory_used_bytes - mean_m)
    return cov / var if var > 0 else 0.0


def size_by_percentile(
    job: JobView, recent: tuple[UsageSample, ...], limits: Limits, now: float
) -> tuple[float, int]:
    """(cores, bytes) a job is expected to need: window percentile, memory plus its trend."""
    cores = percentile([s.cores_used for s in recent], limits.percentile)
    memory = percentile([float(s.memory_used_bytes) for s in recent], limits.percentile)
    slope = memory_trend(recent)
    if slope > 0:
        ahead = max(0.0, now - recent[-1].t) + limits.trend_horizon_s
        memory = max(memory, recent[-1].memory_used_bytes + slope * ahead)
    return cores, math.ceil(memory)


class PredictivePolicy:
    """Autopilot-style sizing: p-th percentile of recent usage plus a memory trend.

    Cores: ``allocated - ceil(max(p95 of cores_used, latest cores_used) + core_margin)``.
    Memory: ``allocation - max(observed peak, p95, trend forecast) - margin``.
    """

    name = "predictive"

    def decide(
        self, node: NodeView, limits: Limits, now: float, state: object | None = None
    ) -> Decision:
        return harvest(node, limits, now, size_by_percentile)
