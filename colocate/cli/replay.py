"""``colocate replay``: job and FaaS traces through every policy; money wasted and recovered.

With no arguments it replays the bundled samples (an HPC2N excerpt and an Azure Functions
2019 slice, see ``traces/data/README.md``) through every registered policy.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from colocate.errors import ConfigError
from colocate.units import parse_size
from traces.interference import InterferenceModel
from traces.usage import UsageModel

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--jobs",
        metavar="PATH",
        help="job trace: SWF (.swf, .swf.gz), sacct --json or sacct -P output (default: bundled HPC2N excerpt)",
    )
    parser.add_argument(
        "--jobs-format", choices=["swf", "sacct-json", "sacct-pipe"], help="skip format detection"
    )
    parser.add_argument(
        "--faas",
        metavar="PATH",
        help="FaaS trace: Azure 2019 directory or invocations CSV, Azure 2021 records (default: bundled Azure 2019 slice)",
    )
    parser.add_argument(
        "--faas-format", choices=["azure2019", "azure2021"], help="skip format detection"
    )
    parser.add_argument(
        "--faas-scale",
        type=float,
        default=1.0,
        metavar="X",
        help="multiply FaaS demand (default 1)",
    )
    parser.add_argument(
        "--nodes",
        type=int,
        metavar="N",
        help="nodes (default: the trace header's MaxProcs / cores per node, else MaxNodes)",
    )
    parser.add_argument(
        "--cores-per-node",
        type=int,
        metavar="N",
        help="cores per node (default: MaxProcs / MaxNodes)",
    )
    parser.add_argument(
        "--memory-per-node",
        metavar="SIZE",
        help="memory per node, e.g. 64GiB (default: enough for the 99th percentile of requested memory per core, at least 2 GiB per core; a warning says what was assumed)",
    )
    parser.add_argument(
        "--policy",
        action="append",
        metavar="NAME",
        help="policy to replay (repeatable; default: all)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the usage and interference models (default 0)"
    )
    parser.add_argument(
        "--config",
        metavar="TOML",
        help="colocate config file: [policy.limits] and [prices] are used",
    )
    parser.add_argument(
        "--models",
        metavar="TOML",
        help="usage and interference model settings: [usage] and [interference] tables "
        "(fields of traces.usage.UsageModel and traces.interference.InterferenceModel)",
    )
    parser.add_argument(
        "--interference",
        metavar="TABLE.json",
        help="a site's interference table (`colocate calibrate --out`): its slowdown ranges "
        "replace the published IPDPS'24 ones, and the guard caps the function share by it",
    )
    parser.add_argument("--currency", help="currency of the prices (default EUR)")
    parser.add_argument(
        "--core-hour", type=float, metavar="PRICE", help="price of a core-hour (default 0.015)"
    )
    parser.add_argument(
        "--gib-hour", type=float, metavar="PRICE", help="price of a GiB-hour (default 0.0015)"
    )
    parser.add_argument(
        "--node-hour",
        type=float,
        metavar="PRICE",
        help="charge whole node-hours at this price instead",
    )
    parser.add_argument(
        "--capacity",
        action="store_true",
        help="also scale FaaS demand until each policy serves less than --capacity-target of "
        "the invocations; report.json gains the capacity per policy, --out a capacity.png",
    )
    parser.add_argument(
        "--capacity-target",
        type=float,
        default=0.99,
        metavar="SHARE",
        help="served share of invocations the capacity is measured at (default 0.99)",
    )
    parser.add_argument(
        "--from-agent-log",
        metavar="FILE",
        help="decide again every decision a live agent recorded (agent.record_file) and "
        "check each is reproduced exactly; --policy NAME replays them through another policy",
    )
    parser.add_argument(
        "--out", metavar="DIR", help="write report.md, report.json and PNG plots here"
    )
    parser.add_argument(
        "--json", action="store_true", help="print report.json to stdout instead of the table"
    )
    from colocate.cli import sweep

    sweep.add_arguments(parser)


def _cluster(args: argparse.Namespace, jobs: object, bundled_default: bool) -> object:
    from traces import bundled
    from traces.jobs import JobTrace
    from traces.placement import Cluster

    assert isinstance(jobs, JobTrace)
    nodes = args.nodes or jobs.max_nodes
    if not nodes:
        raise ConfigError(
            f"{jobs.path}: the trace does not say how many nodes the cluster has; pass --nodes N",
            key="--nodes",
        )
    cpn = args.cores_per_node
    if not cpn:
        if bundled_default:
            cpn = bundled.HPC2N_CORES_PER_NODE
        elif jobs.max_procs and jobs.max_nodes:
            cpn = max(1, jobs.max_procs // jobs.max_nodes)
        elif (jobs.nodes > 0).any():
            with_nodes = jobs.nodes > 0
            cpn = int(np.ceil(np.max(jobs.cores[with_nodes] / jobs.nodes[with_nodes])))
        else:
            raise ConfigError(
                f"{jobs.path}: the trace does not say how many cores a node has; pass --cores-per-node N",
                key="--cores-per-node",
            )
    if args.nodes:
        nodes = args.nodes
    elif bundled_default:
        nodes = bundled.HPC2N_NODES
    elif jobs.max_procs:
        nodes = max(1, jobs.max_procs // cpn)
    else:
        nodes = jobs.max_nodes
    if not nodes:
        raise ConfigError(
            f"{jobs.path}: the trace does not say how many nodes the cluster has; pass --nodes N",
            key="--nodes",
        )
    if args.memory_per_node:
        memory = parse_size(args.memory_per_node)
    elif bundled_default:
        memory = bundled.HPC2N_MEMORY_PER_NODE
    elif jobs.memory_per_node_bytes:
        memory = jobs.memory_per_node_bytes
    else:
        per_core = jobs.memory_alloc_bytes / jobs.cores
        known = per_core[np.isfinite(per_core)]
        memory = (
            int(max(float(np.percentile(known, 99)) * cpn, 2 * 1024**3 * cpn))
            if known.size
            else 2 * 1024**3 * cpn
        )
        log.warning(
            "node memory not given: assuming %.1f GiB per node (pass --memory-per-node)",
            memory / 1024**3,
        )
    if nodes <= 0 or cpn <= 0 or memory <= 0:
        raise ConfigError("--nodes, --cores-per-node and --memory-per-node must be positive")
    return Cluster(nodes=int(nodes), cores_per_node=int(cpn), memory_per_node_bytes=int(memory))


def _models(path: str | None) -> tuple[UsageModel, InterferenceModel]:
    """The usage and interference models, defaults overridden by a TOML file's tables."""
    if not path:
        return UsageModel(), InterferenceModel()
    try:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", path=path) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not TOML: {exc}", path=path) from None
    unknown = sorted(set(doc) - {"usage", "interference"})
    if unknown:
        raise ConfigError(
            f"unknown table {unknown[0]!r}; expected [usage] and [interference]",
            path=path,
            key=unknown[0],
        )
    models: dict[str, Any] = {}
    for table, model in (("usage", UsageModel), ("interference", InterferenceModel)):
        try:
            models[table] = model(**doc.get(table, {}))
        except ValidationError as exc:
            first = exc.errors()[0]
            key = ".".join([table, *(str(p) for p in first["loc"])])
            raise ConfigError(first["msg"], path=path, key=key) from None
    return models["usage"], models["interference"]


