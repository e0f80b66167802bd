"""The ``colocate`` command: one entry point, one module per subcommand.

Each subcommand module defines ``add_arguments(parser)`` and ``run(args) -> int``. Only the
chosen module is imported, so ``colocate hook prolog`` starts fast.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import sys
from collections.abc import Sequence

# name -> (module, one-line help). Adding a subcommand: one module and one line here.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "replay": (
        "colocate.cli.replay",
        "replay job and FaaS traces through the policies; report money recovered",
    ),
    "tune": (
        "colocate.cli.tune",
        "search policy limits for the most money recovered within the slowdown and eviction caps",
    ),
    "monitor": ("colocate.cli.monitor", "show what each Slurm job on this node was given and uses"),
    "agent": ("colocate.cli.agent", "run the node agent (Slurm-integrated, or --standalone)"),
    "broker": ("colocate.cli.broker", "run the lease broker"),
    "status": ("colocate.cli.status", "show the broker's nodes, offers and leases"),
    "invoke": ("colocate.cli.invoke", "lease resources and invoke a function once"),
    "leases": ("colocate.cli.leases", "list your live leases (every lease for an admin)"),
    "release": ("colocate.cli.release", "give leases back by id"),
    "usage": ("colocate.cli.usage", "report who used what from the broker's ledger, like sreport"),
    "dev-cluster": (
        "colocate.cli.dev_cluster",
        "start or stop a real Slurm cluster on this machine",
    ),
    "calibrate": (
        "colocate.cli.calibrate",
        "measure on one node how much functions on idle cores slow batch jobs (interference table)",
    ),
    "hook": ("colocate.cli.hook", "Slurm prolog/epilog hooks (never fail the job)"),
    "metrics": ("colocate.cli.metrics", "metrics tools (replay to OpenMetrics, dashboard queries)"),
}


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="colocate",
        description="Run serverless functions on the idle cores and unused memory of HPC batch jobs.",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; its exit code. A closed stdout (``| head -1``) ends it quietly."""
    try:
        try:
            return _main(list(sys.argv[1:] if argv is None else argv))
        finally:  # also after argparse's SystemExit: a closed pipe shows here, not at exit
            sys.stdout.flush()
    except BrokenPipeError:
        return _closed_pipe()


def _main(argv: list[str]) -> int:
    top = _top_parser()
    # Split global options from the subcommand so only its module is imported.
    idx = next((i for i, a in enumerate(argv) if a in SUBCOMMANDS), None)
    if idx is None:
        args = top.parse_args(argv)
        top.print_help()
        return 0 if not argv else 2
    global_args = top.parse_args(argv[:idx])
    name = argv[idx]
    module_name, help_text = SUBCOMMANDS[name]
    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(global_args.verbose, 2)],
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            print(f"colocate {name}: not available in this build", file=sys.stderr)
            return 2
        raise
    parser = argparse.ArgumentParser(prog=f"colocate {name}", description=help_text)
    module.add_arguments(parser)
    args = parser.parse_args(argv[idx + 1 :])
    from colocate.errors import ColocateError

    try:
        return int(module.run(args) or 0)
    except ColocateError as exc:
        print(f"colocate {name}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _closed_pipe() -> int:
    """The reader of our output went away (``colocate ... | head -1``): exit quietly, as
    ``cat`` does. stdout is pointed at /dev/null so the interpreter's final flush of what is
    still buffered does not raise again and print a traceback."""
    import os

    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 141  # 128 + SIGPIPE, what a shell reports for a killed writer
