"""What the agent lends for each job shape, how long a lease lasts, how fast growth takes it back.

On the real dev cluster (root, ``colocate dev-cluster up``), with the shipped default limits
and agent interval: one broker and one ``colocate agent`` on an idle 2-CPU node, then for each
job shape (``-c2``) in turn:

- ``one_busy``: a plain busy loop (one core busy, one idle), that later turns its second core on;
- ``half``: one thread at 50 %;
- ``floating``: two processes at 50 % each floating over both cores (1.0 in total).

Per shape: the cores offered and how long after the job's start, the lease on them held for
``--steady-s`` seconds while a client invokes every second (lifetime, evictions), and for the
growth shape the time from the job turning its second core on to the lease gone
(``cpu_growth``), over ``--growth-trials`` jobs (p50/p99).

Baseline for the growth latency, same run: as many growth trials with an agent whose
``growth_recheck_s`` is its interval (1 s), i.e. without the quick confirming sample a
suspected growth brings forward (before issue 15's fix, every sample a whole interval apart).

Baselines from the same run: the old rule's offer, ``2 - ceil(max cores_used + 0.25)``,
computed on the very readings the agent reported during the steady window; and a bare
SIGKILL + waitpid of a process (the floor under any eviction latency).

Writes ``benchmarks/results/lending.json``. ``--quick``: 30 s steady, 2 growth trials.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from colocate import LeaseDenied  # noqa: E402
from colocate.client.lease import Client, Lease  # noqa: E402
from slurm_plugin.devcluster import CONTROL_SOCKET  # noqa: E402
from tests.integration.conftest import JobSubmitter, SlurmCluster, _cluster_nodes  # noqa: E402
from tests.integration.leasing import (  # noqa: E402
    Service,
    _launch,
    _ready,
    free_port,
    start_broker,
    wait_until,
)
from tests.integration.slurm_agent import (  # noqa: E402
    SlurmAgent,
    idle_node,
    job_cpus,
)
from tests.integration.test_slurm_agent_lending import (  # noqa: E402
    FLOATING,
    HALF,
    LEASE_MEMORY,
    ONE_BUSY,
    TURNS_SECOND_ON,
    _start_agent,
    where,
)

OLD_CORE_MARGIN = 0.25  # the rule before issue 15: need = ceil(max cores_used + 0.25)


def start_agent_rechecking(tmp: Path, broker: Service, node: str, recheck_s: float) -> SlurmAgent:
    """``colocate agent`` for ``node`` like the tests' one, with ``growth_recheck_s`` set."""
    state = tempfile.mkdtemp(prefix=f"colocate-{node}-")
    metrics_port = free_port()
    config = tmp / f"agent-{node}-recheck.toml"
    config.write_text(
        "[agent]\n"
        f'control_socket = "{CONTROL_SOCKET}"\n'
        f'metrics_listen = "127.0.0.1:{metrics_port}"\n'
        'listen = "127.0.0.1:0"\n'
        f"growth_recheck_s = {recheck_s}\n"
    )
    argv = [
        "agent", "--config", str(config), "--node", node, "--broker", broker.url,
        "--secret-file", str(tmp / "secret"), "--state-dir", state,
    ]  # fmt: skip
    log = tmp / f"agent-{node}-{time.monotonic_ns()}.log"
    service = _ready(f"agent {node}", _launch(argv, log), log)
    return SlurmAgent(node, service, broker, tmp, state, config, metrics_port)


def summary(values: list[float]) -> dict[str, Any]:
    return {
        "n": len(values),
        "p50": round(statistics.median(values), 3) if values else None,
        "p99": round(percentile(values, 99), 3) if values else None,
    }


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def bare_kill_latency(n: int = 100) -> list[float]:
    """SIGKILL + waitpid of a sleeping child, seconds: the floor of any eviction."""
    out = []
    for _ in range(n):
        child = subprocess.Popen(["sleep", "60"])
        time.sleep(0.005)
        t0 = time.perf_counter()
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        out.append(time.perf_counter() - t0)
    return out


