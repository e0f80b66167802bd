"""Capacity search time: RICC-2010-2 (447,794 jobs, 1024 nodes x 8 cores) with the Azure 2019
slice, one policy, goal <= 5 minutes.

    .venv/bin/python benchmarks/capacity.py [--swf PATH] [--policy NAME] [--jobs N]
        [--target 0.99] [--tolerance 0.05]

Measures, in one run:
- reading the SWF trace, and placing and modelling it once (``traces.replay.prepare``);
- the guided search (``traces.capacity.search_guided`` over ``ScaledReplay``): each replay's
  scale, served share, its estimate of the capacity, wall and CPU seconds; after the first
  replay the probes either side of the estimate run as two forked processes at once
  (``--serial``: one at a time), and CPU seconds include those children's;
- the baseline from the same run: the doubling search (``traces.capacity.search``: doubling
  from 1 until the share falls below the target, then 4 bisection steps, a replay from
  scratch each) needs ``ceil(log2(capacity)) + 1 + 4`` replays to get to its (coarser, about
  2^(1/16) = 4 %) bracket; its time is that count times this run's own
  read-free replay time (prepare + loop), since running it in full would take many minutes
  on the shared machine.

Prints a table and saves JSON in ``benchmarks/results/capacity.json`` (``--jobs`` runs write
``capacity-<N>.json``). CPU seconds are this process's (``time.process_time``): the machine
is shared, so wall seconds are reported too, with the load average.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.replay import run_header  # noqa: E402
from policies import POLICIES  # noqa: E402
from traces import bundled  # noqa: E402
from traces.azure import read_azure2019  # noqa: E402
from traces.capacity import ESTIMATE, ScaledReplay, search_guided, served_share  # noqa: E402
from traces.placement import Cluster  # noqa: E402
from traces.swf import read_swf  # noqa: E402

RICC = Path("/work/shared/data/traces/swf/RICC-2010-2.swf.gz")
RESULTS = ROOT / "benchmarks" / "results"


def children_cpu() -> float:
    """CPU seconds of finished child processes (the parallel replays)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--swf", type=Path, default=RICC)
    parser.add_argument("--policy", default="headroom" if "headroom" in POLICIES else "unallocated")
    parser.add_argument("--jobs", type=int, default=0, help="first N jobs only (0: all)")
    parser.add_argument("--target", type=float, default=0.99)
    parser.add_argument("--tolerance", type=float, default=0.05)
    parser.add_argument(
        "--serial", action="store_true", help="one replay at a time (no parallel pairs)"
    )
    args = parser.parse_args()
    if not args.swf.exists():
        print(f"{args.swf}: not found; pass --swf PATH to RICC-2010-2.swf.gz", file=sys.stderr)
        return 1
    load_before = os.getloadavg()
    wall0, cpu0, children0 = time.perf_counter(), time.process_time(), children_cpu()
    faas = read_azure2019(bundled.AZURE2019)
    trace = read_swf(args.swf)
    if args.jobs:
        trace = trace.head(args.jobs)
    read_wall, read_cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    nodes = trace.max_nodes or 1024
    cores = (trace.max_procs // nodes) if trace.max_procs else 8
    cluster = Cluster(nodes, cores, 12 * 1024**3)

    wall, cpu = time.perf_counter(), time.process_time()
    run_at = ScaledReplay(trace, faas, cluster, target=args.target)
    prepare_wall, prepare_cpu = time.perf_counter() - wall, time.process_time() - cpu
    runs: list[dict[str, Any]] = []

    def timed_run(scale: float, policies: Any) -> dict[str, dict[str, float]]:
        w, c = time.perf_counter(), time.process_time()
        out = run_at(scale, policies)
        summary = out[args.policy]
        runs.append(
            {
                "faas_scale": scale,
                "served_share": served_share(summary),
                "estimate": summary[ESTIMATE],
                "wall_s": time.perf_counter() - w,
                "cpu_s": time.process_time() - c,
            }
        )
        print(
            f"  scale {scale:10.4g}: served {served_share(summary):.4f}, "
            f"estimate {summary[ESTIMATE]:.4g}, wall {runs[-1]['wall_s']:.1f} s, "
            f"cpu {runs[-1]['cpu_s']:.1f} s",
            flush=True,
        )
        return out

    def timed_many(scales: Any, policy: str) -> list[dict[str, float]]:
        w, c, k = time.perf_counter(), time.process_time(), children_cpu()
        out = run_at.many(scales, policy)
        wall_s = time.perf_counter() - w
        cpu_s = time.process_time() - c + children_cpu() - k
        for scale, summary in zip(scales, out, strict=True):
            runs.append(
                {
                    "faas_scale": scale,
                    "served_share": served_share(summary),
                    "estimate": summary[ESTIMATE],
                    "wall_s": wall_s,
                    "cpu_s": cpu_s / len(scales),
                    "parallel": len(scales),
                }
            )
            print(
                f"  scale {scale:10.4g}: served {served_share(summary):.4f}, "
                f"estimate {summary[ESTIMATE]:.4g} ({len(scales)} in parallel: wall "
                f"{wall_s:.1f} s, cpu {cpu_s:.1f} s)",
                flush=True,
            )
        return out

    result = search_guided(
        timed_run,
        [args.policy],
        target=args.target,
        tolerance=args.tolerance,
        run_many=None if args.serial else timed_many,
    )
    total_wall = time.perf_counter() - wall0
    total_cpu = time.process_time() - cpu0 + children_cpu() - children0
    capacity = result.capacity[args.policy]
    above = [r["faas_scale"] for r in runs if r["faas_scale"] > capacity]
    first_below = min(above) if above else math.inf
    # baseline: the doubling search, every replay from scratch (prepare + loop)
    loop_cpu = sorted(r["cpu_s"] for r in runs)[len(runs) // 2]
    loop_wall = sorted(r["wall_s"] / r.get("parallel", 1) for r in runs)[len(runs) // 2]
    doubling_runs = (math.ceil(math.log2(capacity)) + 1 if capacity >= 1 else 1) + 4
    baseline_cpu = read_cpu + doubling_runs * (prepare_cpu + loop_cpu)
    baseline_wall = read_wall + doubling_runs * (prepare_wall + loop_wall)
    out: dict[str, Any] = {
        **run_header(args.swf, len(trace), nodes, cores, faas, args.policy, load_before),
        "target_served_share": args.target,
        "tolerance": args.tolerance,
        "capacity_faas_scale": capacity,
        "first_scale_below_target": first_below,
        "read": {"wall_s": read_wall, "cpu_s": read_cpu},
        "prepare_once": {"wall_s": prepare_wall, "cpu_s": prepare_cpu},
        "replays": runs,
        "total": {
            "wall_s": total_wall,
            "cpu_s": total_cpu,
            "replays": len(runs),
            "parallel_pairs": not args.serial,
        },
        "baseline_doubling_search_estimated": {
            "replays": doubling_runs,
            "cpu_s": baseline_cpu,
            "wall_s": baseline_wall,
            "how": "replays x (prepare + median loop) of this run, plus the read",
        },
        "capacity": result.to_dict(),
    }
    print()
    print(
        f"capacity search, policy {args.policy}, {len(trace)} jobs on {nodes} x {cores} cores; "
        f"load average {load_before[0]:.1f}"
    )
    print(f"{'what':<40} {'wall s':>8} {'cpu s':>8}")
    print(f"{'read SWF':<40} {read_wall:>8.1f} {read_cpu:>8.1f}")
    print(f"{'place + model once':<40} {prepare_wall:>8.1f} {prepare_cpu:>8.1f}")
    for r in runs:
        label = f"replay at {r['faas_scale']:.4g}x"
        print(f"{label:<40} {r['wall_s']:>8.1f} {r['cpu_s']:>8.1f}")
    print(f"{'guided search, total':<40} {total_wall:>8.1f} {total_cpu:>8.1f}")
    label = f"doubling search, {doubling_runs} replays (est.)"
    print(f"{label:<40} {baseline_wall:>8.1f} {baseline_cpu:>8.1f}")
    print(
        f"capacity {capacity:.4g}x the FaaS load at >= {args.target:.0%} served "
        f"(first scale below: {first_below:.4g}x); {len(runs)} replays; "
        f"{baseline_cpu / total_cpu:.1f}x less CPU than the doubling search"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / ("capacity.json" if not args.jobs else f"capacity-{args.jobs}.json")
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
