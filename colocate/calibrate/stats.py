"""From the kernels' iteration timings to slowdowns with confidence intervals (pure).

A repeat gives one slowdown per function: the median iteration time of the kernel while the
function ran over its median in the idle window of the same repeat (medians: one iteration
hit by a page fault or a daemon waking does not move them). Over repeats the slowdown is the
geometric mean of the ratios with a 95 % Student t-interval on their logarithms: ratios are
multiplicative, and the interval then stays above 0 however few repeats there are.

Wall time is what the job sees. CPU time (the kernel thread's own) leaves out the time it
waited for its core while other processes ran there: on a node shared with other load (a
dev machine) the function pushes that load onto the job's core, which a dedicated HPC node
would not see; the CPU-time ratio keeps only the slowdown through caches and memory.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

# Student t quantile 0.975 for 1..30 degrees of freedom; 1.96 beyond.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t975(df: int) -> float:
    """The 97.5 % quantile of Student's t with ``df`` >= 1 degrees of freedom."""
    if df < 1:
        raise ValueError("a t-interval needs at least 2 samples")
    return _T975[df - 1] if df <= len(_T975) else 1.96


Iteration = tuple[float, float, float]
"""A kernel iteration: start and end (node clock, s), CPU seconds its thread ran."""


def in_window(
    iterations: Sequence[Iteration], start: float, end: float, cpu: bool = False
) -> list[float]:
    """Wall (or, with ``cpu``, CPU) seconds of the iterations entirely within [start, end]."""
    return [(c if cpu else b - a) for a, b, c in iterations if a >= start and b <= end]


def window_ratio(
    iterations: Sequence[Iteration],
    with_window: tuple[float, float],
    alone_window: tuple[float, float],
    cpu: bool = False,
) -> float | None:
    """Median iteration time in ``with_window`` over the median in ``alone_window``; None
    when either window holds no whole iteration."""
    with_ = in_window(iterations, *with_window, cpu=cpu)
    alone = in_window(iterations, *alone_window, cpu=cpu)
    if not with_ or not alone:
        return None
    base = statistics.median(alone)
    return statistics.median(with_) / base if base > 0 else None


def summarize(ratios: Sequence[float]) -> tuple[float, float, float, int]:
    """(geometric mean, ci_low, ci_high, n) of slowdown ratios; with one ratio the interval
    is that ratio alone."""
    if not ratios or any(r <= 0 for r in ratios):
        raise ValueError("slowdown ratios must be > 0 and at least one")
    logs = [math.log(r) for r in ratios]
    mean = statistics.fmean(logs)
    if len(logs) < 2:
        return math.exp(mean), math.exp(mean), math.exp(mean), 1
    half = t975(len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half), len(logs)
