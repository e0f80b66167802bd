"""Cost of a Prometheus scrape of one node with 50 jobs and 20 leases (budget: 50 ms).

Measures, in the same run:
- baseline: an HTTP GET of an empty registry (the exposition server's own cost);
- ``collect+render``: building the text in-process (no HTTP);
- ``scrape``: an HTTP GET of the fed registry, as Prometheus does it;
- ``update``: one agent cycle feeding the collector (money accrual included).

Usage: python benchmarks/metrics.py [--jobs 50] [--leases 20] [--repeat 300]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

# Scripts in benchmarks/ put this folder first on sys.path, where benchmarks/policies.py
# would shadow the ``policies`` package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import httpx  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402

from colocate.metrics import (  # noqa: E402
    ExecutorState,
    LeaseState,
    NodeCollector,
    NodeState,
    render,
    serve_metrics,
)
from monitors.snapshot import JobSnapshot, NodeSnapshot  # noqa: E402
from policies.model import Offer  # noqa: E402
from policies.prices import GIB, Prices  # noqa: E402

BUDGET_MS = 50.0


def node_state(t: float, jobs: int, leases: int) -> NodeState:
    cores = 4 * jobs
    job_list = tuple(
        JobSnapshot(
            job_id=str(100000 + j),
            user=f"user{j % 17}",
            cores_allocated=4,
            cpu_ids=tuple(range(4 * j, 4 * j + 4)),
            cores_used=1.5 + (j % 3) * 0.5,
            memory_allocated_bytes=8 * GIB,
            memory_used_bytes=(1 + j % 5) * GIB,
            memory_peak_bytes=6 * GIB,
            processes=4,
            cpu_pressure=3.0,
            memory_pressure=0.0,
            uid=1000 + j,
            start_time=t - 3600.0,
            cpu_seconds_total=1.5 * 3600 + t % 1000,
        )
        for j in range(jobs)
    )
    lease_list = tuple(
        LeaseState(f"lease-{i}", 1, GIB, "active", t - 60, t + 600) for i in range(leases)
    )
    executors = tuple(
        ExecutorState(f"ex-{i}", f"lease-{i}", "busy" if i % 2 else "idle", 0.7, GIB // 2)
        for i in range(leases)
    )
    snap = NodeSnapshot(
        node="bench-node",
        t=t,
        cores_total=cores + 8,
        cpu_ids=tuple(range(cores + 8)),
        memory_total_bytes=(8 * jobs + 64) * GIB,
        cores_unallocated=8,
        memory_unallocated_bytes=64 * GIB,
        jobs=job_list,
    )
    return NodeState(
        snap,
        offer=Offer(frozenset(range(leases + 4)), (leases + 4) * GIB),
        leases=lease_list,
        executors=executors,
    )


def timed_ms(fn: object, repeat: int) -> list[float]:
    assert callable(fn)
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000.0)
    return out


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median_ms": statistics.median(ordered),
        "p90_ms": ordered[int(0.9 * (len(ordered) - 1))],
        "p99_ms": ordered[int(0.99 * (len(ordered) - 1))],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--leases", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=300)
    args = parser.parse_args()

    empty_registry = CollectorRegistry()
    empty_server = serve_metrics(empty_registry, "127.0.0.1:0")
    registry = CollectorRegistry()
    collector = NodeCollector(Prices(), registry=registry)
    t0 = time.time()
    for i in range(10):  # some history, so money and per-job series exist
        collector.update(node_state(t0 + i, args.jobs, args.leases))
    events = collector.events("bench-node")
    for i in range(10_000):
        events.record_invocation("ok", 0.0001 * (1 + i % 50))
    for _ in range(50):
        events.record_eviction("pressure", 0.01)
    server = serve_metrics(registry, "127.0.0.1:0")
    tick = [t0 + 10]

    def update() -> None:
        tick[0] += 1
        collector.update(node_state(tick[0], args.jobs, args.leases))

    try:
        with httpx.Client() as client:
            for url in (empty_server.url, server.url):  # warm up connections and code paths
                for _ in range(20):
                    client.get(url)
            size = len(client.get(server.url).content)
            series = sum(
                1
                for line in render(registry).decode().splitlines()
                if line and not line.startswith("#")
            )
            rows = {
                "baseline: HTTP GET empty registry": summary(
                    timed_ms(lambda: client.get(empty_server.url), args.repeat)
                ),
                "collect+render (no HTTP)": summary(
                    timed_ms(lambda: render(registry), args.repeat)
                ),
                "scrape: HTTP GET fed registry": summary(
                    timed_ms(lambda: client.get(server.url), args.repeat)
                ),
                "update: one agent cycle": summary(timed_ms(update, args.repeat)),
            }
    finally:
        server.close()
        empty_server.close()

    scrape = rows["scrape: HTTP GET fed registry"]["median_ms"]
    base = rows["baseline: HTTP GET empty registry"]["median_ms"]
    print(
        f"node with {args.jobs} jobs, {args.leases} leases: {series} series, {size} bytes per scrape; {args.repeat} runs"
    )
    print(f"{'measurement':<36} {'median ms':>10} {'p90 ms':>8} {'p99 ms':>8}")
    for name, row in rows.items():
        print(f"{name:<36} {row['median_ms']:>10.3f} {row['p90_ms']:>8.3f} {row['p99_ms']:>8.3f}")
    verdict = "OK" if scrape <= BUDGET_MS else "OVER BUDGET"
    print(
        f"scrape median {scrape:.2f} ms = {scrape / base:.1f}x the empty-registry GET; budget {BUDGET_MS:g} ms: {verdict}"
    )

    out_dir = Path(__file__).resolve().parent / "results"
    out_dir.mkdir(exist_ok=True)
    result = {
        "benchmark": "metrics",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"python": platform.python_version(), "cpus": __import__("os").cpu_count()},
        "jobs": args.jobs,
        "leases": args.leases,
        "repeat": args.repeat,
        "series": series,
        "bytes": size,
        "rows": rows,
        "scrape_over_baseline": scrape / base,
        "budget_ms": BUDGET_MS,
        "within_budget": scrape <= BUDGET_MS,
    }
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0 if scrape <= BUDGET_MS else 1


if __name__ == "__main__":
    raise SystemExit(main())
