"""Capacity: how many times the FaaS load a cluster's idle resources serve, per policy.

The FaaS trace is scaled (``faas_scale``) until a policy's served share of invocations drops
below ``target`` (default 99 %): first doubling from ``start`` until every policy falls below
the target (at most ``max_doublings``), then, per policy, ``refine`` bisection steps (on a log
scale) between its last scale at or above the target and its first below. A policy's capacity
is the largest scale found at or above the target. Every replay's summary is kept, so served
share, recovered money, evictions and interference violations can be plotted against the
scale.

:func:`search_guided` needs far fewer replays on a large trace: each replay also says at
which scale its own offer, held as it was, would serve exactly the target
(:func:`capacity_estimate`, a few array passes). A replay at a higher scale sees more
evictions and so estimates lower; the capacity is where a replay's estimate equals its own
scale, so each estimate bounds it and is the next probe (see ``_Bracket``), until the last
scale at or above the target and the first below are within ``tolerance``. With
``run_many`` two probes go out at once (parallel processes): on RICC-2010-2 the first
replay and two pairs do it. :class:`ScaledReplay` runs them on one placed and modelled
trace (:func:`traces.replay.prepare` once, the policy loop per scale).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from traces.azure import FaasTrace
    from traces.demand import Demand
    from traces.jobs import JobTrace
    from traces.placement import Cluster
    from traces.replay import Prepared

log = logging.getLogger(__name__)
ESTIMATE = "capacity_estimate"
"""Summary key (see :class:`ScaledReplay`): the scale at which the replay's own offer would
serve exactly the target."""

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


def capacity_estimate(
    offered_cores: npt.NDArray[np.float64],
    offered_memory_bytes: npt.NDArray[np.float64],
    dem: Demand,
    target: float,
) -> float:
    """The factor by which ``dem`` could grow before this offer (per minute, held as it is)
    serves less than ``target`` of the invocations (the replay's fluid rule: a minute serves
    ``min(1, offered / demanded)`` of cores and of memory); ``inf`` if it never does."""
    inv = dem.invocations
    total = float(inv.sum())
    if total <= 0:
        return math.inf
    with np.errstate(divide="ignore", invalid="ignore"):
        # room per minute: the factor at which that minute stops being fully served
        room = np.minimum(
            np.where(dem.cores > 0, offered_cores / dem.cores, np.inf),
            np.where(dem.memory_bytes > 0, offered_memory_bytes / dem.memory_bytes, np.inf),
        )
    busy = inv > 0
    room, weight = room[busy], inv[busy] / total

    def served(factor: float) -> float:
        return float((weight * np.minimum(1.0, room / factor)).sum())

    lo, hi = 1e-9, 1.0
    while served(hi) >= target:
        lo, hi = hi, hi * 16.0
        if hi > 1e12:
            return math.inf
    if served(lo) < target:
        return 0.0
    for _ in range(60):  # bisection on a log scale: 60 halvings are far below a percent
        mid = math.sqrt(lo * hi)
        if served(mid) >= target:
            lo = mid
        else:
            hi = mid
        if hi / lo < 1.0001:
            break
    return lo


RunMany = Callable[[Sequence[float], str], list[dict[str, float]]]
"""Replays one policy at several FaaS scales (at once, where it can) and returns the
summaries in the same order."""


def search_guided(
    run_at: RunAt,
    policies: Sequence[str],
    target: float = 0.99,
    start: float = 1.0,
    tolerance: float = 0.05,
    max_runs: int = 12,
    run_many: RunMany | None = None,
) -> CapacityResult:
    """Each policy's capacity, to within ``tolerance`` (relative), from replays that report
    ``capacity_estimate`` in their summary (see the module docstring). Policies are searched
    one after the other (their scales differ). Without an estimate it bisects: doubling up
    to the first scale below the target, then halving the bracket on a log scale.

    With ``run_many`` (e.g. :meth:`ScaledReplay.many`, replays in parallel processes), after
    the first replay each round probes both sides of the estimate at once: when the estimate
    is right, one round brackets the capacity."""
    if not 0.0 < target <= 1.0:
        raise ValueError("target must be in (0, 1]")
    if tolerance <= 0:
        raise ValueError("tolerance must be > 0")
    result = CapacityResult(target, {n: [] for n in policies})
    step = math.sqrt(1.0 + tolerance)  # probes this far either side of an estimate bracket it
    for name in policies:
        search = _Bracket(target, tolerance, step)
        probes = [start]
        runs = 0
        while probes and runs < max_runs:
            probes = probes[: max_runs - runs]
            if len(probes) == 1 or run_many is None:
                summaries = [run_at(scale, [name])[name] for scale in probes[:1]]
                probes = probes[:1]
            else:
                summaries = run_many(probes, name)
            runs += len(probes)
            for scale, summary in zip(probes, summaries, strict=True):
                result.points[name].append((scale, summary))
                search.saw(scale, summary)
            probes = search.next_probes(2 if run_many is not None else 1)
        result.points[name].sort(key=lambda p: p[0])
        result.capacity[name] = search.ok if search.ok is not None else 0.0
    return result


class _Bracket:
    """What :func:`search_guided` knows of one policy: the largest scale served at or above
    the target (``ok``), the smallest below (``low``), and the capacity estimates of the
    replays at those two scales.

    A replay at a higher scale sees more evictions, so a smaller offer and a smaller
    estimate: the capacity ``c`` is where a replay's estimate equals its own scale. A replay
    below the target at ``s`` with estimate ``e < s`` thus puts ``c`` in ``[e, s]``, one at
    or above it with ``e > s`` puts ``c`` in ``[s, e]``: the estimates are the next probes.
    A round that does not halve the bracket (on a log scale) is followed by bisection."""

    def __init__(self, target: float, tolerance: float, step: float) -> None:
        self.target, self.tolerance, self.step = target, tolerance, step
        self.ok: float | None = None
        self.low: float | None = None
        self.ok_estimate: float | None = None  # the estimate of the replay at ``ok``
        self.low_estimate: float | None = None  # the estimate of the replay at ``low``
        self.width_before = math.inf  # log width of the bracket before the last round

    def saw(self, scale: float, summary: dict[str, float]) -> None:
        estimate: float | None = float(summary.get(ESTIMATE, math.nan))
        if not (estimate is not None and math.isfinite(estimate) and estimate > 0):
            estimate = None
        if served_share(summary) >= self.target:
            if self.ok is None or scale > self.ok:
                self.ok, self.ok_estimate = scale, estimate
        elif self.low is None or scale < self.low:
            self.low, self.low_estimate = scale, estimate

    def width(self) -> float:
        if self.ok is None or self.low is None:
            return math.inf
        return math.log(self.low / self.ok)

    def done(self) -> bool:
        ok, low = self.ok, self.low
        if ok is not None and low is not None:
            return low / ok <= (1.0 + self.tolerance) * (1 + 1e-9)
        return ok is None and low is not None and low < 1e-9  # not a sliver is served

    def inside(self, scale: float) -> bool:
        return (self.ok is None or scale > self.ok) and (self.low is None or scale < self.low)

    def next_probes(self, width: int) -> list[float]:
        """Up to ``width`` scales to replay next (none when the bracket is narrow enough)."""
        if self.done():
            return []
        now = self.width()
        stalled = math.isfinite(now) and now > self.width_before / 2
        self.width_before = now
        f, u, step = self.low_estimate, self.ok_estimate, self.step
        ordered: list[float] = []
        if not stalled:
            if width >= 2 and f is not None and u is not None and f < u:
                ordered = [f, u, f / step, u * step]
            elif width >= 2 and (u is not None or f is not None):
                m = math.sqrt(f * u) if f is not None and u is not None else (u or f or 0.0)
                ordered = [m / step, m * step, m] if u is not None else [f or m, m / step]
            else:  # one at a time: a little inside the estimates, the safe side first
                ordered = [x for x in (f and f / step, f, u and u * step, u) if x]
        probes: list[float] = []
        for scale in ordered:
            if self.inside(scale) and scale not in probes and len(probes) < width:
                probes.append(scale)
        if probes:
            return probes
        # no usable estimate: widen, or cut the bracket into equal parts on a log scale
        ok, low = self.ok, self.low
        if ok is None:
            assert low is not None
            return [low / 2.0**k for k in range(1, width + 1)]
        if low is None:
            return [ok * 2.0**k for k in range(1, width + 1)]
        return [ok * (low / ok) ** (k / (width + 1)) for k in range(1, width + 1)]


class ScaledReplay:
    """A :data:`RunAt` over one trace: placed and modelled once (:func:`traces.replay.prepare`),
    then the policies replayed at each FaaS scale asked for. Each summary gains
    ``capacity_estimate`` for ``target`` (:func:`capacity_estimate`, in scale units)."""

    def __init__(
        self,
        jobs: JobTrace,
        faas: FaasTrace,
        cluster: Cluster,
        target: float = 0.99,
        **options: Any,
    ) -> None:
        from policies.limits import Limits
        from traces.interference import InterferenceModel
        from traces.replay import prepare
        from traces.usage import UsageModel

        self.jobs, self.faas, self.cluster, self.target = jobs, faas, cluster, target
        self.options = dict(options)
        self.options.setdefault("limits", Limits())
        self.options.setdefault("usage", UsageModel())
        self.options.setdefault("interference", InterferenceModel())
        self.options.setdefault("seed", 0)
        self.prepared: Prepared = prepare(
            jobs,
            faas,
            cluster,
            self.options["limits"],
            self.options["usage"],
            self.options["interference"],
            self.options["seed"],
            1.0,
        )
        self.runs = 0

    def __call__(self, scale: float, policies: Sequence[str]) -> Summaries:
        from traces.replay import replay

        result = replay(
            self.jobs,
            self.faas,
            self.cluster,
            list(policies),
            faas_scale=scale,
            prepared=self.prepared,
            **self.options,
        )
        self.runs += 1
        out: Summaries = {}
        for name, series in result.policies.items():
            factor = capacity_estimate(
                series.offered_cores, series.offered_memory_bytes, result.demand, self.target
            )
            out[name] = {**series.summary, ESTIMATE: scale * factor}
        return out

    def many(self, scales: Sequence[float], policy: str) -> list[dict[str, float]]:
        """``policy``'s summaries at each scale, replayed in parallel forked processes (one
        per scale, at most one per CPU); each inherits the prepared trace, nothing is copied
        but the summaries coming back. CPU time of the children is theirs, not this
        process's (``resource.getrusage(RUSAGE_CHILDREN)`` counts it)."""
        import multiprocessing

        if len(scales) <= 1 or (os.cpu_count() or 1) < 2:
            return [self(scale, [policy])[policy] for scale in scales]
        global _FORKED
        _FORKED = self
        try:
            context = multiprocessing.get_context("fork")
            workers = min(len(scales), os.cpu_count() or 1)
            with context.Pool(workers) as pool:
                out = pool.map(_run_forked, [(scale, policy) for scale in scales])
        finally:
            _FORKED = None
        self.runs += len(scales)
        return out


_FORKED: ScaledReplay | None = None  # the ScaledReplay a forked worker replays


def _run_forked(job: tuple[float, str]) -> dict[str, float]:
    scale, policy = job
    assert _FORKED is not None
    return _FORKED(scale, [policy])[policy]


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
