"""Capacity: how many times the FaaS load a cluster's idle resources serve, per policy.

The FaaS trace is scaled (``faas_scale``) until a policy's served share of invocations drops
below ``target`` (default 99 %): first doubling from ``start`` until every policy falls below
the target (at most ``max_doublings``), then, per policy, ``refine`` bisection steps (on a log
scale) between its last scale at or above the target and its first below. A policy's capacity
is the largest scale found at or above the target. Every replay's summary is kept, so served
share, recovered money, evictions and interference violations can be plotted against the
scale.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

Summaries = dict[str, dict[str, float]]
RunAt = Callable[[float, Sequence[str]], Summaries]
"""Replays the given policies at a FaaS scale and returns each one's summary."""


def served_share(summary: dict[str, float]) -> float:
    """Invocations served / invocations demanded (1.0 when nothing was demanded)."""
    total = summary["faas_invocations_total"]
    return summary["faas_invocations_served"] / total if total > 0 else 1.0


@dataclass(slots=True)
class CapacityResult:
    """``points[policy]``: (scale, summary) pairs in scale order; ``capacity[policy]``: the
    largest scale served at or above ``target`` (0.0 when even ``start`` was not)."""

    target: float
    points: dict[str, list[tuple[float, dict[str, float]]]] = field(default_factory=dict)
    capacity: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "target_served_share": self.target,
            "capacity_faas_scale": dict(self.capacity),
            "curves": {
                name: [
                    {
                        "faas_scale": scale,
                        "served_share": served_share(s),
                        "recovered_cost": s["recovered_cost"],
                        "evictions": s["evictions"],
                        "interference_violation_hours": s["interference_violation_hours"],
                    }
                    for scale, s in pts
                ]
                for name, pts in self.points.items()
            },
        }


def search(
    run_at: RunAt,
    policies: Sequence[str],
    target: float = 0.99,
    start: float = 1.0,
    max_doublings: int = 24,
    refine: int = 4,
) -> CapacityResult:
    """Find each policy's capacity (see the module docstring); ``run_at`` does the replays."""
    if not 0.0 < target <= 1.0:
        raise ValueError("target must be in (0, 1]")
    result = CapacityResult(target, {n: [] for n in policies})
    ok: dict[str, float] = {}
    low: dict[str, float] = {}
    scale = start
    for _ in range(max_doublings + 1):
        open_ = [n for n in policies if n not in low]
        if not open_:
            break
        for name, summary in run_at(scale, open_).items():
            result.points[name].append((scale, summary))
            if served_share(summary) >= target:
                ok[name] = scale
            else:
                low[name] = scale
        scale *= 2.0
    for name in policies:
        if name not in low or name not in ok:
            continue
        lo, hi = ok[name], low[name]
        for _ in range(refine):
            mid = math.sqrt(lo * hi)
            summary = run_at(mid, [name])[name]
            result.points[name].append((mid, summary))
            if served_share(summary) >= target:
                lo = mid
            else:
                hi = mid
        ok[name] = lo
    for name in policies:
        result.points[name].sort(key=lambda p: p[0])
        result.capacity[name] = ok.get(name, 0.0)
    return result


def plot(result: CapacityResult, out: Path) -> Path:
    """capacity.png: served share, recovered money, evictions and violation hours vs scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    panels: tuple[tuple[str, Callable[[dict[str, float]], float]], ...] = (
        ("served share", served_share),
        ("recovered money", lambda s: s["recovered_cost"]),
        ("evictions", lambda s: s["evictions"]),
        ("interference violation hours", lambda s: s["interference_violation_hours"]),
    )
    for ax, (title, value) in zip(axes.flat, panels, strict=True):
        for name, pts in result.points.items():
            ax.plot([p[0] for p in pts], [value(p[1]) for p in pts], marker="o", ms=3, label=name)
        ax.set_xscale("log")
        ax.set_title(title)
        ax.set_xlabel("FaaS demand scale")
    axes.flat[0].axhline(result.target, color="0.5", ls=":", lw=0.8)
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    path = out / "capacity.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
