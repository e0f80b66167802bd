"""``colocate hook prolog|epilog``: Slurm's Prolog=/Epilog= hooks (see :mod:`slurm_plugin.hooks`).

Everything after ``hook`` is parsed by the hook itself, which never exits non-zero: a
failing prolog drains the node. Standard library only on this path.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "argv",
        nargs=argparse.REMAINDER,
        metavar="prolog|epilog [--socket PATH] [--config FILE] [--timeout S] [--json]",
        help="which hook, and its options (colocate hook prolog --help)",
    )


def run(args: argparse.Namespace) -> int:
    from slurm_plugin.hooks import main

    return main(args.argv)
