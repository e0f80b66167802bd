"""``colocate replay --sweep`` (and what ``colocate tune`` shares with it): many replays,
spread over local processes, a Slurm job array or a Dask cluster.

Not a subcommand of its own: ``colocate replay`` adds these options and hands over when
``--sweep`` is given. The engine is :mod:`traces.sweep`; the runners :mod:`colocate.sweep`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from colocate.errors import ConfigError


def add_runner_arguments(parser: argparse.ArgumentParser) -> None:
    """Where trials run (shared by ``replay --sweep`` and ``tune``)."""
    g = parser.add_argument_group("where trials run")
    g.add_argument(
        "--runner",
        choices=["local", "slurm", "dask"],
        default="local",
        help="local processes (default), a Slurm job array, or a Dask cluster",
    )
    g.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="local: processes at a time; dask: workers of the LocalCluster started when no "
        "--dask-scheduler is given (default: the CPU count)",
    )
    g.add_argument(
        "--sweep-dir",
        metavar="DIR",
        default="colocate-sweep",
        help="slurm: a directory every node sees (shared file system) for trials and results "
        "(default ./colocate-sweep)",
    )
    g.add_argument("--partition", help="slurm: partition of the job array")
    g.add_argument(
        "--array-tasks",
        type=int,
        metavar="K",
        help="slurm: array tasks (each runs every K-th trial; default one per trial)",
    )
    g.add_argument("--mem", default="1500M", help="slurm: memory per array task (default 1500M)")
    g.add_argument("--time-limit", metavar="TIME", help="slurm: --time of each array task")
    g.add_argument(
        "--dask-scheduler", metavar="ADDR", help="dask: scheduler address, e.g. tcp://head:8786"
    )
    g.add_argument(
        "--timeout",
        type=float,
        default=3600.0,
        metavar="S",
        help="slurm: cancel the array after this long (default 3600)",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The sweep options of ``colocate replay``."""
    g = parser.add_argument_group("sweeps (--sweep)")
    g.add_argument(
        "--sweep",
        action="store_true",
        help="run one replay per combination of --policy, --seeds, --limit values and traces; "
        "print one row each",
    )
    g.add_argument(
        "--seeds",
        metavar="LIST",
        help="sweep: seeds, e.g. 0-7 or 0,3,5 (default: --seed)",
    )
    g.add_argument(
        "--limit",
        action="append",
        metavar="NAME=V1,V2",
        help="sweep: values of one [policy.limits] field (repeatable), e.g. max_function_share=0.25,0.5",
    )
    g.add_argument(
        "--sweep-jobs",
        action="append",
        metavar="PATH",
        help="sweep: another job trace (repeatable; default: --jobs or the bundled excerpt)",
    )
    add_runner_arguments(parser)


def parse_seeds(text: str | None, default: int) -> list[int]:
    if not text:
        return [default]
    seeds: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            seeds += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    except ValueError:
        raise ConfigError(f"bad seed list {text!r}; e.g. 0-7 or 0,3,5", key="--seeds") from None
    if not seeds:
        raise ConfigError(f"empty seed list {text!r}", key="--seeds")
    return seeds


def _value(text: str) -> Any:
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(text) if text.strip().lstrip("-").isdigit() else float(text)
    except ValueError:
        raise ConfigError(
            f"bad value {text!r}: expected a number or true/false", key="--limit"
        ) from None


def parse_limits(items: Sequence[str] | None) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for item in items or []:
        name, eq, values = item.partition("=")
        if not eq or not values:
            raise ConfigError(
                f"bad --limit {item!r}; e.g. max_function_share=0.25,0.5", key="--limit"
            )
        out[name.strip()] = [_value(v) for v in values.split(",")]
    return out


