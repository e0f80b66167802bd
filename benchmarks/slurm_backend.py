"""One node query through each Slurm backend, on the real dev cluster, one run.

    .venv/bin/python benchmarks/slurm_backend.py [--node n1] [--rounds 60]

Submits two small jobs to ``--node`` (so there is something to report), then asks, per
round and backend, what the agent's sampler asks of Slurm for one node: ``jobs_on_node``
(the jobs, their CPU ids and memory) and ``node_info`` (the node's totals). Three cases:

- ``jobs_on_node, warm``: the backend object lives on (the CLI backend has cached each
  running job's CPU ids, so it runs ``squeue --json`` only);
- ``jobs_on_node, cold``: a fresh backend object each time (the CLI backend also runs one
  ``scontrol -o -d show job`` per job: what the first sample after a job starts costs);
- ``node_info``.

Rounds interleave the backends so that the load from other users of the machine falls on
both alike. Per query: wall latency (p50, p95) and CPU time (this process plus the Slurm
commands it runs, from ``getrusage``). Baseline: the CLI backend, measured in the same run;
the speed-up is CLI / pyslurm per case.

Prints a table and saves JSON to ``benchmarks/results/slurm_backend.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from slurm_plugin.slurm import CliSlurm, PyslurmSlurm, SlurmClient  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def cpu_seconds() -> float:
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def submit(node: str) -> str:
    out = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "-o",
            "/dev/null",
            "-c1",
            "--mem=100M",
            f"--nodelist={node}",
            "--wrap",
            "sleep 600",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip().split(";")[0]


def measure(fn: Callable[[], object]) -> tuple[float, float]:
    c0, t0 = cpu_seconds(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, cpu_seconds() - c0


def p(values: list[float], q: float) -> float:
    return sorted(values)[int(q * (len(values) - 1))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--node", default="n1")
    parser.add_argument("--rounds", type=int, default=60)
    args = parser.parse_args()
    node = args.node

    makers: dict[str, Callable[[], SlurmClient]] = {"cli": CliSlurm, "pyslurm": PyslurmSlurm}
    warm = {name: make() for name, make in makers.items()}
    cases: dict[str, Callable[[str], Callable[[], object]]] = {
        "jobs_on_node, warm": lambda b: lambda: warm[b].jobs_on_node(node),
        "jobs_on_node, cold": lambda b: lambda: makers[b]().jobs_on_node(node),
        "node_info": lambda b: lambda: warm[b].node_info(node),
    }
    jobs = [submit(node), submit(node)]
    try:
        deadline = time.monotonic() + 60
        while len(warm["cli"].jobs_on_node(node).items) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        seen = {b: len(warm[b].jobs_on_node(node).items) for b in warm}
        samples: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for _ in range(args.rounds):
            for case, build in cases.items():
                for backend in makers:
                    samples.setdefault((case, backend), []).append(measure(build(backend)))
    finally:
        subprocess.run(["scancel", *jobs], check=False)

    rows: list[dict[str, Any]] = []
    for (case, backend), got in samples.items():
        wall = [w for w, _ in got]
        cpu = [c for _, c in got]
        rows.append(
            {
                "case": case,
                "backend": backend + (" (baseline)" if backend == "cli" else ""),
                "queries": len(got),
                "latency_p50_ms": 1000 * statistics.median(wall),
                "latency_p95_ms": 1000 * p(wall, 0.95),
                "cpu_per_query_ms": 1000 * statistics.mean(cpu),
            }
        )
    speedup = {
        case: statistics.median(w for w, _ in samples[(case, "cli")])
        / statistics.median(w for w, _ in samples[(case, "pyslurm")])
        for case in cases
    }
    print(f"node {node}, jobs seen per backend {seen}, {args.rounds} rounds, load {load():.2f}")
    print(f"{'case':22} {'backend':18} {'p50 ms':>8} {'p95 ms':>8} {'CPU ms':>8}")
    for r in rows:
        print(
            f"{r['case']:22} {r['backend']:18} {r['latency_p50_ms']:8.2f} "
            f"{r['latency_p95_ms']:8.2f} {r['cpu_per_query_ms']:8.2f}"
        )
    for case, x in speedup.items():
        print(f"{case}: pyslurm {x:.1f}x faster than the CLI backend (p50 latency)")

    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {
        "benchmark": "slurm_backend",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": len(__import__("os").sched_getaffinity(0)),
            "python": platform.python_version(),
            "kernel": platform.release(),
            "load_1m": load(),
        },
        "slurm": warm["cli"].version(),
        "pyslurm": str(getattr(__import__("pyslurm"), "__version__", "?")),
        "node": node,
        "jobs_seen": seen,
        "rounds": args.rounds,
        "rows": rows,
        "speedup_p50_cli_over_pyslurm": speedup,
    }
    (RESULTS / "slurm_backend.json").write_text(json.dumps(out, indent=2) + "\n")
    return 0


def load() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


if __name__ == "__main__":
    raise SystemExit(main())
