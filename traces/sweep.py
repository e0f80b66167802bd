"""Replay sweeps: many replays (policy x seed x limits x trace), one result row each.

This module is the engine only: what a trial is, how one runs, how rows are compared. It
imports no batch system or cluster framework; the runners that spread trials over local
processes, a Slurm job array or a Dask cluster live in :mod:`colocate.sweep` and all call
:func:`run_trial` on the JSON form of a :class:`Trial`, so a row is the same whichever ran it.

A trial is deterministic: the replay's usage and interference models draw from the trial's
seed only, so two runs of one trial give bit-identical figures. Only the timing fields
(``TIMING_FIELDS``) differ between runs and are left out of comparisons.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from colocate.errors import ConfigError
from policies import POLICIES
from policies.limits import Limits
from policies.prices import Prices

# summary fields that measure the machine, not the replay: never compared
TIMING_FIELDS = frozenset({"replay_seconds", "trial_wall_s"})


@dataclass(frozen=True, slots=True)
class Trial:
    """One replay: a policy on one job trace, FaaS trace and modelled cluster.

    ``limits`` and ``prices`` are overrides of :class:`~policies.limits.Limits` and
    :class:`~policies.prices.Prices` fields (sorted name/value pairs, so trials hash and
    print the same everywhere). Paths are absolute; the cluster is already resolved (the CLI
    does that once per trace).
    """

    policy: str
    seed: int
    jobs: str
    jobs_format: str
    faas: str
    faas_format: str
    nodes: int
    cores_per_node: int
    memory_per_node_bytes: int
    limits: tuple[tuple[str, Any], ...] = ()
    prices: tuple[tuple[str, Any], ...] = ()
    faas_scale: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["limits"] = dict(self.limits)
        d["prices"] = dict(self.prices)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Trial:
        d = dict(d)
        d["limits"] = tuple(sorted(dict(d.get("limits", {})).items()))
        d["prices"] = tuple(sorted(dict(d.get("prices", {})).items()))
        return cls(**d)

    def label(self) -> str:
        """A short human name: trace, policy, seed and the limits that differ from defaults."""
        lim = " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.limits)
        name = Path(self.jobs).name
        for suffix in (".gz", ".swf", ".json", ".txt", ".csv"):
            name = name.removesuffix(suffix)
        return f"{name} {self.policy} seed={self.seed}" + (f" {lim}" if lim else "")


@dataclass(frozen=True, slots=True)
class Grid:
    """What a sweep varies; every combination is one trial (traces outermost)."""

    traces: Sequence[
        Mapping[str, Any]
    ]  # each: jobs, jobs_format, faas, faas_format, cluster fields
    policies: Sequence[str]
    seeds: Sequence[int]
    limits: Mapping[str, Sequence[Any]] = field(default_factory=dict)
    fixed_limits: Mapping[str, Any] = field(default_factory=dict)
    prices: Mapping[str, Any] = field(default_factory=dict)
    faas_scale: float = 1.0


def limit_overrides(values: Mapping[str, Any], *, where: str = "--limit") -> dict[str, Any]:
    """Check limit overrides against :class:`Limits` (one clear error naming the bad one)."""
    known = Limits.model_fields
    for name in values:
        if name not in known:
            raise ConfigError(
                f"unknown limit {name!r}; known: {', '.join(sorted(known))}", key=where
            )
    try:
        Limits(**values)
    except ValueError as exc:
        first = str(exc).splitlines()
        raise ConfigError(f"bad limit value: {' '.join(first[1:3]).strip()}", key=where) from None
    return dict(values)


def expand(grid: Grid) -> list[Trial]:
    """Every trial of ``grid``, in a fixed order (trace, policy, seed, then limit values)."""
    unknown = [p for p in grid.policies if p not in POLICIES]
    if unknown:
        raise ConfigError(
            f"unknown policy {', '.join(unknown)}; known: {', '.join(POLICIES)}", key="--policy"
        )
    names = sorted(grid.limits)
    combos = list(itertools.product(*(grid.limits[n] for n in names)))
    trials = []
    for trace, policy, seed, combo in itertools.product(
        grid.traces, grid.policies, grid.seeds, combos
    ):
        lim = {**grid.fixed_limits, **dict(zip(names, combo, strict=True))}
        limit_overrides(lim)
        trials.append(
            Trial(
                policy=policy,
                seed=int(seed),
                jobs=str(trace["jobs"]),
                jobs_format=str(trace["jobs_format"]),
                faas=str(trace["faas"]),
                faas_format=str(trace["faas_format"]),
                nodes=int(trace["nodes"]),
                cores_per_node=int(trace["cores_per_node"]),
                memory_per_node_bytes=int(trace["memory_per_node_bytes"]),
                limits=tuple(sorted(lim.items())),
                prices=tuple(sorted(grid.prices.items())),
                faas_scale=float(grid.faas_scale),
            )
        )
    return trials


@lru_cache(maxsize=8)
def _jobs(path: str, fmt: str) -> Any:
    from traces.formats import read_jobs

    return read_jobs(path, fmt)


@lru_cache(maxsize=8)
def _faas(path: str, fmt: str) -> Any:
    from traces.formats import read_faas

    return read_faas(path, fmt)


@lru_cache(maxsize=8)
def _job_node_hours(path: str, fmt: str, nodes: int, cpn: int, mem: int) -> float:
    """Hours of job time summed over the nodes jobs ran on (the violation share's base)."""
    from traces.placement import Cluster, job_memory, place

    cluster = Cluster(nodes=nodes, cores_per_node=cpn, memory_per_node_bytes=mem)
    jobs = _jobs(path, fmt)
    placement = place(jobs, cluster, job_memory(jobs, cluster))
    return float((placement.end - placement.start).sum()) / 60.0


def run_trial(trial: Trial | Mapping[str, Any]) -> dict[str, Any]:
    """Replay one trial; its row: the trial, the replay's summary and derived rates.

    Derived figures (what ``colocate tune`` constrains):
    ``violation_share``: job-node time above ``limits.slowdown_budget`` over all job-node
    time; ``evictions_per_recovered_core_hour``: how often functions lose their cores per
    core-hour of work they got.
    """
    from traces.placement import Cluster
    from traces.replay import replay

    t = trial if isinstance(trial, Trial) else Trial.from_dict(trial)
    started = time.perf_counter()
    cluster = Cluster(
        nodes=t.nodes,
        cores_per_node=t.cores_per_node,
        memory_per_node_bytes=t.memory_per_node_bytes,
    )
    result = replay(
        _jobs(t.jobs, t.jobs_format),
        _faas(t.faas, t.faas_format),
        cluster,
        [t.policy],
        limits=Limits(**dict(t.limits)),
        prices=Prices(**dict(t.prices)),
        seed=t.seed,
        faas_scale=t.faas_scale,
    )
    summary = dict(result.policies[t.policy].summary)
    hours = _job_node_hours(
        t.jobs, t.jobs_format, t.nodes, t.cores_per_node, t.memory_per_node_bytes
    )
    summary["job_node_hours"] = hours
    summary["violation_share"] = summary["interference_violation_hours"] / hours if hours else 0.0
    rec = summary["recovered_core_hours"]
    summary["evictions_per_recovered_core_hour"] = summary["evictions"] / rec if rec else 0.0
    summary["trial_wall_s"] = time.perf_counter() - started
    return {"trial": t.to_dict(), "summary": summary}


def run_trials(trials: Iterable[Trial | Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Run trials one after another in this process (the sequential baseline)."""
    return [run_trial(t) for t in trials]


def comparable(rows: Sequence[Mapping[str, Any]]) -> str:
    """Canonical JSON of rows without timing fields: equal strings, equal results."""
    out = [
        {
            "trial": r["trial"],
            "summary": {k: v for k, v in r["summary"].items() if k not in TIMING_FIELDS},
        }
        for r in rows
    ]
    return json.dumps(out, sort_keys=True)


def table(rows: Sequence[Mapping[str, Any]], currency: str = "") -> str:
    """One line per trial: recovered money, evictions, violation share."""
    lines = [
        f"{'trial':<64} {'recovered ' + currency:>14} {'evictions':>10} {'evict/core-h':>12} "
        f"{'violation %':>11}"
    ]
    for r in rows:
        s = r["summary"]
        lines.append(
            f"{Trial.from_dict(r['trial']).label():<64.64} {s['recovered_cost']:>14,.2f} "
            f"{s['evictions']:>10,.0f} {s['evictions_per_recovered_core_hour']:>12.3f} "
            f"{100 * s['violation_share']:>10.2f}%"
        )
    return "\n".join(lines)