def resolve_traces(
    args: argparse.Namespace, job_paths: Sequence[str | None]
) -> list[dict[str, Any]]:
    """Each job trace with its formats and modelled cluster (as ``colocate replay`` infers it)."""
    from colocate.cli.replay import _cluster
    from traces import bundled
    from traces.formats import detect_faas_format, detect_jobs_format, read_jobs
    from traces.placement import Cluster

    faas_path = Path(args.faas) if args.faas else bundled.AZURE2019
    faas_format = args.faas_format or detect_faas_format(faas_path)
    out = []
    for raw in job_paths:
        path = Path(raw) if raw else bundled.HPC2N_EXCERPT
        fmt = args.jobs_format or detect_jobs_format(path)
        jobs = read_jobs(path, fmt)
        if len(jobs) == 0:
            raise ConfigError(f"{path}: no job in the trace ever ran; nothing to replay")
        cluster = _cluster(args, jobs, bundled_default=raw is None)
        assert isinstance(cluster, Cluster)
        out.append(
            {
                "jobs": str(path.resolve()),
                "jobs_format": fmt,
                "faas": str(faas_path.resolve()),
                "faas_format": faas_format,
                "nodes": cluster.nodes,
                "cores_per_node": cluster.cores_per_node,
                "memory_per_node_bytes": cluster.memory_per_node_bytes,
            }
        )
    return out


def base_overrides(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """Limits and prices that differ from the defaults (--config, price flags)."""
    from colocate.config import load_config

    limits: dict[str, Any] = {}
    prices: dict[str, Any] = {}
    if getattr(args, "config", None):
        config = load_config(args.config)
        limits = config.policy.limits.model_dump(exclude_defaults=True)
        prices = config.prices.model_dump(exclude_defaults=True)
    for key in ("currency", "core_hour", "gib_hour", "node_hour"):
        value = getattr(args, key, None)
        if value is not None:
            prices[key] = value
    if getattr(args, "node_hour", None) is not None:
        prices["charging"] = "node"
    return limits, prices


def make_runner(args: argparse.Namespace) -> Any:
    from colocate.sweep import DaskRunner, LocalRunner, SlurmArrayRunner

    workers = args.workers or os.cpu_count() or 1
    if args.runner == "slurm":
        return SlurmArrayRunner(
            args.sweep_dir,
            tasks=args.array_tasks,
            partition=args.partition,
            mem=args.mem,
            time_limit=args.time_limit,
            timeout_s=args.timeout,
        )
    if args.runner == "dask":
        return DaskRunner(args.dask_scheduler, workers=workers)
    return LocalRunner(workers)


def run(args: argparse.Namespace) -> int:
    """``colocate replay --sweep``."""
    from policies import POLICIES
    from traces.sweep import Grid, comparable, expand, limit_overrides, table

    if args.capacity:
        raise ConfigError("--capacity and --sweep do not combine; run them apart", key="--sweep")
    fixed, prices = base_overrides(args)
    swept = parse_limits(args.limit)
    limit_overrides({**fixed, **{k: v[0] for k, v in swept.items()}})
    jobs = args.sweep_jobs or [args.jobs]
    grid = Grid(
        traces=resolve_traces(args, jobs),
        policies=args.policy or list(POLICIES),
        seeds=parse_seeds(args.seeds, args.seed),
        limits=swept,
        fixed_limits=fixed,
        prices=prices,
        faas_scale=args.faas_scale,
    )
    trials = expand(grid)
    runner = make_runner(args)
    started = time.perf_counter()
    rows = runner.run(trials)
    wall = time.perf_counter() - started
    doc = {
        "runner": runner.name,
        "trials": len(trials),
        "wall_s": wall,
        "digest": _digest(comparable(rows)),
        "rows": rows,
    }
    if args.out:
        out = Path(args.out)
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / "sweep.json").write_text(json.dumps(doc, indent=2))
        except OSError as exc:
            raise ConfigError(f"cannot write the sweep: {exc.strerror}", path=args.out) from None
    if args.json:
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print(table(rows, prices.get("currency", "EUR")))
    print(
        f"{len(trials)} replays on {runner.name} in {wall:.1f} s; results digest {doc['digest']}"
        + (f"; wrote {Path(args.out) / 'sweep.json'}" if args.out else "")
    )
    return 0


def _digest(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:16]
