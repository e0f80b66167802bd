"""The broker's lease book at scale: placing one lease and taking one agent report.

    .venv/bin/python benchmarks/leasebook.py [--nodes 1000,10000] [--json] [--label NAME]

For N nodes (4 cores, 16 GiB each, all reported live) with no lease, and with one lease on
every node, times (in-process, median of repeated calls):
- ``place``: ``LeaseBook.place(1 core, 64 MiB, best_fit)``, what every lease request does
  (the broker's event loop does nothing else meanwhile);
- ``report``: ``LeaseBook.report`` of one node (its one lease reconfirmed), what each of N
  agent reports does every second;
- ``place_scan`` (the same run's baseline): best_fit as it was before the free-capacity index,
  a scan of every live node's free capacity for the minimum;
- ``report_place``: one node's report (its offer changed) then a placement: the index
  re-sorts that node only.
Results are appended to ``benchmarks/results/leasebook.json`` under ``--label`` (e.g.
"before" / "after" a change), so one file holds the baseline and the change side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from policies.leasebook import LeaseBook, LeaseRecord  # noqa: E402

GIB = 1024**3
RESULTS = ROOT / "benchmarks" / "results" / "leasebook.json"


def book(nodes: int, leased: bool, now: float) -> LeaseBook:
    b = LeaseBook(node_timeout_s=10.0)
    for i in range(nodes):
        name = f"n{i:05d}"
        leases = (
            [LeaseRecord(f"l-{i}", name, (0,), 64 * 2**20, now, now + 3600, "tcp://x:1", 1)]
            if leased
            else []
        )
        b.report(name, f"http://a/{name}", range(4), 16 * GIB, leases, 1, now)
    return b


def scan_place(b: LeaseBook, cores: int, memory: int, now: float) -> str | None:
    """best_fit by scanning every live node (the code before the index)."""
    fitting = [f for f in b.available(now) if f.cores >= cores and f.memory_bytes >= memory]
    if not fitting:
        return None
    return min(fitting, key=lambda f: (f.cores - cores, f.memory_bytes - memory, f.node)).node


def timed(fn: Any, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="1000,10000")
    parser.add_argument("--label", default="current")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    now = 1_000_000.0
    rows = []
    for n in (int(x) for x in args.nodes.split(",")):
        for leased in (False, True):
            b = book(n, leased, now)
            repeat = 5 if leased and n >= 10000 else 20
            place_ms = timed(lambda b=b: b.place(1, 64 * 2**20, now + 1, "best_fit"), repeat)
            slot = b.place(1, 64 * 2**20, now + 1, "best_fit")
            assert slot is not None and slot.node == scan_place(b, 1, 64 * 2**20, now + 1)
            scan_ms = timed(lambda b=b: scan_place(b, 1, 64 * 2**20, now + 1), repeat)
            flip = iter(range(10**6))

            def report_place(b: LeaseBook = b, flip: Any = flip) -> None:
                cores = range(4) if next(flip) % 2 else range(3)  # the offer changes each time
                b.report("n00001", "http://a/n00001", cores, 16 * GIB, [], 1, now + 1)
                b.place(1, 64 * 2**20, now + 1, "best_fit")

            report_place_ms = timed(report_place, repeat)
            leases = (
                [LeaseRecord("l-0", "n00000", (0,), 64 * 2**20, now, now + 3600, "tcp://x:1", 1)]
                if leased
                else []
            )
            report_ms = timed(
                lambda b=b, leases=leases: b.report(
                    "n00000", "http://a/n00000", range(4), 16 * GIB, leases, 1, now + 1
                ),
                repeat,
            )
            rows.append(
                {
                    "nodes": n,
                    "leases": n if leased else 0,
                    "place_ms": round(place_ms, 4),
                    "place_scan_ms": round(scan_ms, 3),
                    "report_place_ms": round(report_place_ms, 4),
                    "report_ms": round(report_ms, 4),
                }
            )
            print(
                f"{args.label}: {n} nodes, {rows[-1]['leases']} leases: place {place_ms:.4f} ms "
                f"(scan of every node, same run: {scan_ms:.3f} ms), report {report_ms:.4f} ms, "
                f"report + place {report_place_ms:.4f} ms",
                file=sys.stderr,
            )
    doc = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    doc[args.label] = {
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "loadavg": os.getloadavg(),
        },
        "rows": rows,
    }
    RESULTS.write_text(json.dumps(doc, indent=2) + "\n")
    if args.json:
        print(json.dumps(doc[args.label]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
