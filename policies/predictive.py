"""``predictive``: size each job from windowed percentiles and trends of its usage history.

Follows Autopilot's vertical scaling: a job's limit is a moving-window percentile of its
usage (``limits.percentile``, default p95, over ``limits.history_window_s``, default 300 s),
so a rare spike no longer holds cores back the way ``headroom``'s window maximum does.
Memory adds a linear trend over the window (Wald's two-group slope) extrapolated
``limits.trend_horizon_s`` ahead (default 60 s), so a growing job stops lending memory
before it reaches it.

Margins and floors, the same as ``headroom`` (its engine): the percentile's whole cores
(``core_noise`` forgiven, ``core_margin`` added), idle cores lent first where per-core shares
are known, leased cores kept until growth is confirmed, never fewer cores than the latest
sample uses; memory is never offered below
``observed peak + max(memory_margin_bytes, memory_margin_ratio * allocation)``. A memory
percentile cannot exceed the peak, so on memory this policy differs from ``headroom`` only
by the trend: it lends less to growing jobs, never more.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from operator import attrgetter

from policies.headroom import harvest
from policies.limits import Limits
from policies.model import Decision, JobView, NodeView, UsageSample

_TIME = attrgetter("t")
_MEMORY_USED = attrgetter("memory_used_bytes")


def percentile(values: Iterable[float], p: float) -> float:
    """The ``p``-th percentile (0..100) with linear interpolation (numpy's default); 0 if empty."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    k = (len(ordered) - 1) * p / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def memory_trend(samples: tuple[UsageSample, ...]) -> float:
    """Memory growth over the samples, bytes per second (0 with fewer than 2 instants).

    Wald's two-group slope: the line through the mean (time, memory) of the older half and
    of the newer half. Robust to a single outlier like least squares is not, and it needs
    only C-level sums (the replay calls this a million times).
    """
    n = len(samples)
    if n < 2:
        return 0.0
    half = n // 2
    older, newer = samples[:half], samples[n - half :]
    dt: float = (sum(map(_TIME, newer)) - sum(map(_TIME, older))) / half
    if dt <= 0:
        return 0.0
    dm: float = sum(map(_MEMORY_USED, newer)) - sum(map(_MEMORY_USED, older))
    return dm / half / dt


def size_by_percentile(
    job: JobView, recent: tuple[UsageSample, ...], limits: Limits, now: float
) -> tuple[float, int]:
    """(cores, bytes) a job is expected to need: cores at the window percentile; memory at
    its trend forecast (a memory percentile never exceeds the peak the engine keeps anyway).
    """
    cores = percentile((s.cores_used + s.cores_waiting for s in recent), limits.percentile)
    slope = memory_trend(recent)
    if slope <= 0:
        return cores, 0
    last = recent[-1]
    ahead = max(0.0, now - last.t) + limits.trend_horizon_s
    return cores, math.ceil(last.memory_used_bytes + slope * ahead)


class PredictivePolicy:
    """Autopilot-style sizing: p-th percentile of recent usage plus a memory trend.

    Cores: ``allocated - ceil(max(p95 of cores_used, latest cores_used) + core_margin - core_noise)``.
    Memory: ``allocation - max(observed peak, trend forecast) - margin``.
    """

    name = "predictive"

    def decide(
        self, node: NodeView, limits: Limits, now: float, state: object | None = None
    ) -> Decision:
        return harvest(node, limits, now, size_by_percentile)
