"""``colocate release ID [ID...]``: give leases back by id (yours; any for an admin)."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "lease_ids", nargs="+", metavar="ID", help="lease ids, as `colocate leases` shows them"
    )
    parser.add_argument(
        "--broker", help="broker URL (default agent.broker_url, http://127.0.0.1:8642)"
    )
    parser.add_argument("--config", help="colocate TOML config file (default: built-in defaults)")
    parser.add_argument("--json", action="store_true", help="print {lease_id: released} as JSON")


def run(args: argparse.Namespace) -> int:
    from colocate.client import Client
    from colocate.config import load_config

    url = args.broker or load_config(args.config).agent.broker_url
    done: dict[str, bool] = {}
    with Client(url) as client:
        for lease_id in args.lease_ids:
            done[lease_id] = client.release(lease_id)
    if args.json:
        print(json.dumps(done))
    else:
        for lease_id, released in done.items():
            print(f"{lease_id}: {'released' if released else 'already released'}")
    return 0
