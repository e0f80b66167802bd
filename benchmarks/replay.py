"""Replay speed: RICC-2010-2 (447,794 jobs, 1024 nodes x 8 cores) with the Azure 2019 slice.

    .venv/bin/python benchmarks/replay.py [--swf PATH] [--accasim-jobs N] [--policy NAME]

Measures, in one run:
- reading the SWF trace;
- the replay (one policy: ``headroom`` when registered) at 10 %, 50 % and 100 % of the jobs
  (first jobs by start time), wall and CPU seconds, to show linear growth;
- the baseline: AccaSim (PyPI ``accasim``, FIFO dispatcher + first-fit allocator) simulating
  the first ``--accasim-jobs`` jobs of the same SWF; our replay on the same subset too.

Where ``scripts/setup`` compiled the replay's loop with mypyc (:mod:`traces.compiled`), the
run says so, and replays the same subset again with the interpreted loop (a child process
with ``COLOCATE_PURE=1``, one warm-up replay first) to show what the compiler adds.

Prints a table and saves JSON in ``benchmarks/results/replay.json``. The machine is shared:
CPU seconds (``time.process_time``) are less disturbed by other load than wall seconds, so
both are reported, with the load average.

AccaSim 1.1.3 imports ``collections.Mapping`` (removed in Python 3.10); the benchmark aliases
the ``collections.abc`` names before importing it. AccaSim schedules jobs (queue, dispatch),
our replay places them at their recorded starts and drives a policy and FaaS demand: the
ratio compares jobs per second of two trace-driven simulators, not the same computation.
"""

from __future__ import annotations

import argparse
import collections
import collections.abc
import gzip
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from policies import POLICIES  # noqa: E402
from traces import bundled, compiled  # noqa: E402
from traces.azure import read_azure2019  # noqa: E402
from traces.placement import Cluster  # noqa: E402
from traces.replay import replay  # noqa: E402
from traces.swf import read_swf  # noqa: E402

RICC = Path("/work/shared/data/traces/swf/RICC-2010-2.swf.gz")
RESULTS = ROOT / "benchmarks" / "results"


def run_header(
    swf: Path, jobs: int, nodes: int, cores: int, faas: Any, policy: str, load_before: Any
) -> dict[str, Any]:
    """What every replay benchmark's JSON says about its machine, trace, FaaS trace and policy
    (benchmarks/capacity.py uses it too)."""
    return {
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
        "trace": {"path": str(swf), "jobs": jobs, "nodes": nodes, "cores_per_node": cores},
        "faas": {"path": str(bundled.AZURE2019), "functions": len(faas.function_ids)},
        "policy": policy,
    }


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - wall, time.process_time() - cpu


def accasim_run(swf: Path, jobs: int, nodes: int, cores: int, workdir: Path) -> dict[str, float]:
    """AccaSim (FIFO + first fit) on the first ``jobs`` job lines of ``swf``."""
    for name in ("Mapping", "MutableMapping", "Sequence", "Iterable", "Callable"):
        if not hasattr(collections, name):
            setattr(collections, name, getattr(collections.abc, name))
    import logging

    from accasim.base.allocator_class import FirstFit
    from accasim.base.scheduler_class import FirstInFirstOut
    from accasim.base.simulator_class import Simulator

    logging.getLogger("accasim").setLevel(logging.WARNING)
    subset = workdir / "subset.swf"
    with gzip.open(swf, "rt") as src, subset.open("w") as dst:
        written = 0
        for line in src:
            if not line.startswith(";"):
                if written >= jobs:
                    break
                written += 1
            dst.write(line)
    config = workdir / "sys.config"
    config.write_text(
        json.dumps(
            {
                "groups": {"g0": {"core": cores, "mem": 12_000_000}},
                "resources": {"g0": nodes},
                "equivalence": {"processor": {"core": 1}},
            }
        )
    )
    simulator, wall, cpu = timed(
        Simulator,
        str(subset),
        str(config),
        FirstInFirstOut(FirstFit()),
        RESULTS_FOLDER_PATH=str(workdir / "results"),
        scheduling_output=False,
        statistics_output=False,
        show_statistics=False,
    )
    _, wall2, cpu2 = timed(simulator.start_simulation)
    return {
        "jobs": float(written),
        "jobs_loaded": float(simulator.loaded_jobs),
        "jobs_dispatched": float(simulator.dispatched_jobs),
        "wall_s": wall + wall2,
        "cpu_s": cpu + cpu2,
    }


