"""Prolog hook wall time, process start to exit, as slurmd sees it.

Scenarios, run round-robin so background load hits them alike:

- baseline ``/bin/true`` and a bare ``python -c pass`` (the same interpreter);
- the hook with the agent down (no socket), through ``python -m slurm_plugin.hooks`` and
  ``python -m colocate.cli hook``;
- the hook with an agent answering and nothing to evict (a ControlServer in this process
  whose handler answers at once);
- the hook with one eviction: the handler SIGKILLs one real process and reaps it before
  answering; and, where the executors can run (root, cgroups), the handler evicts a real
  one-core executor lease (``colocate.executor.ExecutorSupervisor.evict``, no grace) that
  was started before the run. Not included: the agent's own lookup of the job's cores
  (``scontrol -o -d show job``, a few ms). ``--agent-socket`` measures a real agent.

Usage: python benchmarks/prolog.py [--runs 200] [--agent-socket /run/colocate/agent.sock]
Prints a table and writes benchmarks/results/prolog.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from slurm_plugin.control import (  # noqa: E402
    ControlServer,
    EpilogRequest,
    EpilogResult,
    PrologRequest,
    PrologResult,
)

PY = sys.executable
SLURMD_ENV = {  # what slurmd gives a prolog: no PATH
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_UID": "1000",
    "SLURM_JOB_CPUS_PER_NODE": "1",
    "SLURMD_NODENAME": "n1",
    "SLURM_SCRIPT_CONTEXT": "prolog_slurmd",
    "SPANK_COLOCATE": "allow",
}


class InstantHandler:
    """Answers at once: nothing to evict."""

    def on_prolog(self, request: PrologRequest, deadline: float) -> PrologResult:
        return PrologResult()

    def on_epilog(self, request: EpilogRequest) -> EpilogResult:
        return EpilogResult()

    def status(self) -> Mapping[str, Any]:
        return {}


class KillOneHandler(InstantHandler):
    """Evicts one "executor": SIGKILL a real process and reap it before answering."""

    def __init__(self) -> None:
        self.victims: queue.Queue[subprocess.Popen[bytes]] = queue.Queue()

    def on_prolog(self, request: PrologRequest, deadline: float) -> PrologResult:
        started = time.monotonic()
        victim = self.victims.get_nowait()
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        return PrologResult(evicted=(f"pid-{victim.pid}",), waited_s=time.monotonic() - started)


class ExecutorEvictHandler(InstantHandler):
    """Evicts every lease of a real executor supervisor before answering."""

    def __init__(self) -> None:
        import secrets

        from colocate.config import ExecutorConfig
        from colocate.executor.supervisor import ExecutorSupervisor

        self.supervisor = ExecutorSupervisor(
            ExecutorConfig(), secrets.token_bytes(32), node="bench"
        )
        self.count = 0
        self.evict_s: list[float] = []

    def prepare(self) -> None:
        self.count += 1
        from colocate.lease_value import LeaseValue

        now = time.time()
        lease = LeaseValue.of(f"bench-{self.count}", [0], 64 * 1024**2, now, now + 600)
        self.supervisor.start(lease)

    def on_prolog(self, request: PrologRequest, deadline: float) -> PrologResult:
        started = time.monotonic()
        evicted = tuple(h.lease_id for h in self.supervisor.handles())
        for lease_id in evicted:
            self.supervisor.evict(lease_id, 0.0, "job_start")
        self.evict_s.append(time.monotonic() - started)
        return PrologResult(evicted=evicted, waited_s=self.evict_s[-1])


def timed(argv: list[str]) -> float:
    started = time.perf_counter()
    proc = subprocess.run(
        argv,
        env=SLURMD_ENV,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        check=False,
    )
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{argv} exited {proc.returncode}: {proc.stderr.decode()[:300]}")
    return elapsed


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200, help="runs per scenario")
    parser.add_argument("--agent-socket", help="also measure against a real agent's control socket")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "prolog.json")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="colocate-bench-"))
    instant = ControlServer(tmp / "instant.sock", InstantHandler())
    killer_handler = KillOneHandler()
    killer = ControlServer(tmp / "kill.sock", killer_handler)
    instant.start()
    killer.start()
    hook = [PY, "-m", "slurm_plugin.hooks", "prolog", "--no-syslog"]
    scenarios: dict[str, list[str]] = {
        "/bin/true (baseline)": ["/bin/true"],
        "python -c pass (baseline)": [PY, "-c", "pass"],
        "hook, agent down": [*hook, "--socket", str(tmp / "absent.sock")],
        "colocate.cli hook, agent down": [
            PY,
            "-m",
            "colocate.cli",
            "hook",
            "prolog",
            "--no-syslog",
            "--socket",
            str(tmp / "absent.sock"),
        ],
        "hook, agent up, nothing to evict": [*hook, "--socket", str(instant.path)],
        "hook, agent up, 1 process evicted": [*hook, "--socket", str(killer.path)],
    }
    executor: ExecutorEvictHandler | None = None
    executor_server: ControlServer | None = None
    try:
        executor = ExecutorEvictHandler()
        executor_server = ControlServer(tmp / "executor.sock", executor)
        executor_server.start()
        scenarios["hook, agent up, 1 executor evicted"] = [
            *hook,
            "--socket",
            str(executor_server.path),
        ]
    except Exception as exc:  # not root, no cgroups: measure the rest
        print(f"skipping the real-executor scenario: {exc}", file=sys.stderr)
    if args.agent_socket:
        scenarios["hook, real agent"] = [*hook, "--socket", args.agent_socket]

    def prepare(name: str) -> None:
        if "process evicted" in name:
            killer_handler.victims.put(subprocess.Popen(["/bin/sleep", "1000"]))
        if "executor evicted" in name and executor is not None:
            executor.prepare()

    samples: dict[str, list[float]] = {name: [] for name in scenarios}
    try:
        for name, argv in scenarios.items():  # warm the page cache
            prepare(name)
            timed(argv)
        for _ in range(args.runs):
            for name, argv in scenarios.items():
                prepare(name)
                samples[name].append(timed(argv))
    finally:
        instant.close()
        killer.close()
        if executor_server is not None:
            executor_server.close()
        if executor is not None:
            executor.supervisor.close()
        while not killer_handler.victims.empty():
            killer_handler.victims.get().kill()

    base = statistics.median(samples["python -c pass (baseline)"])
    rows = []
    for name, values in samples.items():
        p50 = statistics.median(values)
        rows.append(
            {
                "scenario": name,
                "runs": len(values),
                "p50_ms": p50 * 1e3,
                "p99_ms": pct(values, 99) * 1e3,
                "mean_ms": statistics.fmean(values) * 1e3,
                "p50_over_python_pass": p50 / base,
            }
        )
    print(
        f"prolog hook wall time, {args.runs} runs each, process start to exit ({platform.node()}, "
        f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.2f})"
    )
    print(
        f"{'scenario':40} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8} {'p50 / python -c pass':>22}"
    )
    for r in rows:
        print(
            f"{r['scenario']:40} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f} {r['mean_ms']:8.1f} "
            f"{r['p50_over_python_pass']:22.2f}"
        )
    extra: dict[str, Any] = {}
    if executor is not None and executor.evict_s:
        ev = executor.evict_s[1:]  # the first is the warm-up
        extra["executor_evict_ms"] = {"p50": statistics.median(ev) * 1e3, "p99": pct(ev, 99) * 1e3}
        print(
            f"inside the prolog: executor eviction p50 {extra['executor_evict_ms']['p50']:.1f} ms, "
            f"p99 {extra['executor_evict_ms']['p99']:.1f} ms"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "benchmark": "prolog",
                "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "python": sys.version.split()[0],
                "cores": os.cpu_count(),
                "runs": args.runs,
                "rows": rows,
                **extra,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"saved {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
