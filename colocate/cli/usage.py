"""``colocate usage [--user U] [--account A] [--since DATE]``: the ledger, like sreport.

One line per account and user: leases, core-hours, GiB-hours and the money recovered (at the
site's prices); ``--json`` prints every ledger record. Users see their own usage; admins
everyone's. Open leases count up to the last time their agent reported them.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--user", help="only this user (admins; others see only themselves)")
    parser.add_argument("--account", help="only this Slurm account")
    parser.add_argument(
        "--since", help="only leases that ran since this date/time (ISO, UTC), e.g. 2026-01-31"
    )
    parser.add_argument(
        "--broker", help="broker URL (default agent.broker_url, http://127.0.0.1:8642)"
    )
    parser.add_argument("--config", help="colocate TOML config file (default: built-in defaults)")
    parser.add_argument("--json", action="store_true", help="print every ledger record as JSON")


def run(args: argparse.Namespace) -> int:
    from colocate.client import Client
    from colocate.config import load_config

    url = args.broker or load_config(args.config).agent.broker_url
    with Client(url) as client:
        report = client.usage(user=args.user, account=args.account, since=args.since)
    if args.json:
        print(report.model_dump_json(indent=2))
        return 0
    totals: dict[tuple[str, str], list[float]] = {}
    for record in report.records:
        row = totals.setdefault((record.account or "-", record.user), [0, 0, 0.0, 0.0, 0.0])
        row[0] += 1
        row[1] += record.end is None
        row[2] += record.core_seconds / 3600
        row[3] += record.gib_seconds / 3600
        row[4] += record.money
    print(
        f"{'ACCOUNT':<16} {'USER':<12} {'LEASES':>6} {'OPEN':>4} {'CORE-H':>10} {'GIB-H':>10} {report.currency:>10}"
    )
    for (account, user), (n, running, core_h, gib_h, money) in sorted(totals.items()):
        print(
            f"{account:<16} {user:<12} {int(n):>6} {int(running):>4} {core_h:>10.4f} {gib_h:>10.4f} {money:>10.6f}"
        )
    if not totals:
        print("(no leases)")
    return 0