def first_jobs(trace: Any, jobs: int) -> Any:
    """The first ``jobs`` jobs of the file (file order, as AccaSim reads them)."""
    return trace.take(trace.job_id <= trace.job_id[min(jobs, len(trace)) - 1])


def source_loop_on_subset(args: argparse.Namespace) -> dict[str, Any]:
    """Our replay of the same first jobs with the interpreted loop, in a child process."""
    cmd = [sys.executable, __file__, "--swf", str(args.swf), "--policy", args.policy]
    cmd += ["--accasim-jobs", str(args.accasim_jobs), "--subset-only"]
    env = {**os.environ, compiled.PURE_ENV: "1"}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"the interpreted-loop run failed: {out.stderr.strip()[-500:]}")
    figures: dict[str, Any] = json.loads(out.stdout)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--swf", type=Path, default=RICC)
    parser.add_argument("--accasim-jobs", type=int, default=20000)
    parser.add_argument("--policy", default="headroom" if "headroom" in POLICIES else "unallocated")
    parser.add_argument("--skip-accasim", action="store_true")
    # internal: time our replay of the AccaSim subset only (after one warm-up), print JSON
    parser.add_argument("--subset-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.swf.exists():
        print(f"{args.swf}: not found; pass --swf PATH to RICC-2010-2.swf.gz", file=sys.stderr)
        return 1
    load_before = os.getloadavg()
    faas = read_azure2019(bundled.AZURE2019)
    trace, read_wall, read_cpu = timed(read_swf, args.swf)
    nodes = trace.max_nodes or 1024
    cores = (trace.max_procs // nodes) if trace.max_procs else 8
    cluster = Cluster(nodes, cores, 12 * 1024**3)
    if args.subset_only:
        same = first_jobs(trace, args.accasim_jobs)
        replay(same, faas, cluster, [args.policy], seed=0)  # warm-up
        _, wall, cpu = timed(replay, same, faas, cluster, [args.policy], seed=0)
        figures = {"jobs": len(same), "wall_s": wall, "cpu_s": cpu, "loop": compiled.running()}
        print(json.dumps(figures))
        return 0
    loop = compiled.running()
    print(f"replay loop: {loop} (traces.compiled; COLOCATE_PURE=1 runs the source)", flush=True)
    rows: list[dict[str, Any]] = []
    for share in (0.1, 0.5, 1.0):
        subset = trace.head(int(len(trace) * share))
        result, wall, cpu = timed(replay, subset, faas, cluster, [args.policy], seed=0)
        summary = result.policies[args.policy].summary
        rows.append(
            {
                "share": share,
                "jobs": len(subset),
                "events": summary["events"],
                "decisions": summary["decisions"],
                "wall_s": wall,
                "cpu_s": cpu,
                "jobs_per_cpu_s": len(subset) / cpu,
                "timings_s": result.info["timings_s"],
            }
        )
        print(
            f"  {share:>4.0%}: {len(subset):>7} jobs  wall {wall:6.2f} s  cpu {cpu:6.2f} s",
            flush=True,
        )

    accasim: dict[str, float] | None = None
    ours_same: dict[str, float] | None = None
    if not args.skip_accasim:
        with tempfile.TemporaryDirectory() as tmp:
            accasim = accasim_run(args.swf, args.accasim_jobs, nodes, cores, Path(tmp))
        # our replay on the same first jobs of the file (file order, as AccaSim reads them)
        same = first_jobs(trace, args.accasim_jobs)
        _, wall, cpu = timed(replay, same, faas, cluster, [args.policy], seed=0)
        ours_same = {"jobs": float(len(same)), "wall_s": wall, "cpu_s": cpu}
    compare = loop == "compiled" and not args.skip_accasim
    source_same = source_loop_on_subset(args) if compare else None

    full = rows[-1]
    out: dict[str, Any] = {
        **run_header(args.swf, len(trace), nodes, cores, faas, args.policy, load_before),
        "read": {"wall_s": read_wall, "cpu_s": read_cpu},
        "replay": rows,
        "total_100pct": {"wall_s": read_wall + full["wall_s"], "cpu_s": read_cpu + full["cpu_s"]},
        "replay_loop": loop,
        "accasim": accasim,
        "ours_on_accasim_subset": ours_same,
        "ours_on_accasim_subset_source_loop": source_same,
    }
    if accasim and ours_same:
        acc_rate = accasim["jobs"] / accasim["cpu_s"]
        out["ratio_jobs_per_s"] = {
            "full_trace_vs_accasim_subset_cpu": full["jobs_per_cpu_s"] / acc_rate,
            "same_subset_cpu": (ours_same["jobs"] / ours_same["cpu_s"]) / acc_rate,
            "same_subset_wall": (ours_same["jobs"] / ours_same["wall_s"])
            / (accasim["jobs"] / accasim["wall_s"]),
        }
        if source_same:
            out["ratio_jobs_per_s"]["same_subset_cpu_source_loop"] = (
                source_same["jobs"] / source_same["cpu_s"]
            ) / acc_rate

    print()
    print(
        f"RICC replay, policy {args.policy}, {nodes} nodes x {cores} cores; load average {load_before[0]:.1f}"
    )
    print(f"{'what':<34} {'jobs':>8} {'wall s':>8} {'cpu s':>8} {'jobs/cpu-s':>11}")
    print(f"{'read SWF':<34} {len(trace):>8} {read_wall:>8.2f} {read_cpu:>8.2f} {'':>11}")
    for r in rows:
        print(
            f"{'replay ' + format(r['share'], '.0%'):<34} {r['jobs']:>8} {r['wall_s']:>8.2f} {r['cpu_s']:>8.2f} {r['jobs_per_cpu_s']:>11,.0f}"
        )
    t = out["total_100pct"]
    print(f"{'read + replay 100 %':<34} {len(trace):>8} {t['wall_s']:>8.2f} {t['cpu_s']:>8.2f}")
    if accasim and ours_same:
        print(
            f"{'AccaSim FIFO+FirstFit (baseline)':<34} {accasim['jobs']:>8.0f} {accasim['wall_s']:>8.2f} {accasim['cpu_s']:>8.2f} {accasim['jobs'] / accasim['cpu_s']:>11,.0f}"
        )
        print(
            f"{'colocate replay (' + loop + '), same jobs':<34} {ours_same['jobs']:>8.0f} {ours_same['wall_s']:>8.2f} {ours_same['cpu_s']:>8.2f} {ours_same['jobs'] / ours_same['cpu_s']:>11,.0f}"
        )
        if source_same:
            print(
                f"{'  same jobs, interpreted loop':<34} {source_same['jobs']:>8.0f} {source_same['wall_s']:>8.2f} {source_same['cpu_s']:>8.2f} {source_same['jobs'] / source_same['cpu_s']:>11,.0f}"
            )
        ratio = out["ratio_jobs_per_s"]
        print(
            f"ratio jobs/s vs AccaSim ({loop} loop): same jobs {ratio['same_subset_cpu']:.1f}x (cpu), "
            f"{ratio['same_subset_wall']:.1f}x (wall); full trace vs AccaSim {ratio['full_trace_vs_accasim_subset_cpu']:.1f}x (cpu)"
        )
        if source_same:
            print(
                f"  interpreted loop, same jobs: {ratio['same_subset_cpu_source_loop']:.1f}x (cpu)"
            )
    per_job = [r["cpu_s"] / r["jobs"] * 1e6 for r in rows]
    print("cpu us per job at 10/50/100 %: " + ", ".join(f"{v:.1f}" for v in per_job))
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "replay.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
