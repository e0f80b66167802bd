"""``colocate calibrate``: measure how much functions on a job's idle core slow the job, on
one real node, and write the interference table the replay and the guard read.

Runs three batch kernels (STREAM triad, dense matmul, pointer chase) as Slurm jobs on
``--nodes NODE``, each alone and with each function kind (compression, BFS, image work)
leased on its idle core through the broker at ``--broker``; the node's agent must report to
that broker (and, for the lease to land there, it should be the only node with an offer).
Progress goes to stderr; the table to ``--out`` (and stdout with ``--json``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from colocate.calibrate.functions import FUNCTIONS
    from colocate.calibrate.kernels import KERNELS

    parser.add_argument(
        "--nodes", required=True, metavar="NODE", help="the one node to calibrate, e.g. n1"
    )
    parser.add_argument(
        "--broker", help="broker URL (default agent.broker_url, http://127.0.0.1:8642)"
    )
    parser.add_argument("--config", help="colocate TOML config file (default: built-in defaults)")
    parser.add_argument(
        "--repeats", type=int, default=5, metavar="N", help="repeats per kernel (default 5)"
    )
    parser.add_argument(
        "--segment-s",
        type=float,
        default=3.0,
        metavar="S",
        help="seconds each function (and each idle window) runs per repeat (default 3)",
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="kernel working-set scale (default 1: 96 MiB STREAM, 16 MiB chase)",
    )
    parser.add_argument(
        "--kernels",
        default=",".join(KERNELS),
        help=f"comma-separated kernels (default {','.join(KERNELS)})",
    )
    parser.add_argument(
        "--functions",
        default=",".join(FUNCTIONS),
        help=f"comma-separated functions (default {','.join(FUNCTIONS)})",
    )
    parser.add_argument(
        "--workdir",
        metavar="DIR",
        help="directory this host and the node share, for the kernels' output (default: a new "
        "one in /tmp, enough when both are this machine)",
    )
    parser.add_argument(
        "--lease-timeout",
        type=float,
        default=120.0,
        metavar="S",
        help="how long to wait for the node to offer a core (default 120)",
    )
    parser.add_argument(
        "--measure",
        choices=("wall", "cpu"),
        default="wall",
        help="what the table's slowdown is: the kernel's wall time (default: what the job "
        "sees), or its CPU time (only the slowdown through caches and memory; for a node "
        "shared with other load, which the functions would push onto the job's core)",
    )
    parser.add_argument("--out", metavar="TABLE.json", help="write the table here")
    parser.add_argument("--plot", metavar="FILE.png", help="write a bar chart here")
    parser.add_argument("--json", action="store_true", help="print the table as JSON on stdout")


def run(args: argparse.Namespace) -> int:
    from colocate.calibrate.runner import Calibration, Settings, dumps, write_plot
    from colocate.config import load_config
    from colocate.errors import ConfigError

    nodes = [n for n in args.nodes.split(",") if n]
    if len(nodes) != 1:
        raise ConfigError("calibrate runs on one node: pass --nodes NODE", key="--nodes")
    url = args.broker or load_config(args.config).agent.broker_url
    settings = Settings(
        node=nodes[0],
        broker_url=url,
        repeats=args.repeats,
        segment_s=args.segment_s,
        scale=args.scale,
        kernels=tuple(k for k in args.kernels.split(",") if k),
        functions=tuple(f for f in args.functions.split(",") if f),
        workdir=args.workdir,
        lease_timeout_s=args.lease_timeout,
        measure=args.measure,
    )

    def progress(line: str) -> None:
        print(f"calibrate: {line}", file=sys.stderr, flush=True)

    table = Calibration(settings, progress).run()
    text = dumps(table)
    if args.out:
        try:
            Path(args.out).write_text(text)
        except OSError as exc:
            raise ConfigError(f"cannot write the table: {exc.strerror}", path=args.out) from None
        progress(f"table written to {args.out}")
    if args.plot:
        try:
            write_plot(table, Path(args.plot))
        except OSError as exc:
            raise ConfigError(f"cannot write the plot: {exc.strerror}", path=args.plot) from None
        progress(f"plot written to {args.plot}")
    if args.json:
        sys.stdout.write(text)
    else:
        measure = table["measure"]
        other = "wall" if measure == "cpu" else "cpu"
        print(
            f"{'kernel':<8} {'function':<10} {measure + ' time':>9} {'95% CI':>17} "
            f"{other + ' time':>9} {'95% CI':>17} {'n':>3}"
        )
        for c in table["cells"]:
            print(
                f"{c['kernel']:<8} {c['function']:<10} {c['slowdown']:>8.3f}x "
                f"[{c['ci_low']:.3f}, {c['ci_high']:.3f}] {c[other + '_slowdown']:>8.3f}x "
                f"[{c[other + '_ci_low']:.3f}, {c[other + '_ci_high']:.3f}] {c['n']:>3}"
            )
    return 0