def run(args: argparse.Namespace) -> int:
    from colocate.config import load_config
    from policies import POLICIES
    from policies.limits import Limits
    from policies.prices import Prices
    from traces import bundled
    from traces.formats import detect_faas_format, detect_jobs_format, read_faas, read_jobs
    from traces.placement import Cluster
    from traces.replay import replay
    from traces.report import comparison_table, report_dict, write_report

    if args.sweep:
        from colocate.cli import sweep

        return sweep.run(args)
    if args.from_agent_log:
        return _from_agent_log(args)
    names = args.policy or list(POLICIES)
    unknown = [n for n in names if n not in POLICIES]
    if unknown:
        raise ConfigError(
            f"unknown policy {', '.join(unknown)}; known: {', '.join(POLICIES)}", key="--policy"
        )
    if args.faas_scale < 0:
        raise ConfigError("--faas-scale must be >= 0", key="--faas-scale")
    if not 0 < args.capacity_target <= 1:
        raise ConfigError(
            "--capacity-target must be a share in (0, 1], e.g. 0.99", key="--capacity-target"
        )
    limits, prices = Limits(), Prices()
    if args.config:
        config = load_config(args.config)
        limits, prices = config.policy.limits, config.prices
    overrides = {
        k: v
        for k, v in (
            ("currency", args.currency),
            ("core_hour", args.core_hour),
            ("gib_hour", args.gib_hour),
            ("node_hour", args.node_hour),
        )
        if v is not None
    }
    if args.node_hour is not None:
        overrides["charging"] = "node"
    if overrides:
        try:
            prices = Prices(**{**prices.model_dump(), **overrides})
        except ValueError as exc:
            raise ConfigError(f"bad price: {exc}".splitlines()[0]) from None

    jobs_path = Path(args.jobs) if args.jobs else bundled.HPC2N_EXCERPT
    faas_path = Path(args.faas) if args.faas else bundled.AZURE2019
    jobs_format = args.jobs_format or detect_jobs_format(jobs_path)
    faas_format = args.faas_format or detect_faas_format(faas_path)
    jobs = read_jobs(jobs_path, jobs_format)
    faas = read_faas(faas_path, faas_format)
    if len(jobs) == 0:
        raise ConfigError(f"{jobs_path}: no job in the trace ever ran; nothing to replay")
    cluster = _cluster(args, jobs, bundled_default=not args.jobs)
    assert isinstance(cluster, Cluster)
    usage, interference = _models(args.models)
    if args.interference:  # a site's measured table
        from colocate.config import load_interference_table
        from policies.interference import guarded_limits

        table = load_interference_table(args.interference)
        interference = InterferenceModel.from_table(table, interference.memory_bound_fraction)
        limits = guarded_limits(limits, table)
    progress = not args.json and sys.stderr.isatty()
    result = replay(
        jobs,
        faas,
        cluster,
        names,
        limits=limits,
        prices=prices,
        usage=usage,
        interference=interference,
        seed=args.seed,
        faas_scale=args.faas_scale,
        progress=progress,
    )
    report = report_dict(
        result,
        jobs_path=str(jobs_path),
        jobs_format=jobs_format,
        faas_path=str(faas_path),
        faas_format=faas_format,
        prices=prices,
        limits=limits,
        usage=usage,
        interference=interference,
    )
    capacity = None
    if args.capacity:
        from traces.capacity import ScaledReplay, search_guided

        # placed and modelled once, replayed at each scale; each replay estimates where its
        # offer stops serving the target, so a few replays (pairs in parallel) bracket it
        scaled = ScaledReplay(
            jobs,
            faas,
            cluster,
            target=args.capacity_target,
            limits=limits,
            prices=prices,
            usage=usage,
            interference=interference,
            seed=args.seed,
        )
        capacity = search_guided(scaled, names, target=args.capacity_target, run_many=scaled.many)
        report["capacity"] = capacity.to_dict()
        for name, scale in capacity.capacity.items():
            report["policies"][name]["capacity_faas_scale"] = scale
    if args.out:
        try:
            written = write_report(result, report, Path(args.out))
            if capacity is not None:
                from traces.capacity import plot

                written.append(plot(capacity, Path(args.out)))
            # the same metric names as the live agent, for `colocate metrics openmetrics`
            from colocate.metrics.replay_series import save_replay_series

            written.append(save_replay_series(result, prices, Path(args.out)))
        except OSError as exc:
            raise ConfigError(f"cannot write the report: {exc.strerror}", path=args.out) from None
    if args.json:
        json.dump(report, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
        return 0
    c = report["cluster"]
    print(
        f"{report['jobs_trace']['jobs_placed']} jobs over {report['jobs_trace']['span_days']:.1f} days on "
        f"{c['nodes']} nodes x {c['cores_per_node']} cores ({c['memory_per_node_bytes'] / 1024**3:.1f} GiB), "
        f"FaaS demand {report['faas_trace']['mean_demand_cores']:.1f} cores on average"
    )
    print(comparison_table(report))
    for line in report["differences"]["text"]:
        print(f"- {line}")
    if capacity is not None:
        for name, scale in capacity.capacity.items():
            print(
                f"capacity {name}: {scale:.3g}x the FaaS load served at >= "
                f"{args.capacity_target:.0%} ({len(capacity.points[name])} replays)"
            )
    if args.out:
        print("wrote " + ", ".join(str(p) for p in written))
    else:
        print("(--out DIR writes report.md, report.json and plots)")
    return 0


def _from_agent_log(args: argparse.Namespace) -> int:
    """``--from-agent-log FILE``: 0 when every recorded decision is reproduced, else 1."""
    from slurm_plugin.agent.recorder import replay_log

    path = args.from_agent_log
    if args.policy and len(args.policy) > 1:
        raise ConfigError("--from-agent-log replays through one policy", key="--policy")
    try:
        result = replay_log(path, args.policy[0] if args.policy else None)
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", path=path) from None
    except ValueError as exc:
        raise ConfigError(str(exc).splitlines()[0]) from None
    if args.json:
        json.dump(result.to_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(
            f"{path}: {result.decisions} decisions ({result.evictions} evictions) replayed "
            f"through {result.policy}: {result.identical} identical, "
            f"{result.decisions - result.identical} differ"
        )
        for line in result.mismatches:
            print(f"  {line}")
    return 0 if result.identical == result.decisions else 1
