"""``python -m slurm_plugin.spank build|register|unregister|install|status``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from colocate.errors import ColocateError
from slurm_plugin.spank import (
    DEFAULT_BUILD_DIR,
    DEFAULT_CONF_DIR,
    LIBRARY_NAME,
    build,
    install,
    register,
    registered_library,
    unregister,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m slurm_plugin.spank",
        description="Build and register the colocate SPANK plugin (--colocate=allow|deny).",
    )
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("build", help=f"compile {LIBRARY_NAME} into a folder")
    p.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_BUILD_DIR,
        help=f"build folder (default {DEFAULT_BUILD_DIR})",
    )
    p.add_argument("--force", action="store_true", help="compile even if the library is up to date")
    p = sub.add_parser("register", help="name the library in plugstack.conf.d/colocate.conf")
    p.add_argument(
        "--so", type=Path, default=DEFAULT_BUILD_DIR / LIBRARY_NAME, help="the built library"
    )
    p.add_argument(
        "--conf-dir",
        type=Path,
        default=DEFAULT_CONF_DIR,
        help=f"plugstack include folder (default {DEFAULT_CONF_DIR})",
    )
    p.add_argument(
        "--required", action="store_true", help="fail every job when the library cannot be loaded"
    )
    p = sub.add_parser("unregister", help="remove plugstack.conf.d/colocate.conf")
    p.add_argument("--conf-dir", type=Path, default=DEFAULT_CONF_DIR)
    p = sub.add_parser("install", help="build (if stale) and register")
    p.add_argument("--out", type=Path, default=DEFAULT_BUILD_DIR)
    p.add_argument("--conf-dir", type=Path, default=DEFAULT_CONF_DIR)
    p.add_argument("--force", action="store_true")
    p = sub.add_parser("status", help="which library is registered")
    p.add_argument("--conf-dir", type=Path, default=DEFAULT_CONF_DIR)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    result: dict[str, object]
    try:
        if args.action == "build":
            result = {"library": str(build(args.out, force=args.force))}
        elif args.action == "register":
            result = {"conf": str(register(args.so, args.conf_dir, required=args.required))}
        elif args.action == "unregister":
            result = {"removed": unregister(args.conf_dir)}
        elif args.action == "install":
            result = {"library": str(install(args.out, args.conf_dir, force=args.force))}
        else:
            lib = registered_library(args.conf_dir)
            result = {"library": str(lib) if lib else None, "exists": bool(lib and lib.exists())}
    except ColocateError as exc:
        print(f"slurm_plugin.spank {args.action}: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result) if args.json else " ".join(f"{k}={v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
