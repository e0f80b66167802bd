"""Policy decisions per second: what the replay's inner loop pays per node and time step.

Inputs look like the replay's: nodes of 8 cores and 64 GiB, 1-3 jobs, 0-2 leases, seeded;
one job in ten shows cpu pressure around the guard's limit, so its slow paths (grace,
eviction, cooldown) are part of the mix.
Two history lengths: 6 samples (a replay's coarse steps) and 300 samples (the live agent
sampling at 1 s over the default 300 s window); and nodes full of serial jobs (8 one-core
jobs, 3 samples each: a third of the decisions of RICC-2010-2's first 20,000 jobs). Each policy runs with the interference guard
(default limits) and bare (``guard=False``), carrying ``Decision.state`` per node as a
driver does. Baseline: ``unallocated`` bare, measured in the same run. Scenarios run
round-robin ``--rounds`` times so background load hits them alike; medians are quoted.

Rates are per CPU second of this process (the machine is shared; wall rates are saved too).

Usage: python benchmarks/decide.py [--calls 5000] [--rounds 15]
Prints a table and writes benchmarks/results/decide.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from itertools import pairwise
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from policies import (  # noqa: E402
    POLICIES,
    JobView,
    LeaseView,
    Limits,
    NodeView,
    Policy,
    UsageSample,
    get_policy,
)

GIB = 1024**3
NOW = 100_000.0
NODES = 500


def make_nodes(history: int, seed: int) -> list[NodeView]:
    """Seeded 8-core nodes with 1-3 jobs (contiguous cores) and 0-2 leases on the rest."""
    rng = random.Random(seed)
    views = []
    for n in range(NODES):
        cuts = sorted(rng.sample(range(1, 8), rng.randint(0, 2)))
        bounds = [0, *cuts, rng.choice([6, 7, 8]) if cuts and cuts[-1] < 6 else 8]
        jobs = []
        for k, (lo, hi) in enumerate(pairwise(bounds)):
            if hi <= lo:
                continue
            cores = hi - lo
            alloc = rng.choice([4, 8, 16]) * GIB
            use = rng.uniform(0.1, 0.9)
            hot = rng.random() < 0.1  # one job in ten sees cpu pressure near the limit
            samples = tuple(
                UsageSample(
                    NOW - (history - i) * 1.0,
                    cores * use * rng.uniform(0.8, 1.0),
                    int(alloc * use * rng.uniform(0.8, 1.0)),
                    rng.uniform(0, 40 if hot else 8),
                    rng.uniform(0, 2),
                )
                for i in range(history)
            )
            jobs.append(
                JobView(f"{n}.{k}", frozenset(range(lo, hi)), alloc, 0, samples, True, NOW - 3600)
            )
        taken = frozenset().union(*(j.cpu_ids for j in jobs))
        free = sorted(frozenset(range(8)) - taken) or [7]
        leases = tuple(
            LeaseView(f"L{n}.{i}", frozenset({free[-1 - i % len(free)]}), GIB, NOW - 60, NOW + 600)
            for i in range(rng.randint(0, 2))
        )
        views.append(NodeView(f"n{n}", frozenset(range(8)), 64 * GIB, tuple(jobs), leases, GIB))
    return views


SERIAL = -3  # key of the serial-jobs nodes (3 samples each) among the history lengths


def make_serial_nodes(seed: int) -> list[NodeView]:
    """Seeded 8-core nodes, each full of 8 one-core jobs with 3 samples, no leases."""
    rng = random.Random(seed)
    views = []
    for n in range(NODES):
        jobs = []
        for k in range(8):
            alloc = rng.choice([1, 2, 4]) * GIB
            use = rng.uniform(0.3, 1.0)
            samples = tuple(
                UsageSample(NOW - (3 - i) * 60.0, use, int(alloc * use * rng.uniform(0.8, 1)))
                for i in range(3)
            )
            jobs.append(JobView(f"{n}.{k}", frozenset({k}), alloc, 0, samples, True, NOW - 3600))
        views.append(NodeView(f"n{n}", frozenset(range(8)), 64 * GIB, tuple(jobs), (), GIB))
    return views


def calls_per_second(
    policy: Policy, views: list[NodeView], limits: Limits, calls: int
) -> tuple[float, float]:
    """(calls per CPU second of this process, calls per wall second)."""
    states: list[object | None] = [None] * len(views)
    count = len(views)
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(calls):
        k = i % count
        states[k] = policy.decide(views[k], limits, NOW + i // count, states[k]).state
    return calls / (time.process_time() - cpu), calls / (time.perf_counter() - wall)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--calls", type=int, default=20_000, help="decide() calls per scenario and round"
    )
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)

    guarded, bare = Limits(), Limits(guard=False)
    scenarios: list[tuple[str, str, int]] = [
        (name, mode, history)
        for history in (6, 300, SERIAL)
        for name in sorted(POLICIES)
        for mode in ("bare", "guard")
    ]
    inputs = {h: make_nodes(h, seed=42) for h in (6, 300)}
    inputs[SERIAL] = make_serial_nodes(seed=42)
    rates: dict[tuple[str, str, int], list[float]] = {s: [] for s in scenarios}
    wall_rates: dict[tuple[str, str, int], list[float]] = {s: [] for s in scenarios}
    for _ in range(args.rounds):
        for name, mode, history in scenarios:
            limits = guarded if mode == "guard" else bare
            cpu_rate, wall_rate = calls_per_second(
                get_policy(name), inputs[history], limits, args.calls
            )
            rates[(name, mode, history)].append(cpu_rate)
            wall_rates[(name, mode, history)].append(wall_rate)

    rows: list[dict[str, Any]] = []
    for name, mode, history in scenarios:
        median = statistics.median(rates[(name, mode, history)])
        baseline = statistics.median(rates[("unallocated", "bare", history)])
        rows.append(
            {
                "policy": name,
                "guard": mode == "guard",
                "history_samples": 3 if history == SERIAL else history,
                "nodes": "8 serial jobs" if history == SERIAL else "1-3 jobs, 0-2 leases",
                "calls_per_cpu_s": round(median),
                "us_cpu_per_call": round(1e6 / median, 2),
                "calls_per_wall_s": round(statistics.median(wall_rates[(name, mode, history)])),
                "vs_unallocated_bare": round(median / baseline, 3),
            }
        )
    print(
        f"{'policy':<12} {'guard':<6} {'history':>7} {'nodes':<21} {'calls/cpu-s':>12} "
        f"{'us/call':>8} {'vs base':>8} {'calls/wall-s':>13}"
    )
    for row in rows:
        print(
            f"{row['policy']:<12} {('on' if row['guard'] else 'off'):<6} "
            f"{row['history_samples']:>7} {row['nodes']:<21} {row['calls_per_cpu_s']:>12,} "
            f"{row['us_cpu_per_call']:>8.2f} {row['vs_unallocated_bare']:>7.2f}x "
            f"{row['calls_per_wall_s']:>13,}"
        )
    print(
        "medians over rounds, per CPU second of this process (robust to other load on the "
        "machine); baseline: unallocated with the guard off, same history length, same run"
    )

    out = ROOT / "benchmarks" / "results" / "decide.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "policies",
                "python": platform.python_version(),
                "machine": platform.machine(),
                "calls": args.calls,
                "rounds": args.rounds,
                "nodes": NODES,
                "baseline": "unallocated, guard off",
                "results": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
