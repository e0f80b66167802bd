"""``colocate metrics``: replay results as OpenMetrics, and the dashboard's PromQL queries.

Examples::

    colocate metrics openmetrics --replay-out out/ --end-at now > replay.om
    promtool tsdb create-blocks-from openmetrics replay.om /var/lib/prometheus/metrics2
    colocate metrics queries --json
    colocate metrics serve --node n1 --listen 0.0.0.0:9642   # waste only, no harvesting
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from colocate.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    om = sub.add_parser(
        "openmetrics",
        help="write a replay's time series as OpenMetrics text (for promtool tsdb create-blocks-from)",
        description="Write a replay's per-interval series in the live metric names, with timestamps.",
    )
    source = om.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--replay-out", metavar="DIR", help="the --out directory of colocate replay"
    )
    source.add_argument(
        "--from-replay", metavar="FILE", help="a replay series file (colocate-replay-series/1 JSON)"
    )
    om.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")
    om.add_argument(
        "--node", help="node label for the replayed series (default: the file's, else 'replay')"
    )
    om.add_argument(
        "--end-at",
        metavar="now|EPOCH",
        help="shift all timestamps so the replay ends at this time (keeps old traces inside retention)",
    )
    om.add_argument("--json", action="store_true", help="print a JSON summary on stderr")
    sv = sub.add_parser(
        "serve",
        help="serve this node's utilization and wasted money on /metrics, without harvesting",
        description="Sample this node with the monitor and serve the colocate_* metrics (no offers, "
        "no leases): what a site wastes, before it deploys the agent.",
    )
    sv.add_argument("--node", help="Slurm node name (default: this host's short name)")
    sv.add_argument("--listen", help="host:port (default: [agent] metrics_listen of the config)")
    sv.add_argument(
        "--config", metavar="FILE", help="colocate TOML config (prices, listen address)"
    )
    sv.add_argument(
        "--interval", type=float, default=1.0, help="seconds between samples (default 1)"
    )
    sv.add_argument(
        "--count", type=int, default=0, help="stop after this many samples (0: until ^C)"
    )
    sv.add_argument("--slurm", choices=["cli", "pyslurm"], default="cli", help="Slurm backend")
    sv.add_argument(
        "--json", action="store_true", help="print the bound address as JSON once serving"
    )
    from colocate.cli.monitor import add_choices_argument

    add_choices_argument(sv)
    q = sub.add_parser("queries", help="list every PromQL query of the Grafana dashboard")
    q.add_argument(
        "--dashboard", metavar="FILE", help="dashboard JSON (default: deploy/grafana/colocate.json)"
    )
    q.add_argument(
        "--expand", action="store_true", help="expand $variables (All) as the tests run them"
    )
    q.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    if args.action == "openmetrics":
        return _openmetrics(args)
    if args.action == "serve":
        return _serve(args)
    try:
        return _queries(args)
    except BrokenPipeError:  # `colocate metrics queries | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _serve(args: argparse.Namespace) -> int:
    import socket

    from colocate.cli.monitor import JobChoices
    from colocate.config import load_config
    from colocate.metrics.agent_metrics import AgentMetrics
    from monitors.sampler import Sampler, default_source
    from policies.model import Offer
    from slurm_plugin.slurm import make_slurm

    config = load_config(args.config)
    node = args.node or config.agent.node or socket.gethostname().split(".")[0]
    interval = max(0.05, args.interval)
    choices = JobChoices.of(args, node)
    sampler = Sampler(
        node, make_slurm(args.slurm), default_source(), window_s=max(interval * 3, 1.0)
    )
    sampler.slurm.node_info(node)  # fail early, naming the known nodes, on a wrong --node
    metrics = AgentMetrics(node, config.prices, listen=args.listen or config.agent.metrics_listen)
    assert metrics.server is not None
    if args.json:
        print(json.dumps({"node": node, "url": metrics.server.url}), flush=True)
    else:
        print(f"serving {node} on {metrics.server.url}", file=sys.stderr, flush=True)
    samples = 0
    try:
        while not args.count or samples < args.count:
            now = time.time()
            metrics.observe(choices.sample(sampler, now), Offer(), (), now=now)
            samples += 1
            time.sleep(max(0.0, interval - (time.time() - now)))
    finally:
        metrics.close()
    return 0


def _openmetrics(args: argparse.Namespace) -> int:
    from colocate.metrics.openmetrics import write_openmetrics
    from colocate.metrics.replay_series import SERIES_FILE, load_replay_series

    path = Path(args.from_replay) if args.from_replay else Path(args.replay_out) / SERIES_FILE
    if args.replay_out and not Path(args.replay_out).is_dir():
        raise ConfigError(
            "not a directory; pass the --out directory of colocate replay", path=args.replay_out
        )
    if args.replay_out and not path.exists():
        raise ConfigError(
            f"no {SERIES_FILE} here; run colocate replay --out {args.replay_out} again "
            "(or write it with colocate.metrics.replay_series.save_replay_series)",
            path=args.replay_out,
        )
    series = load_replay_series(path)
    shift = 0.0
    if args.end_at is not None:
        end = _parse_end(args.end_at)
        last = max((s[-1].t for s in series.policies.values() if s), default=None)
        shift = 0.0 if last is None else end - last
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout  # noqa: SIM115
    try:
        written = write_openmetrics(
            series.policies,
            out,
            node=args.node or series.node,
            currency=series.currency,
            charging=series.charging,
            time_shift_s=shift,
        )
    finally:
        if out is not sys.stdout:
            out.close()
    if args.json:
        summary = {"samples": written, "policies": sorted(series.policies), "time_shift_s": shift}
        print(json.dumps(summary), file=sys.stderr)
    return 0


def _parse_end(value: str) -> float:
    if value == "now":
        return time.time()
    try:
        return float(value)
    except ValueError:
        raise ConfigError(f"--end-at {value!r}: write 'now' or epoch seconds") from None


def _queries(args: argparse.Namespace) -> int:
    from colocate.metrics.dashboard import expand, load_dashboard, panel_queries

    queries = panel_queries(load_dashboard(args.dashboard))
    if args.json:
        rows = [
            {
                "row": q.row,
                "panel": q.panel,
                "ref_id": q.ref_id,
                "expr": expand(q.expr) if args.expand else q.expr,
            }
            for q in queries
        ]
        print(json.dumps(rows, indent=2))
        return 0
    for q in queries:
        print(f"[{q.row} / {q.panel} / {q.ref_id}]\n  {expand(q.expr) if args.expand else q.expr}")
    return 0
