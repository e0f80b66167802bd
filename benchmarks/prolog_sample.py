"""A prolog's answer time while the agent loop samples the node (issue 16 item 4).

    .venv/bin/python benchmarks/prolog_sample.py [--node n3] [--runs 200]

The real Agent, SlurmNode.live (Slurm CLI + cgroups of the dev cluster node ``--node``),
SlurmControl and headroom policy; in-memory executors (nothing to evict) and a canned
``scontrol show job`` answer, so what is timed is the agent's own part of a prolog: the
node source's overlay, a decision on the latest sample, the report. Run round-robin:

- baseline: ``on_prolog`` + ``on_epilog`` with the agent loop idle;
- sampling: the same while a thread runs ``Agent.tick()`` back to back (each tick samples
  the node): the worst case of a busy loop (memory-watch wake-ups, growth rechecks).
  Before issue 16 the sample was taken under the agent lock, so a prolog waited for it, and
  a loop re-taking the lock at once could keep it waiting for many samples; it now waits
  for a decision at most.

Measured on this 2-core dev machine (load 7-12), 200 prologs each, back to back against
the commit before: before, p50/p99 0.34/391 ms and 0.37/298 ms while sampling (0.23/0.37
idle); after, 0.17/0.27 ms and 0.16/0.23 ms (0.23/0.33 idle).

Prints the sample time, both latencies (p50/p99) and their ratio, and writes
benchmarks/results/prolog_sample.json. Runs on any checkout (``PYTHONPATH`` picks the tree)
so an older commit can be measured the same way.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from colocate.lease_value import LeaseValue
from policies import get_policy
from policies.limits import Limits
from slurm_plugin.agent.agent import Agent
from slurm_plugin.agent.slurm_control import SlurmControl
from slurm_plugin.agent.slurm_node import SlurmNode
from slurm_plugin.control import EpilogRequest, PrologRequest
from slurm_plugin.slurm.cli import CliSlurm

OUT = Path(__file__).resolve().parent / "results" / "prolog_sample.json"


class Handle:
    def __init__(self, lease_id: str) -> None:
        self.lease_id = lease_id
        self.address = "tcp://127.0.0.1:9"
        self.pids = (1,)
        self.cpu_ids: tuple[int, ...] = ()
        self.memory_bytes = 0
        self.expires_at = 0.0
        self.adopted = False


class NoExecutors:
    detached = False

    def start(self, lease: LeaseValue) -> Handle:
        return Handle(lease.lease_id)

    def evict(self, lease_id: str, grace_s: float = 0.0, reason: str = "evicted") -> float:
        return 0.0

    def renew(self, lease_id: str, expires_at: float) -> None:
        pass

    def handles(self) -> list[Handle]:
        return []

    def exited(self) -> dict[str, tuple[int, ...]]:
        return {}

    def drain_invocations(self) -> list[dict[str, Any]]:
        return []

    def adopt_or_cleanup(self) -> list[str]:
        return []

    def close(self) -> None:
        pass


def canned_scontrol(node: str) -> CliSlurm:
    def runner(argv: Sequence[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
        job = argv[-1]
        text = f"JobId={job} JobName=x Nodes={node} CPU_IDs=0 Mem=100 GRES=\n"
        return subprocess.CompletedProcess(list(argv), 0, text, "")

    return CliSlurm(runner=runner)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--node", default="n3", help="dev cluster node to sample (default n3)")
    parser.add_argument("--runs", type=int, default=200, help="prologs per scenario")
    args = parser.parse_args()

    source = SlurmNode.live(args.node)
    agent = Agent(
        source,
        get_policy("headroom"),
        NoExecutors(),
        secret=b"s" * 32,
        url="http://127.0.0.1:9",
        broker_url="http://127.0.0.1:9",
        limits=Limits(),
    )
    control = SlurmControl(agent, source, canned_scontrol(args.node))
    samples: list[float] = []
    for _ in range(5):  # warm up: the first samples have no CPU window yet
        t0 = time.perf_counter()
        agent.tick()
        samples.append(time.perf_counter() - t0)

    stop = threading.Event()
    busy = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            if not busy.is_set():
                time.sleep(0.001)
                continue
            t0 = time.perf_counter()
            agent.tick()
            samples.append(time.perf_counter() - t0)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    times: dict[str, list[float]] = {"baseline": [], "sampling": []}
    job = 9_000_000
    try:
        for i in range(2 * args.runs):
            scenario = "sampling" if i % 2 else "baseline"
            if scenario == "sampling":
                busy.set()
                time.sleep(0.003)  # let the loop be inside a tick
            else:
                busy.clear()
                time.sleep(0.05)  # the loop finishes its tick
            job += 1
            t0 = time.perf_counter()
            control.on_prolog(PrologRequest(job_id=job, node=args.node), deadline=1e18)
            times[scenario].append(time.perf_counter() - t0)
            control.on_epilog(EpilogRequest(job_id=job, node=args.node))
    finally:
        stop.set()
        thread.join(5)
        control.close()
        source.close()

    def ms(values: list[float], q: float) -> float:
        return round(pct(values, q) * 1000, 3)

    result = {
        "machine": platform.node(),
        "node": args.node,
        "runs": args.runs,
        "sample_ms": {"p50": ms(samples, 50), "p99": ms(samples, 99), "n": len(samples)},
        "prolog_baseline_ms": {"p50": ms(times["baseline"], 50), "p99": ms(times["baseline"], 99)},
        "prolog_sampling_ms": {"p50": ms(times["sampling"], 50), "p99": ms(times["sampling"], 99)},
    }
    base = statistics.median(times["baseline"])
    result["sampling_vs_baseline_p50"] = round(statistics.median(times["sampling"]) / base, 2)
    print(f"agent prolog path while the loop samples node {args.node}, runs={args.runs}")
    print(f"{'what':<40}{'p50 ms':>10}{'p99 ms':>10}")
    print(f"{'one agent tick (sample + decide)':<40}{ms(samples, 50):>10}{ms(samples, 99):>10}")
    for name in ("baseline", "sampling"):
        label = "prolog, loop idle (baseline)" if name == "baseline" else "prolog, loop sampling"
        print(f"{label:<40}{ms(times[name], 50):>10}{ms(times[name], 99):>10}")
    print(f"sampling / baseline p50: {result['sampling_vs_baseline_p50']}x")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {OUT.relative_to(Path.cwd()) if OUT.is_relative_to(Path.cwd()) else OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