def patient_lease(agent: SlurmAgent, duration_s: float, timeout_s: float = 60.0) -> Lease:
    """A lease of one core on ``agent``'s node lasting ``duration_s``; retried while the
    offer flickers (the broker may hold a report from before the job's last sample)."""
    wait_until(lambda: len(agent.offer()[0]) >= 1, timeout_s, f"{agent.node} to offer a core")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            lease = Client(agent.broker.url).lease(1, LEASE_MEMORY, f"{math.ceil(duration_s)}s")
            assert lease.node == agent.node
            return lease
        except LeaseDenied as exc:
            if time.monotonic() > deadline:
                raise
            print(f"  lease not granted yet ({exc}); offer {agent.offer()}")
            time.sleep(1.0)


def job_row(agent: SlurmAgent, job_id: str) -> dict[str, Any] | None:
    for job in agent.status().get("jobs", []):
        if job["job_id"] == job_id:
            return dict(job)
    return None


def run_shape(
    agent: SlurmAgent,
    jobs: JobSubmitter,
    name: str,
    command: str,
    steady_s: float,
    tmp: Path,
    grow: bool,
) -> dict[str, Any]:
    go = tmp / f"go-{name}-{time.monotonic_ns()}"
    started = time.monotonic()
    job = jobs.submit(command, "-w", agent.node, "-c2", "--mem=200M", f"--export=ALL,GO={go}")
    allocated = sorted(job_cpus(job.job_id, agent.node))
    result: dict[str, Any] = {"shape": name, "job_id": job.job_id, "allocated": allocated}
    try:
        # the job holds both CPUs: one core offered is one lent from inside it
        wait_until(
            lambda: len(agent.offer()[0]) == 1 and set(agent.offer()[0]) < set(allocated),
            90.0,
            f"{name}: a core offered",
        )
    except AssertionError:
        row = job_row(agent, job.job_id)
        result.update(offered=[], offered_after_s=None, seen=row)
        jobs.cancel_all()
        return result
    result["offered"] = agent.offer()[0]
    result["offered_after_s"] = round(time.monotonic() - started, 1)
    # the lease outlives the steady window: an expiry must not end it first
    lease = patient_lease(agent, steady_s + 120.0)
    readings: list[float] = []
    evicted: list[dict[str, Any]] = []
    granted = time.monotonic()
    invokes = 0
    try:
        with lease.executor() as executor:
            while time.monotonic() - granted < steady_s:
                assert executor.invoke(where) == sorted(lease.cpu_ids)
                invokes += 1
                row = job_row(agent, job.job_id)
                if row is not None:
                    readings.append(float(row["cores_used"]))
                evicted = [e for e in agent.evictions() if e["lease_id"] == lease.lease_id]
                if evicted:
                    break
                time.sleep(1.0)
        result["lease_lifetime_s"] = round(time.monotonic() - granted, 1)
        result["evicted_during_steady"] = evicted
        result["invokes"] = invokes
        used_max = max(readings) if readings else 0.0
        result["cores_used_max"] = round(used_max, 3)
        result["old_rule_offer"] = max(0, 2 - math.ceil(used_max + OLD_CORE_MARGIN))
        if grow and not evicted:
            go.touch()
            grew_at = time.time()
            wait_until(
                lambda: any(e["lease_id"] == lease.lease_id for e in agent.evictions()),
                20.0,
                "the lease taken back after growth",
            )
            (record,) = [e for e in agent.evictions() if e["lease_id"] == lease.lease_id]
            result["growth_reason"] = record["reason"]
            result["growth_to_lease_gone_s"] = round(record["at"] - grew_at, 3)
    finally:
        lease.release()
        jobs.cancel_all()
        jobs.wait_gone(job.job_id, 60.0)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steady-s", type=float, default=120.0, help="how long each lease is held (s)"
    )
    parser.add_argument(
        "--growth-trials", type=int, default=3, help="jobs that turn their 2nd core on"
    )
    parser.add_argument("--quick", action="store_true", help="30 s steady, 2 growth trials")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lending.json"))
    args = parser.parse_args()
    if args.quick:
        args.steady_s, args.growth_trials = 30.0, 2
    if os.geteuid() != 0:
        print("benchmarks/lending.py needs root and the dev cluster (colocate dev-cluster up)")
        return 2
    # SIGTERM ends the run through the finally blocks (agent, broker and jobs cleaned up)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    kill = bare_kill_latency()
    tmp = Path(tempfile.mkdtemp(prefix="lending-bench-"))
    broker = start_broker(tmp)
    nodes, reason = _cluster_nodes()
    if not nodes:
        print(f"benchmarks/lending.py: no dev cluster ({reason})")
        return 2
    cluster = SlurmCluster(nodes)
    node = idle_node(cluster)
    agent = _start_agent(tmp, broker, node)
    jobs = JobSubmitter()
    shapes: list[dict[str, Any]] = []
    growth: list[float] = []
    baseline: list[float] = []
    baseline_shapes: list[dict[str, Any]] = []
    load_before = os.getloadavg()
    try:
        shapes.append(run_shape(agent, jobs, "one_busy", TURNS_SECOND_ON, args.steady_s, tmp, True))
        shapes.append(run_shape(agent, jobs, "half", HALF, args.steady_s, tmp, False))
        shapes.append(run_shape(agent, jobs, "floating", FLOATING, args.steady_s, tmp, False))
        for _ in range(args.growth_trials - 1):
            shapes.append(run_shape(agent, jobs, "one_busy", TURNS_SECOND_ON, 10.0, tmp, True))
        growth = [s["growth_to_lease_gone_s"] for s in shapes if "growth_to_lease_gone_s" in s]
        # the same-run baseline: every sample a whole interval apart (no quick recheck)
        agent.service.stop()
        agent = start_agent_rechecking(tmp, broker, node, 1.0)
        for _ in range(args.growth_trials):
            baseline_shapes.append(
                run_shape(agent, jobs, "one_busy", TURNS_SECOND_ON, 10.0, tmp, True)
            )
        baseline = [
            s["growth_to_lease_gone_s"] for s in baseline_shapes if "growth_to_lease_gone_s" in s
        ]
    finally:
        jobs.cancel_all()
        agent.service.stop()
        broker.stop()
    out = {
        "benchmark": "lending",
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "load_avg_before": [round(x, 2) for x in load_before],
        "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        "node": node,
        "steady_s": args.steady_s,
        "shapes": shapes,
        "growth_to_lease_gone_s": {**summary(growth), "target": 2.0, "growth_recheck_s": 0.25},
        "baseline_no_recheck_growth_to_lease_gone_s": {
            **summary(baseline),
            "growth_recheck_s": 1.0,
            "trials": baseline_shapes,
        },
        "baseline_bare_kill_s": {
            "n": len(kill),
            "p50": round(statistics.median(kill), 6),
            "p99": round(percentile(kill, 99), 6),
        },
        "one_busy_without_growth": ONE_BUSY,
    }
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(
        f"node {node}, load {out['load_avg_before']} -> {out['load_avg_after']}, steady {args.steady_s:g} s"
    )
    print(
        f"{'SHAPE':<10} {'OFFERED':<8} {'AFTER s':>7} {'OLD RULE':>8} {'USED MAX':>8} {'LEASE s':>7}  EVICTIONS"
    )
    for s in shapes:
        print(
            f"{s['shape']:<10} {s.get('offered')!s:<8} {s.get('offered_after_s')!s:>7} "
            f"{s.get('old_rule_offer')!s:>8} {s.get('cores_used_max')!s:>8} "
            f"{s.get('lease_lifetime_s')!s:>7}  {[e['reason'] for e in s.get('evicted_during_steady', [])]}"
            + (
                f"  growth -> gone {s['growth_to_lease_gone_s']} s"
                if "growth_to_lease_gone_s" in s
                else ""
            )
        )
    g = out["growth_to_lease_gone_s"]
    k = out["baseline_bare_kill_s"]
    b = out["baseline_no_recheck_growth_to_lease_gone_s"]
    print(f"growth to lease gone: p50 {g['p50']} s, p99 {g['p99']} s over {g['n']} (target 2 s)")
    print(
        f"baseline, no quick recheck (growth_recheck_s 1.0): p50 {b['p50']} s, p99 {b['p99']} s over {b['n']}"
    )
    print(
        f"baseline bare SIGKILL+waitpid: p50 {k['p50'] * 1e3:.2f} ms, p99 {k['p99'] * 1e3:.2f} ms"
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
