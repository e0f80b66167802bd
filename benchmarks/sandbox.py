"""What the sandbox per lease costs (issue 14): cold start, hot invoke, eviction, one run.

    .venv/bin/python benchmarks/sandbox.py [--n 40]   (as root: namespaces, cgroups, setuid)

On the executor supervisor as the agent runs it (cgroup v1 here), ``--n`` times each:

- cold start: ``start()`` + connect + token check + first ``invoke`` of a no-op, with the
  sandbox (pid, mount, IPC and network namespaces, private /tmp, /dev/shm, /proc, run as an
  owner) and, as the same-run baseline, without it; plus the floor of the alternative we did
  not take (exec'ing a fresh interpreter per lease, what ``bwrap ... python`` would cost at
  least): ``python -c pass`` and the same importing what a worker needs.
- hot invoke: p50 of a 64-byte echo on a sandboxed worker vs a raw TCP ping-pong between two
  Python processes on this host (the issue's target: at most 2x).
- eviction to everything gone: ``evict()`` of a lease whose function left a double-forked
  child behind, until the workers, the child, the namespaces and the cgroups are gone (p99
  target 100 ms); baseline: SIGKILL + waitpid of a plain child process.

Prints a table and saves JSON to ``benchmarks/results/sandbox.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import pwd
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cloudpickle  # noqa: E402

from colocate.client.executor import LeaseExecutor  # noqa: E402
from colocate.config import ExecutorConfig  # noqa: E402
from colocate.executor import ExecutorSupervisor  # noqa: E402
from colocate.lease_value import LeaseValue  # noqa: E402
from colocate.owner import Owner  # noqa: E402
from colocate.tokens import LeaseClaims, sign_lease  # noqa: E402

cloudpickle.register_pickle_by_value(sys.modules[__name__])
RESULTS = ROOT / "benchmarks" / "results"
SECRET = b"benchmark-secret-for-the-sandbox-0123"
PAYLOAD = b"x" * 64
CORE = max(os.sched_getaffinity(0))


def echo(data: bytes) -> bytes:
    return data


def leave_child(_: object = None) -> int:
    if os.fork() == 0:
        if os.fork() == 0:
            time.sleep(60)
        os._exit(0)
    os.wait()
    return 1


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def summary(samples: list[float]) -> dict[str, float]:
    return {"p50_ms": pct(samples, 50) * 1e3, "p99_ms": pct(samples, 99) * 1e3, "n": len(samples)}


class Leases:
    def __init__(self, sandbox: bool, owner: Owner | None) -> None:
        self.state = tempfile.mkdtemp(prefix="colocate-bench-")
        self.node = f"bench{os.getpid()}{'s' if sandbox else 'p'}"
        self.sup = ExecutorSupervisor(
            ExecutorConfig(sandbox=sandbox), SECRET, node=self.node, state_dir=self.state
        )
        self.owner = owner
        self.count = 0

    def start(self) -> tuple[str, LeaseExecutor]:
        self.count += 1
        lease_id = f"b{self.count}"
        expires = time.time() + 300
        handle = self.sup.start(
            LeaseValue.of(lease_id, [CORE], 128 << 20, time.time(), expires, self.owner)
        )
        token = sign_lease(SECRET, LeaseClaims(lease_id, self.node, (CORE,), 128 << 20, expires))
        return lease_id, LeaseExecutor(handle.address, token, lease_id=lease_id, workers=1)

    def close(self) -> None:
        self.sup.close()


def cold_starts(leases: Leases, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        lease_id, ex = leases.start()
        ex.invoke(echo, PAYLOAD)
        out.append(time.perf_counter() - t0)
        ex.shutdown()
        leases.sup.evict(lease_id)
    return out


def hot_invokes(leases: Leases, n: int) -> list[float]:
    lease_id, ex = leases.start()
    for _ in range(200):
        ex.invoke(echo, PAYLOAD)
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        ex.invoke(echo, PAYLOAD)
        out.append(time.perf_counter() - t0)
    ex.shutdown()
    leases.sup.evict(lease_id)
    return out


def evictions(leases: Leases, n: int) -> list[float]:
    out = []
    for _ in range(n):
        lease_id, ex = leases.start()
        ex.invoke(leave_child)
        ex.shutdown()
        t0 = time.perf_counter()
        leases.sup.evict(lease_id)
        out.append(time.perf_counter() - t0)
        left = list(Path("/sys/fs/cgroup").glob(f"*/colocate/{leases.node}/{lease_id}"))
        assert not left, f"cgroups left: {left}"
    return out


PONG = """
import socket, sys
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(1)
print(s.getsockname()[1], flush=True)
c, _ = s.accept(); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while True:
    d = c.recv(65536)
    if not d: break
    c.sendall(d)
"""


def raw_ping_pong(n: int) -> list[float]:
    proc = subprocess.Popen([sys.executable, "-c", PONG], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    out = []
    for i in range(n + 200):
        t0 = time.perf_counter()
        sock.sendall(PAYLOAD)
        got = 0
        while got < len(PAYLOAD):
            got += len(sock.recv(65536))
        if i >= 200:
            out.append(time.perf_counter() - t0)
    sock.close()
    proc.wait()
    return out


def exec_interpreter(n: int, code: str = "pass") -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
        out.append(time.perf_counter() - t0)
    return out


def kill_waitpid(n: int) -> list[float]:
    out = []
    for _ in range(n):
        proc = subprocess.Popen(["sleep", "60"])
        t0 = time.perf_counter()
        proc.kill()
        proc.wait()
        out.append(time.perf_counter() - t0)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=40)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the sandbox needs namespaces, cgroups and setuid")
    nobody = pwd.getpwnam("nobody")
    owner = Owner(nobody.pw_uid, nobody.pw_gid, "nobody")
    sandboxed, plain = Leases(True, owner), Leases(False, owner)
    results: dict[str, Any] = {}
    try:
        results["cold_start_sandbox"] = summary(cold_starts(sandboxed, args.n))
        results["cold_start_no_sandbox"] = summary(cold_starts(plain, args.n))
        results["exec_fresh_interpreter"] = summary(exec_interpreter(args.n))
        results["exec_interpreter_with_worker_imports"] = summary(
            exec_interpreter(args.n, "import cloudpickle, colocate.executor.worker")
        )
        results["hot_invoke_sandbox"] = summary(hot_invokes(sandboxed, 20 * args.n))
        results["raw_tcp_ping_pong"] = summary(raw_ping_pong(20 * args.n))
        results["eviction_sandbox"] = summary(evictions(sandboxed, args.n))
        results["kill_waitpid"] = summary(kill_waitpid(args.n))
    finally:
        sandboxed.close()
        plain.close()
    hot = results["hot_invoke_sandbox"]["p50_ms"] / results["raw_tcp_ping_pong"]["p50_ms"]
    results["hot_over_raw_p50"] = hot
    results["machine"] = {
        "python": platform.python_version(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "load1": os.getloadavg()[0],
    }
    results["targets"] = {"cold_start_p50_ms": 50, "hot_over_raw_p50": 2.0, "eviction_p99_ms": 100}
    for name, value in results.items():
        if isinstance(value, dict) and "p50_ms" in value:
            p50, p99 = value["p50_ms"] * 1e3, value["p99_ms"] * 1e3
            print(f"{name:28s} p50 {p50:9.1f} us   p99 {p99:9.1f} us   n={value['n']}")
    print(f"{'hot invoke / raw TCP':26s} {hot:.2f}x   (load {results['machine']['load1']:.2f})")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sandbox.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
