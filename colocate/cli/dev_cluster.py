"""``colocate dev-cluster up|down|status``: a real Slurm 22.05 cluster on this machine.

Examples::

    colocate dev-cluster up --nodes 3      # install if missing, start munge, slurmctld, n1..n3
    colocate dev-cluster status --json
    colocate dev-cluster down              # stops only what `up` started
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from slurm_plugin.devcluster import DEFAULT_STATE_DIR, ClusterStatus, DevCluster


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["up", "down", "status"], help="what to do")
    parser.add_argument(
        "--nodes", type=int, default=3, help="fake nodes for `up` (n1..nN; default 3)"
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help=f"pid files, logs, spool and Slurm state (default {DEFAULT_STATE_DIR})",
    )
    parser.add_argument("--json", action="store_true", help="print the status as JSON")


def _print(status: ClusterStatus, action: str) -> None:
    for d in status.daemons:
        state = f"running (pid {d.pid})" if d.running else "stopped"
        owner = "" if d.owned or not d.running else "  [not started by dev-cluster]"
        print(f"{d.name:<14} {state}{owner}")
    for note in status.notes:
        print(f"note: {note}")
    if status.sinfo:
        print()
        print(status.sinfo)
    if status.up_seconds is not None:
        print(f"\n{action} took {status.up_seconds:.2f} s; state in {status.state_dir}")


def run(args: argparse.Namespace) -> int:
    cluster = DevCluster(state_dir=args.state_dir)
    if args.action == "up":
        status = cluster.up(args.nodes)
    elif args.action == "down":
        status = cluster.down()
    else:
        status = cluster.status()
    if args.json:
        print(json.dumps(status.to_json(), indent=2))
    else:
        _print(status, args.action)
    if args.action == "status":
        return 0 if status.running else 3
    return 0
