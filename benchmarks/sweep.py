"""Replay sweep engines: 32 HPC2N replays sequentially, as a Slurm job array, on Dask.

    .venv/bin/python benchmarks/sweep.py [--sweep-dir DIR] [--workers N] [--no-slurm] [--json]

The sweep: policies headroom and predictive x seeds 0-3 x max_function_share 0.25, 0.5,
0.75, 1.0 on the bundled HPC2N excerpt (120 nodes x 2 cores, 30 days) with the Azure 2019
slice: 32 full replays, none cut down. Measured in one run, the baseline first:
- sequential: every trial in this process, one after another (``LocalRunner(1)``);
- local processes: ``LocalRunner(--workers)``;
- Slurm job array on the dev cluster (``SlurmArrayRunner``: one task per trial, 1 CPU each;
  trials and results in ``--sweep-dir``, which every node must see);
- Dask: a ``LocalCluster`` of ``--workers`` single-threaded worker processes.
For each: wall seconds, the speed-up against the sequential run, and whether the rows equal
the sequential rows (timing fields excluded). Saves ``benchmarks/results/sweep.json``.

On this machine every engine shares 2 cores (the dev cluster's 3 nodes of 2 CPUs are the
same 2 cores), with other engineers' load: the speed-up is bounded by 2 here; the point is
the overhead of each engine and the equality of results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from colocate.sweep import DaskRunner, LocalRunner, SlurmArrayRunner  # noqa: E402
from traces import bundled  # noqa: E402
from traces.sweep import Grid, comparable, expand  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def grid() -> Grid:
    trace = {
        "jobs": str(bundled.HPC2N_EXCERPT),
        "jobs_format": "swf",
        "faas": str(bundled.AZURE2019),
        "faas_format": "azure2019",
        "nodes": bundled.HPC2N_NODES,
        "cores_per_node": bundled.HPC2N_CORES_PER_NODE,
        "memory_per_node_bytes": bundled.HPC2N_MEMORY_PER_NODE,
    }
    return Grid(
        traces=[trace],
        policies=["headroom", "predictive"],
        seeds=[0, 1, 2, 3],
        limits={"max_function_share": [0.25, 0.5, 0.75, 1.0]},
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sweep-dir", help="shared directory for the Slurm array (default: a temporary one)"
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--no-slurm", action="store_true", help="skip the Slurm job array")
    parser.add_argument("--json", action="store_true", help="print the JSON instead of the table")
    args = parser.parse_args()

    trials = expand(grid())
    runs: list[dict[str, Any]] = []
    load_before = os.getloadavg()
    reference = ""
    with tempfile.TemporaryDirectory(prefix="colocate-sweep-") as tmp:
        engines: list[tuple[str, Any]] = [
            ("sequential", LocalRunner(1)),
            (f"local processes x{args.workers}", LocalRunner(args.workers)),
        ]
        if not args.no_slurm:
            engines.append(
                ("Slurm job array", SlurmArrayRunner(args.sweep_dir or tmp, timeout_s=1800))
            )
        engines.append((f"Dask LocalCluster x{args.workers}", DaskRunner(workers=args.workers)))
        for name, runner in engines:
            started = time.perf_counter()
            rows = runner.run(trials)
            wall = time.perf_counter() - started
            same = comparable(rows)
            if not reference:
                reference = same
            trial_s = sorted(r["summary"]["trial_wall_s"] for r in rows)
            runs.append(
                {
                    "engine": name,
                    "wall_s": wall,
                    "speedup_vs_sequential": runs[0]["wall_s"] / wall if runs else 1.0,
                    "rows_equal_sequential": same == reference,
                    "trial_wall_s_p50": trial_s[len(trial_s) // 2],
                    "recovered_cost_sum": sum(r["summary"]["recovered_cost"] for r in rows),
                }
            )
            print(f"{name}: {wall:.1f} s", file=sys.stderr)
    doc = {
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
        "trials": len(trials),
        "sweep": "HPC2N excerpt, headroom+predictive x seeds 0-3 x max_function_share 0.25/0.5/0.75/1.0",
        "runs": runs,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sweep.json").write_text(json.dumps(doc, indent=2) + "\n")
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(
            f"{len(trials)} HPC2N replays; load {load_before[0]:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
        )
        print(f"{'engine':<28} {'wall s':>8} {'x sequential':>12} {'equal':>6} {'trial p50 s':>11}")
        for r in runs:
            print(
                f"{r['engine']:<28} {r['wall_s']:>8.1f} {r['speedup_vs_sequential']:>12.2f} "
                f"{'yes' if r['rows_equal_sequential'] else 'NO':>6} {r['trial_wall_s_p50']:>11.2f}"
            )
    return 0 if all(r["rows_equal_sequential"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
