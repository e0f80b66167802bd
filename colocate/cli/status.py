"""``colocate status``: the broker's nodes, their offers and free capacity, and its leases."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--broker", help="broker URL (default agent.broker_url, http://127.0.0.1:8642)"
    )
    parser.add_argument("--config", help="colocate TOML config file (default: built-in defaults)")
    parser.add_argument("--json", action="store_true", help="print the broker's status as JSON")


def _gib(n: int) -> str:
    return f"{n / 1024**3:.2f}"


def _ids(cpu_ids: Sequence[int]) -> str:
    """CPU ids as the kernel numbers them, e.g. ``0,1`` (``-`` for none)."""
    return ",".join(str(c) for c in sorted(cpu_ids)) or "-"


def run(args: argparse.Namespace) -> int:
    from colocate.client import Client
    from colocate.config import load_config

    url = args.broker or load_config(args.config).agent.broker_url
    with Client(url) as client:
        status = client.status()
    if args.json:
        print(status.model_dump_json(indent=2))
        return 0
    print(
        f"broker {url} ({status.placement}): {len(status.nodes)} nodes, {len(status.leases)} leases"
    )
    if status.nodes:
        print(
            f"\n{'NODE':<20} {'STATE':<6} {'CORES':>5} {'FREE':>5} {'FREE CPU IDS':<12} "
            f"{'MEM GiB':>8} {'FREE GiB':>8}  LAST REPORT"
        )
        for node in status.nodes:
            print(
                f"{node.node:<20} {'up' if node.alive else 'silent':<6} {len(node.cpu_ids):>5} "
                f"{len(node.free_cpu_ids):>5} {_ids(node.free_cpu_ids):<12} "
                f"{_gib(node.memory_bytes):>8} {_gib(node.free_memory_bytes):>8}  "
                f"{status.now - node.reported_at:.1f}s ago"
            )
    if status.leases:
        print(
            f"\n{'LEASE':<20} {'NODE':<20} {'CORES':>5} {'CPU IDS':<12} {'MEM GiB':>8} "
            f"{'EXPIRES IN':>10}  ADDRESS"
        )
        for lease in status.leases:
            print(
                f"{lease.lease_id:<20} {lease.node:<20} {len(lease.cpu_ids):>5} "
                f"{_ids(lease.cpu_ids):<12} {_gib(lease.memory_bytes):>8} "
                f"{lease.expires_at - status.now:>9.0f}s  {lease.address or '(starting)'}"
            )
    return 0
