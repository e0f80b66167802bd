"""``colocate broker``: run the lease broker (HTTP/JSON, OpenAPI at /openapi.json)."""

from __future__ import annotations

import argparse
import logging
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="colocate TOML config file (default: built-in defaults)")
    parser.add_argument(
        "--listen", help="HOST:PORT to serve on (default 127.0.0.1:8642; port 0 picks one)"
    )
    parser.add_argument(
        "--placement", choices=["first_fit", "best_fit"], help="how a node is picked for a lease"
    )
    parser.add_argument(
        "--secret-file", help="cluster secret shared with the agents (created when absent)"
    )
    parser.add_argument(
        "--node-key",
        metavar="NODE",
        help="print NODE's key file (install it on NODE alone as the agent's secret file) and exit",
    )
    parser.add_argument(
        "--ledger",
        help='accounting ledger: SQLite file (default ledger.db next to the secret), "" for none',
    )


def run(args: argparse.Namespace) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per report is noise
    from pathlib import Path

    from colocate.auth.identity import Authenticator
    from colocate.broker import Broker, create_app, default_secret_file, load_or_create_secret
    from colocate.broker.ledger import open_ledger
    from colocate.broker.service import bind, serve, url_of
    from colocate.config import load_config

    full = load_config(args.config)
    config = full.broker
    overrides = {
        key: value
        for key, value in (
            ("listen", args.listen),
            ("placement", args.placement),
            ("secret_file", args.secret_file),
            ("ledger", args.ledger),
        )
        if value is not None
    }
    config = config.model_copy(update=overrides)
    secret = load_or_create_secret(config.secret_file)
    if args.node_key:
        from colocate.auth.node import node_key_file

        sys.stdout.write(node_key_file(secret, args.node_key))
        return 0
    auth = config.auth
    authenticator = Authenticator.from_files(
        auth.methods, auth.jwt_key_file, auth.admin_users, auth.admin_groups
    )
    secret_dir = (
        Path(config.secret_file).parent if config.secret_file else default_secret_file().parent
    )
    ledger = open_ledger(config.ledger, secret_dir, full.prices)
    sock = bind(config.listen, 8642)
    # One line on stdout so scripts and tests learn the port chosen for port 0.
    print(f"colocate broker: listening on {url_of(sock)} ({config.placement})", flush=True)
    sys.stdout.flush()
    serve(
        create_app(Broker(config, secret, ledger=ledger), authenticator),
        sock,
        max_connections=config.max_connections,
    )
    return 0
