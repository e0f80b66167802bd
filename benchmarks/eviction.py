"""Eviction latency of the Slurm-integrated agent: from the trigger to executor gone and memory free.

Triggers, each run round-robin with a baseline measured in the same run:

- **prolog**: the real hook process (``python -m slurm_plugin.hooks prolog``) asks a real agent
  (in this process: :class:`SlurmControl` behind a :class:`ControlServer`, the live monitor
  of a dev-cluster node, the headroom policy, real executors in cgroups) to start a job that
  holds the leased core. Measured: the agent's time from the request to the lease gone
  (``waited_s``: ``scontrol`` lookup, decision, executor killed, its cgroups removed), and the
  hook's wall time (process start to exit, what slurmd waits for). The hook's wall time with
  no lease to evict is the baseline for the hook itself.
- **memory**: a job's memory peak crosses the point where the lease no longer fits; measured
  from the decision that sees it (``Agent.tick``) to the lease gone. The node view is
  synthetic here (one job whose peak the benchmark raises); the policy, the agent and the
  executors are the real ones. The monitor adds up to one sampling interval before that
  decision (1 s by default; see the integration test for the live path).
- **baseline**: SIGKILL + waitpid of a plain child process holding 64 MiB.

Needs root and the dev cluster (``colocate dev-cluster up --nodes 3``); the node (``--node``,
default n3) gets one job for the prolog runs.

Usage: python benchmarks/eviction.py [--runs 100] [--node n3]
Prints a table and writes benchmarks/results/eviction.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from colocate.broker.api import StartRequest  # noqa: E402
from colocate.config import ExecutorConfig  # noqa: E402
from colocate.errors import LeaseDenied  # noqa: E402
from colocate.executor.supervisor import ExecutorSupervisor  # noqa: E402
from policies import get_policy  # noqa: E402
from policies.limits import Limits  # noqa: E402
from policies.model import JobView, NodeView, UsageSample  # noqa: E402
from slurm_plugin.agent.agent import Agent  # noqa: E402
from slurm_plugin.agent.slurm_control import SlurmControl  # noqa: E402
from slurm_plugin.agent.slurm_node import SlurmNode  # noqa: E402
from slurm_plugin.control import ControlServer  # noqa: E402
from slurm_plugin.slurm.cli import CliSlurm  # noqa: E402

PY = sys.executable
MiB = 1024**2
NOWHERE = "http://127.0.0.1:9"  # no broker: the benchmark starts leases itself
HALF_BUSY = (
    "import os, time\n"
    "os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
    "while True:\n"
    "    t = time.time()\n"
    "    while time.time() - t < 0.05: pass\n"
    "    time.sleep(0.05)\n"
)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


class SyntheticNode:
    """Two cores, 4 GiB, one job on core 0 with 3.5 GiB whose memory peak the benchmark sets."""

    node = "bench-mem"

    def __init__(self) -> None:
        self.peak = 200 * MiB

    def view(self, now: float) -> NodeView:
        history = tuple(UsageSample(now - 60 + i, 0.5, self.peak) for i in range(60))
        job = JobView("1", frozenset({0}), 3584 * MiB, self.peak, history, True, now - 120)
        return NodeView(self.node, frozenset({0, 1}), 4096 * MiB, (job,))

    def recent_view(self, now: float) -> NodeView:
        return self.view(now)

    last_snapshot = None


def kill_baseline() -> float:
    child = subprocess.Popen(
        [
            PY,
            "-c",
            "import sys, time; x = bytearray(64 << 20); print(1, flush=True); time.sleep(100)",
        ],
        stdout=subprocess.PIPE,
    )
    assert child.stdout is not None
    child.stdout.readline()
    started = time.monotonic()
    child.kill()
    child.wait()
    return time.monotonic() - started


def submit_job(node: str) -> str:
    out = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "-w",
            node,
            "-c2",
            "--mem=300M",
            "-o",
            "/dev/null",
            "--wrap",
            f"{PY} -c '{HALF_BUSY}'",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    for _ in range(600):
        state = subprocess.run(
            ["squeue", "-h", "-j", out, "-o", "%T"], capture_output=True, text=True
        ).stdout.strip()
        if state == "RUNNING":
            return out
        time.sleep(0.1)
    raise SystemExit(f"job {out} did not start on {node}; is the dev cluster up and {node} idle?")


GROWER = """
import os, sys, time
step, go = int(sys.argv[1]), sys.argv[2]
blocks = [bytearray(1700 << 20)]
for i in range(0, len(blocks[0]), 4096):
    blocks[0][i] = 1
print("ready", flush=True)
n = 0
while True:
    if os.path.exists(f"{go}-{n}"):
        block = bytearray(step)
        for i in range(0, step, 4096):
            block[i] = 1
        blocks.append(block)
        print("grown", n, flush=True)
        n += 1
    time.sleep(0.002)
