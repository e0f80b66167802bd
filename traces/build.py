"""Build the replay's loop with mypyc, or say what is built (see :mod:`traces.compiled`).

    python -m traces.build [--check] [--json]

Exit 0 when built (or with ``--check``), 1 when the build failed (one line says why), 2 when
it cannot run here (no C compiler, no mypy): the source runs then, at about a fifth more CPU
time.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys

from traces.compiled import MODULES, REBUILD, build, state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=REBUILD, description="Build the replay's loop with mypyc, or say what is built."
    )
    parser.add_argument("--check", action="store_true", help="say what is built; build nothing")
    parser.add_argument("--json", action="store_true", help="print the states as JSON")
    args = parser.parse_args(argv)
    if args.check:
        states = {name: state(name) for name in MODULES}
    else:
        if shutil.which("cc") is None and shutil.which("gcc") is None:
            print(f"{REBUILD}: no C compiler (cc or gcc): the source runs", file=sys.stderr)
            return 2
        if importlib.util.find_spec("mypyc") is None:
            print(f"{REBUILD}: mypyc is not installed (pip install mypy)", file=sys.stderr)
            return 2
        try:
            states = build()
        except RuntimeError as exc:
            print(f"{REBUILD}: {exc}; the source runs", file=sys.stderr)
            return 1
        except OSError as exc:  # e.g. a build made by root, rebuilt by a user
            where = f" ({exc.filename})" if exc.filename else ""
            print(f"{REBUILD}: {exc.strerror or exc}{where}; the source runs", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(states))
    else:
        for name, what in states.items():
            print(f"traces/{name}: {what}")
    built = all(what in ("compiled", "pure") for what in states.values())
    return 0 if args.check or built else 1


if __name__ == "__main__":
    raise SystemExit(main())
