"""Cost of building the policies' value types, as :func:`policies.model.value` makes them,
against the same classes as frozen dataclasses (the baseline, built in the same run).

    .venv/bin/python benchmarks/values.py [--objects 200000] [--rounds 7] [--json]

The replay builds about ten million of these per RICC-2010-2 run (samples, job views, node
views, offers, decisions, guard states), so their constructor is on its hot path. Prints ns
per object (median of the rounds) and the ratio; saves ``benchmarks/results/values.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from policies.guard import GuardState  # noqa: E402
from policies.model import (  # noqa: E402
    Decision,
    Eviction,
    EvictionReason,
    JobView,
    LeaseView,
    NodeView,
    Offer,
    UsageSample,
)

RESULTS = ROOT / "benchmarks" / "results" / "values.json"


def frozen_twin(cls: type) -> type:
    """``cls`` rebuilt as ``@dataclass(frozen=True, slots=True)`` with the same fields."""
    specs: list[tuple[str, Any, Any]] = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            specs.append((f.name, f.type, dataclasses.field(default=f.default)))
        elif f.default_factory is not dataclasses.MISSING:
            specs.append((f.name, f.type, dataclasses.field(default_factory=f.default_factory)))
        else:
            specs.append((f.name, f.type, dataclasses.field()))
    return dataclasses.make_dataclass(cls.__name__, specs, frozen=True, slots=True)


def cases() -> list[tuple[type, tuple[Any, ...]]]:
    """Each class with arguments like the replay's (each object is built from its row)."""
    sample = (120.0, 3.5, 1 << 30, 12.5)
    s = UsageSample(*sample)
    job = ("123", frozenset(range(4)), 8 << 30, 2 << 30, (s, s), True, 0.0)
    lease = ("7", frozenset({6, 7}), 1 << 30, 0.0, float("inf"))
    node = ("n1", frozenset(range(8)), 64 << 30, (JobView(*job),), (LeaseView(*lease),), 1 << 30)
    offer = (frozenset({4, 5, 6, 7}), 4 << 30)
    o = Offer(*offer)
    return [
        (UsageSample, sample),
        (JobView, job),
        (LeaseView, lease),
        (NodeView, node),
        (Offer, offer),
        (Eviction, ("7", EvictionReason.CPU_GROWTH, 0.0)),
        (Decision, (o, (), None, ())),
        (GuardState, (None, (), (), o, ())),
    ]


def per_object_ns(cls: type, args: tuple[Any, ...], objects: int) -> float:
    t = time.perf_counter()
    for _ in range(objects):
        cls(*args)
    return (time.perf_counter() - t) / objects * 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=200_000, help="objects per timing")
    parser.add_argument("--rounds", type=int, default=7, help="rounds (medians are quoted)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    if args.objects < 1 or args.rounds < 1:
        print("values.py: --objects and --rounds must be at least 1", file=sys.stderr)
        return 2
    rows: list[dict[str, Any]] = []
    for cls, call in cases():
        twin = frozen_twin(cls)
        ours: list[float] = []
        base: list[float] = []
        for _ in range(args.rounds):  # alternate, so background load hits both alike
            ours.append(per_object_ns(cls, call, args.objects))
            base.append(per_object_ns(twin, call, args.objects))
        o, b = statistics.median(ours), statistics.median(base)
        rows.append(
            {"class": cls.__name__, "value_ns": o, "frozen_ns": b, "frozen_over_value": b / o}
        )
    out = {"objects": args.objects, "rounds": args.rounds, "rows": rows}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=1) + "\n")
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print(f"{'class':<12} {'value ns':>9} {'frozen ns':>10} {'ratio':>6}")
    for r in rows:
        print(
            f"{r['class']:<12} {r['value_ns']:>9.0f} {r['frozen_ns']:>10.0f}"
            f" {r['frozen_over_value']:>6.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