"""


def live_memory_runs(
    node: str, runs: int, tmp: Path, secret: bytes, limits: Limits
) -> tuple[list[float], list[str]]:
    """Memory growth on a live node: a real job grows by 64 MiB on command; the agent's loop
    runs with its memory watch (cgroup v1 threshold eventfd). Latency: from the notification
    that led to the eviction to the lease gone (executor killed, cgroups removed)."""
    from slurm_plugin.agent.memory_watch import MemoryWatch

    script = tmp / "grower.py"
    script.write_text(GROWER)
    go = tmp / "grow"
    job = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "-w",
            node,
            "-c2",
            "--mem=3500M",
            "-o",
            str(tmp / "grower.out"),
            "--wrap",
            f"{PY} {script} {64 * MiB} {go}",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    source = SlurmNode.live(node)
    supervisor = ExecutorSupervisor(
        ExecutorConfig(), secret, node=node, state_dir=str(tmp / "live")
    )
    agent = Agent(
        source,
        get_policy("headroom"),
        supervisor,
        secret=secret,
        url=NOWHERE,
        broker_url=NOWHERE,
        limits=limits,
        interval_s=1.0,
    )
    fired: list[float] = []

    def wake() -> None:
        fired.append(time.time())
        agent.wake()

    watch = MemoryWatch.for_node(node, wake)
    loop = threading.Thread(target=agent.run, daemon=True)
    latencies: list[float] = []
    failures: list[str] = []
    try:
        deadline = time.monotonic() + 60
        while not ((tmp / "grower.out").exists() and "ready" in (tmp / "grower.out").read_text()):
            if time.monotonic() > deadline:
                raise SystemExit(f"the growing job {job} did not start on {node}")
            time.sleep(0.1)
        time.sleep(limits.min_history_s + 1.5)
        watch.start()
        loop.start()
        for i in range(min(runs, 22)):  # from 3150 MiB on, the job keeps its whole 3500 MiB
            for _ in range(100):
                report = agent.report()
                if report.cpu_ids and report.memory_bytes > 128 * MiB:
                    break
                time.sleep(0.05)
            else:
                failures.append(f"live memory run {i}: nothing offered")
                break
            now = time.time()
            lease_id = f"live-{i}"
            for held in report.leases:  # a run that did not evict leaves its lease
                agent.revoke(held.lease_id, 0.0, "released")
            report = agent.report()
            try:
                agent.start_lease(
                    StartRequest(
                        lease_id=lease_id,
                        cpu_ids=[max(report.cpu_ids)],
                        memory_bytes=report.memory_bytes - 16 * MiB,
                        granted_at=now,
                        expires_at=now + 600,
                    )
                )
            except LeaseDenied as exc:
                failures.append(f"live memory run {i}: {exc}")
                continue
            touched = time.time()
            (tmp / f"grow-{i}").touch()
            end = time.monotonic() + 10
            record = None
            while time.monotonic() < end and record is None:
                record = next((r for r in list(agent.evictions) if r.lease_id == lease_id), None)
                time.sleep(0.005)
            if record is None or record.reason != "memory_growth":
                failures.append(f"live memory run {i}: {record}")
                continue
            # The next run starts once this growth is over and the watch re-armed.
            grown = f"grown {i}\n"
            while time.monotonic() < end and grown not in (tmp / "grower.out").read_text():
                time.sleep(0.01)
            time.sleep(0.2)
            before = [t for t in fired if touched <= t <= record.at]
            if not before:
                failures.append(
                    f"live memory run {i}: evicted without a notification (at the interval)"
                )
            else:
                latencies.append(record.at - before[-1])
                if os.environ.get("EVICTION_DEBUG"):
                    print(
                        i,
                        f"{(record.at - before[-1]) * 1e3:.1f} ms evict {record.seconds * 1e3:.1f} ms",
                        [round(t - record.at, 3) for t in fired[-4:]],
                        file=sys.stderr,
                    )
    finally:
        agent.stop()
        watch.close()
        loop.join(5)
        agent.shutdown()
        supervisor.close()
        source.close()
        subprocess.run(["scancel", job], check=False)
    return latencies, failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100, help="runs per scenario")
    parser.add_argument(
        "--node", default="n3", help="dev-cluster node for the prolog and live memory runs"
    )
    parser.add_argument(
        "--live-runs",
        type=int,
        default=22,
        help="live memory-growth runs (one job grows 64 MiB per run; at most 22)",
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "eviction.json"
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (cgroups, executors dropping to nobody)")

    secret = secrets.token_bytes(32)
    tmp = Path(tempfile.mkdtemp(prefix="colocate-evb-"))
    limits = Limits(min_history_s=2.0)
    job_id = submit_job(args.node)
    source = SlurmNode.live(args.node)
    supervisor = ExecutorSupervisor(
        ExecutorConfig(), secret, node=args.node, state_dir=str(tmp / "s")
    )
    agent = Agent(
        source,
        get_policy("headroom"),
        supervisor,
        secret=secret,
        url=NOWHERE,
        broker_url=NOWHERE,
        limits=limits,
    )
    control = ControlServer(tmp / "agent.sock", SlurmControl(agent, source, CliSlurm()))
    control.start()
    synthetic = SyntheticNode()
    mem_supervisor = ExecutorSupervisor(
        ExecutorConfig(), secret, node=synthetic.node, state_dir=str(tmp / "m")
    )
    mem_agent = Agent(
        synthetic,
        get_policy("headroom"),
        mem_supervisor,
        secret=secret,
        url=NOWHERE,
        broker_url=NOWHERE,
        limits=limits,
    )
    hook = [
        PY,
        "-m",
        "slurm_plugin.hooks",
        "prolog",
        "--no-syslog",
        "--json",
        "--socket",
        str(control.path),
    ]
    env = {
        "SLURM_JOB_ID": job_id,
        "SLURMD_NODENAME": args.node,
        "SLURM_JOB_UID": "0",
        "SLURM_JOB_CPUS_PER_NODE": "2",
    }
    samples: dict[str, list[float]] = {
        k: []
        for k in (
            "prolog: agent, request to lease gone",
            "prolog: hook wall time, 1 lease evicted",
            "prolog: hook wall time, nothing to evict (baseline)",
            "memory: decision to lease gone",
            "memory: executor kill + cgroup removal",
            "SIGKILL + waitpid, plain child (baseline)",
        )
    }
    count = 0

    def lease_on_offer(on: Agent) -> str:
        nonlocal count
        for _ in range(100):
            on.tick()
            cores = sorted(on.report().cpu_ids)
            if cores:
                break
            time.sleep(0.1)
        else:
            raise SystemExit(
                f"{on.node} offers no core (the job needs {limits.min_history_s} s of history)"
            )
        count += 1
        now = time.time()
        memory = 64 * MiB
        if on is mem_agent:
            memory = on.report().memory_bytes - 100 * MiB
        lease_id = f"bench-{count}"
        on.start_lease(
            StartRequest(
                lease_id=lease_id,
                cpu_ids=[cores[-1]],
                memory_bytes=memory,
                granted_at=now,
                expires_at=now + 600,
            )
        )
        return lease_id

    def run_hook() -> tuple[float, dict[str, Any]]:
        started = time.monotonic()
        proc = subprocess.run(hook, env=env, capture_output=True, text=True)
        wall = time.monotonic() - started
        return wall, json.loads(proc.stdout or "{}")

    failures: list[str] = []
    try:
        time.sleep(limits.min_history_s + 1.5)
        for i in range(args.runs + 1):  # the first round warms up
            keep = i > 0
            lease_id = lease_on_offer(agent)
            wall, outcome = run_hook()
            reply = outcome.get("reply", {})
            if lease_id not in reply.get("evicted", []) or agent.report().leases:
                failures.append(f"prolog run {i}: {outcome}")
            elif keep:
                samples["prolog: agent, request to lease gone"].append(float(reply["waited_s"]))
                samples["prolog: hook wall time, 1 lease evicted"].append(wall)
            wall, outcome = run_hook()
            if keep:
                samples["prolog: hook wall time, nothing to evict (baseline)"].append(wall)
            agent.tick()  # the job is known again: its idle core comes back
            synthetic.peak = 200 * MiB
            mem_agent.tick()
            lease_id = lease_on_offer(mem_agent)
            synthetic.peak = 2048 * MiB  # the job's peak + margin now overlaps the leased memory
            started = time.monotonic()
            ended = mem_agent.tick()
            took = time.monotonic() - started
            record = mem_agent.evictions[-1] if mem_agent.evictions else None
            if lease_id not in ended or record is None or record.reason != "memory_growth":
                failures.append(f"memory run {i}: ended {ended}, last eviction {record}")
            elif keep:
                samples["memory: decision to lease gone"].append(took)
                samples["memory: executor kill + cgroup removal"].append(record.seconds)
            if keep:
                samples["SIGKILL + waitpid, plain child (baseline)"].append(kill_baseline())
    finally:
        control.close()
        supervisor.close()
        mem_supervisor.close()
        source.close()
        subprocess.run(["scancel", job_id], check=False)
    time.sleep(2.0)  # the job's cores are free again
    live, live_failures = live_memory_runs(args.node, args.live_runs, tmp, secret, limits)
    samples["memory, live: threshold notification to lease gone"] = live
    failures += live_failures

    rows = []
    for name, values in samples.items():
        if not values:
            continue
        rows.append(
            {
                "scenario": name,
                "runs": len(values),
                "p50_ms": statistics.median(values) * 1e3,
                "p99_ms": pct(values, 99) * 1e3,
                "max_ms": max(values) * 1e3,
            }
        )
    print(
        f"eviction latency, {args.runs} runs each ({platform.node()}, {os.cpu_count()} cores, "
        f"load {os.getloadavg()[0]:.2f}); target p99 <= 100 ms"
    )
    print(f"{'scenario':52} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for r in rows:
        print(f"{r['scenario']:52} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f} {r['max_ms']:8.1f}")
    if failures:
        print(f"{len(failures)} runs did not evict as expected; first: {failures[0]}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "benchmark": "eviction",
                "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "python": sys.version.split()[0],
                "cores": os.cpu_count(),
                "runs": args.runs,
                "load": os.getloadavg()[0],
                "rows": rows,
                "failures": failures[:10],
            },
            indent=2,
        )
        + "\n"
    )
    print(f"saved {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
