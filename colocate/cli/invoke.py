"""``colocate invoke MODULE:FUNCTION [ARGS...]``: lease, call the function once, release.

Each ARG is read as JSON when it parses (``3``, ``"x"``, ``[1, 2]``, ``null``) and as a plain
string otherwise. The function must be importable here (the current directory is on the path)
and on the node.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("function", metavar="MODULE:FUNCTION", help="e.g. math:factorial")
    parser.add_argument(
        "args", nargs="*", metavar="ARGS", help="arguments, as JSON values or plain strings"
    )
    parser.add_argument(
        "--broker", help="broker URL (default agent.broker_url, http://127.0.0.1:8642)"
    )
    parser.add_argument("--config", help="colocate TOML config file (default: built-in defaults)")
    parser.add_argument("--cores", type=int, default=1, help="cores to lease (default 1)")
    parser.add_argument("--memory", default="512MiB", help="memory to lease (default 512MiB)")
    parser.add_argument("--duration", default="1m", help="lease duration (default 1m)")
    parser.add_argument(
        "--account", default="", help="Slurm account to charge (default: yours, per the broker)"
    )
    parser.add_argument("--json", action="store_true", help="print the result and timings as JSON")


def _argument(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def resolve(reference: str) -> Callable[..., Any]:
    """The function named ``module:function`` (dotted attributes allowed after the colon)."""
    from colocate.errors import ConfigError

    module_name, sep, attr = reference.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(
            f"{reference!r}: name the function as MODULE:FUNCTION, e.g. math:factorial"
        )
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"cannot import module {module_name!r} ({exc}); check the name and PYTHONPATH"
        ) from None
    _ship_by_value_if_local(target)
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"module {module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"{reference} is not callable")
    return target  # type: ignore[no-any-return]


def _ship_by_value_if_local(module: Any) -> None:
    """A module from the current directory is not importable on the node: ship its code."""
    path = getattr(module, "__file__", None)
    if (
        path
        and os.path.abspath(path).startswith(os.getcwd() + os.sep)
        and "site-packages" not in path
    ):
        import cloudpickle

        cloudpickle.register_pickle_by_value(module)


def run(args: argparse.Namespace) -> int:
    from colocate.client import Client
    from colocate.config import load_config
    from colocate.errors import ColocateError

    fn = resolve(args.function)
    call_args = [_argument(a) for a in args.args]
    url = args.broker or load_config(args.config).agent.broker_url
    started = time.perf_counter()
    with (
        Client(url) as client,
        client.lease(
            cores=args.cores, memory=args.memory, duration=args.duration, account=args.account
        ) as lease,
    ):
        granted = time.perf_counter()
        executor = lease.executor([fn])
        try:
            result = executor.invoke(fn, *call_args)
        except ColocateError:
            raise
        except (
            Exception
        ) as exc:  # the function's own exception, re-raised with the remote traceback
            remote = getattr(exc, "remote_traceback", None) or "".join(
                getattr(exc, "__notes__", [])
            )
            if remote:
                print(remote.rstrip(), file=sys.stderr)
            print(
                f"colocate invoke: {args.function} raised {type(exc).__name__}: {exc}",
                file=sys.stderr,
            )
            return 1
        finally:
            executor.shutdown(wait=False)
        done = time.perf_counter()
        lease_id, node = lease.lease_id, lease.node
    if args.json:
        try:
            json.dumps(result)
            shown: Any = result
        except (TypeError, ValueError):
            shown = repr(result)
        print(
            json.dumps(
                {
                    "function": args.function,
                    "result": shown,
                    "lease_id": lease_id,
                    "node": node,
                    "lease_s": granted - started,
                    "invoke_s": done - granted,
                }
            )
        )
    else:
        print(result if isinstance(result, str) else repr(result))
    return 0
