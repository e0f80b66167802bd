"""CPU share of the Slurm-integrated agent at a 1 s interval, with executors running.

Starts a broker and ``colocate agent --config`` for one dev-cluster node (``--node``, default
n2) as processes, puts a job on the node that leaves a core idle, takes a lease on it (one
executor, a worker pinned to the core, invoked once a second) and measures the agent
process's own CPU time (user + system, all its threads; executors are separate processes)
over ``--seconds``. Baseline, measured at the same time: a bare monitor loop (the same
``Sampler`` the agent uses, one ``sample()`` a second, nothing else) in its own process.

Needs root and the dev cluster. Usage: python benchmarks/agent.py [--seconds 60] [--node n2]
Prints a table and writes benchmarks/results/agent.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from colocate.client.lease import Client  # noqa: E402

PY = sys.executable
TICKS = os.sysconf("SC_CLK_TCK")
HALF_BUSY = (
    "import os, time\n"
    "os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
    "while True:\n"
    "    t = time.time()\n"
    "    while time.time() - t < 0.05: pass\n"
    "    time.sleep(0.05)\n"
)
BARE_SAMPLER = """
import sys, time
sys.path.insert(0, {root!r})
from monitors.sampler import Sampler, default_source
from slurm_plugin.slurm import make_slurm
sampler = Sampler({node!r}, make_slurm("cli"), default_source())
print("ready", flush=True)
while True:
    sampler.sample()
    time.sleep(1.0)
"""


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process (all threads, not its children), seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def launch(
    argv: list[str], log: Path, pattern: str, timeout_s: float = 30.0
) -> tuple[subprocess.Popen[str], str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=log.open("w"), text=True, env=env, cwd=ROOT
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], 0.1)[0]:
            line = proc.stdout.readline()
            match = re.search(pattern, line)
            if match:
                return proc, match.group(1) if match.groups() else line
        if proc.poll() is not None:
            break
    proc.kill()
    raise SystemExit(f"{argv[:4]} did not start; see {log}")


def affinity() -> list[int]:
    import os as _os

    return sorted(_os.sched_getaffinity(0))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="measurement window")
    parser.add_argument("--node", default="n2", help="dev-cluster node for the agent")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "agent.json")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (cgroups, executors dropping to nobody)")

    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    tmp = Path(tempfile.mkdtemp(prefix="colocate-agb-"))
    config = tmp / "agent.toml"
    config.write_text(
        '[agent]\ninterval_s = 1.0\ncontrol_socket = "/run/colocate/{node}.sock"\n'
        'metrics_listen = "127.0.0.1:0"\nlisten = "127.0.0.1:0"\n[policy.limits]\nmin_history_s = 2.0\n'
    )
    secret = str(tmp / "secret")
    procs: list[subprocess.Popen[str]] = []
    job = ""
    try:
        broker, broker_url = launch(
            [PY, "-m", "colocate", "broker", "--listen", "127.0.0.1:0", "--secret-file", secret],
            tmp / "broker.log",
            r"listening on (http://\S+?)[,\s]",
        )
        procs.append(broker)
        agent, _ = launch(
            [
                PY,
                "-m",
                "colocate",
                "agent",
                "--config",
                str(config),
                "--node",
                args.node,
                "--broker",
                broker_url,
                "--secret-file",
                secret,
                "--state-dir",
                str(tmp / "state"),
            ],
            tmp / "agent.log",
            r"listening on (http://\S+?)[,\s]",
        )
        procs.append(agent)
        bare, _ = launch(
            [PY, "-c", BARE_SAMPLER.format(root=str(ROOT), node=args.node)],
            tmp / "bare.log",
            r"(ready)",
        )
        procs.append(bare)
        job = subprocess.run(
            [
                "sbatch",
                "--parsable",
                "-w",
                args.node,
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
        for _ in range(300):  # the job runs and has the history the policy needs to lend
            state = subprocess.run(
                ["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True
            ).stdout.strip()
            if state == "RUNNING":
                break
            time.sleep(0.1)
        time.sleep(4.0)
        client = Client(broker_url)
        lease = None
        for _ in range(60):
            try:
                lease = client.lease(1, "128MiB", "10m")
                break
            except Exception:
                time.sleep(0.5)
        if lease is None:
            raise SystemExit(f"no lease on {args.node} within 30 s; see {tmp}/agent.log")
        executor = lease.executor()
        pinned = executor.invoke(affinity)
        start = {p.pid: cpu_seconds(p.pid) for p in (agent, bare)}
        t0 = time.monotonic()
        calls = 0
        while time.monotonic() - t0 < args.seconds:
            executor.invoke(affinity)
            calls += 1
            time.sleep(1.0)
        wall = time.monotonic() - t0
        used = {pid: cpu_seconds(pid) - value for pid, value in start.items()}
        still_leased = [lease.lease_id == held.lease_id for held in client.status().leases]
        executor.shutdown()
        lease.release()
    finally:
        if job:
            subprocess.run(["scancel", job], check=False)
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
    agent_share = used[agent.pid] / wall
    bare_share = used[bare.pid] / wall
    rows = [
        {
            "process": "agent (sampler + policy + metrics + reports + HTTP + control socket)",
            "cpu_s": used[agent.pid],
            "share_of_core_pct": 100 * agent_share,
        },
        {
            "process": "bare sampler loop (baseline)",
            "cpu_s": used[bare.pid],
            "share_of_core_pct": 100 * bare_share,
        },
    ]
    print(
        f"agent CPU share, {wall:.0f} s at a 1 s interval, 1 executor on core(s) {pinned} invoked {calls} times "
        f"({platform.node()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}); target <= 2 % of one core"
    )
    print(f"{'process':72} {'CPU s':>7} {'% of a core':>12}")
    for r in rows:
        print(f"{r['process']:72} {r['cpu_s']:7.2f} {r['share_of_core_pct']:12.2f}")
    print(
        f"agent / bare sampler: {agent_share / bare_share if bare_share else float('nan'):.2f}x; lease held throughout: {any(still_leased)}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "benchmark": "agent",
                "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "python": sys.version.split()[0],
                "cores": os.cpu_count(),
                "seconds": wall,
                "invocations": calls,
                "load": os.getloadavg()[0],
                "rows": rows,
                "lease_held_throughout": any(still_leased),
            },
            indent=2,
        )
        + "\n"
    )
    print(f"saved {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
