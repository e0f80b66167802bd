"""``colocate leases [--node N]``: your live leases (every lease for an admin), like squeue."""

from __future__ import annotations

import argparse
import json
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--node", help="only the leases on this node")
    parser.add_argument(
        "--broker", help="broker URL (default agent.broker_url, http://127.0.0.1:8642)"
    )
    parser.add_argument("--config", help="colocate TOML config file (default: built-in defaults)")
    parser.add_argument("--json", action="store_true", help="print the leases as a JSON list")


def run(args: argparse.Namespace) -> int:
    from colocate.client import Client
    from colocate.config import load_config

    url = args.broker or load_config(args.config).agent.broker_url
    with Client(url) as client:
        leases = client.leases(args.node)
    if args.json:
        print(json.dumps([lease.model_dump() for lease in leases], indent=2))
        return 0
    if not leases:
        print("no leases" + (f" on {args.node}" if args.node else ""))
        return 0
    now = time.time()
    print(
        f"{'LEASE':<20} {'USER':<12} {'ACCOUNT':<12} {'NODE':<16} {'CORES':>5} {'MEM GiB':>8} {'EXPIRES IN':>10}"
    )
    for lease in leases:
        print(
            f"{lease.lease_id:<20} {lease.user or '?':<12} {lease.account or '-':<12} {lease.node:<16} "
            f"{len(lease.cpu_ids):>5} {lease.memory_bytes / 1024**3:>8.2f} {lease.expires_at - now:>9.0f}s"
        )
    return 0
