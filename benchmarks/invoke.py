"""Invocation hot path: colocate against a raw TCP ping-pong and against its peers, one run.

    .venv/bin/python benchmarks/invoke.py [--n 5000] [--quick]

Measures, in this order and on this machine:
- baseline: raw Python TCP ping-pong of 64 bytes between two processes (TCP_NODELAY),
  server pinned to the worker's core, client to the other one; once with the server
  blocking in recv (the target's baseline) and once busy-polling (what a hot worker does);
- colocate ``invoke`` (TCP and Unix socket) and ``submit().result()`` of an echo function
  with a 64-byte payload on a hot worker; pipelined throughput to one worker;
- cold start: ``ExecutorSupervisor.start`` + connect + first result;
- eviction: ``evict`` with calls in flight, until processes are gone and the cgroup removed;
- peers doing the same call: ``multiprocessing.Pool.apply``, Ray (actor method) and Dask
  distributed (``submit().result()``), each skipped with a reason when not installed.

Prints a table and saves JSON to ``benchmarks/results/invoke.json`` (the last run). Needs root for
cgroups and the privilege drop (it runs without, confined by rlimits).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import socket
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from colocate.client.executor import LeaseExecutor
from colocate.config import ExecutorConfig
from colocate.executor import ExecutorSupervisor
from colocate.lease_value import LeaseValue
from colocate.tokens import LeaseClaims, sign_lease

PAYLOAD = b"x" * 64
SECRET = b"benchmark-secret-0123456789abcdef"
NODE = "bench"
RESULTS = Path(__file__).resolve().parent / "results"


def echo(data: bytes) -> bytes:
    return data


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def stats_us(samples: list[float]) -> dict[str, float]:
    return {
        "p50_us": pct(samples, 50) * 1e6,
        "p99_us": pct(samples, 99) * 1e6,
        "mean_us": statistics.fmean(samples) * 1e6,
        "n": len(samples),
    }


def timed(n: int, call: Callable[[], object], warmup: int = 500) -> list[float]:
    for _ in range(warmup):
        call()
    out = []
    clock = time.perf_counter
    for _ in range(n):
        t = clock()
        call()
        out.append(clock() - t)
    return out


# -- baseline: raw TCP ping-pong -----------------------------------------------------------
def _pong_server(port_queue: Any, cpu: int, busy_poll: bool) -> None:
    os.sched_setaffinity(0, {cpu})
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port_queue.put(srv.getsockname()[1])
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn.setblocking(not busy_poll)
    buf = bytearray(64)
    view = memoryview(buf)
    while True:
        got = 0
        while got < 64:
            try:
                n = conn.recv_into(view[got:])
            except BlockingIOError:
                continue
            if n == 0:
                return
            got += n
        conn.setblocking(True)
        conn.sendall(buf)
        conn.setblocking(not busy_poll)


def tcp_pingpong(n: int, cpu: int, busy_poll: bool = False) -> list[float]:
    """Round trips of 64 bytes to an echo process; ``busy_poll``: the server spins on a
    non-blocking socket, like a hot worker, instead of sleeping in recv."""
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    proc = ctx.Process(target=_pong_server, args=(q, cpu, busy_poll), daemon=True)
    proc.start()
    sock = socket.create_connection(("127.0.0.1", q.get(timeout=10)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(64)
    view = memoryview(buf)

    def once() -> None:
        sock.sendall(PAYLOAD)
        got = 0
        while got < 64:
            got += sock.recv_into(view[got:])

    try:
        return timed(n, once)
    finally:
        sock.close()
        proc.join(timeout=5)


# -- colocate ------------------------------------------------------------------------------
class Lease:
    counter = 0

    def __init__(
        self, sup: ExecutorSupervisor, cpus: tuple[int, ...], memory: int = 512 << 20
    ) -> None:
        Lease.counter += 1
        self.lease_id = f"bench{os.getpid()}-{Lease.counter}"
        expires = time.time() + 600
        self.token = sign_lease(SECRET, LeaseClaims(self.lease_id, NODE, cpus, memory, expires))
        self.handle = sup.start(LeaseValue.of(self.lease_id, cpus, memory, time.time(), expires))

    def executor(self, unix: bool = False) -> LeaseExecutor:
        address = (
            self.handle.unix_address if unix and self.handle.unix_address else self.handle.address
        )
        return LeaseExecutor(
            address,
            self.token,
            lease_id=self.lease_id,
            workers=len(self.handle.cpu_ids),
            prefer_unix=unix,
        )


def colocate_hot(sup: ExecutorSupervisor, n: int, cpu: int) -> dict[str, Any]:
    lease = Lease(sup, (cpu,))
    out: dict[str, Any] = {}
    with lease.executor() as ex:
        out["invoke_tcp"] = timed(n, lambda: ex.invoke(echo, PAYLOAD))
        out["submit_result_tcp"] = timed(n, lambda: ex.submit(echo, PAYLOAD).result())
        total = 20 * n
        ex.invoke(echo, PAYLOAD)
        t = time.perf_counter()
        futures = [ex.submit(echo, PAYLOAD) for _ in range(total)]
        for f in futures:
            f.result()
        out["pipelined_per_s"] = total / (time.perf_counter() - t)
        t = time.perf_counter()
        results = list(ex.map(echo, [PAYLOAD] * total))
        out["map_per_s"] = len(results) / (time.perf_counter() - t)
    with lease.executor(unix=True) as ex:
        out["invoke_unix"] = timed(n, lambda: ex.invoke(echo, PAYLOAD))
    sup.evict(lease.lease_id)
    return out


def cold_starts(sup: ExecutorSupervisor, rounds: int, cpu: int) -> list[float]:
    samples = []
    for _ in range(rounds):
        t = time.perf_counter()
        lease = Lease(sup, (cpu,))
        ex = lease.executor()
        ex.invoke(echo, PAYLOAD)
        samples.append(time.perf_counter() - t)
        ex.shutdown()
        sup.evict(lease.lease_id)
    return samples


def evictions(
    sup: ExecutorSupervisor, rounds: int, cpu: int
) -> tuple[list[float], list[float], int]:
    """Wall time of evict() with 200 calls in flight; also what evict() itself reports."""
    wall, reported, not_evicted = [], [], 0
    for _ in range(rounds):
        lease = Lease(sup, (cpu,))
        ex = lease.executor()
        ex.invoke(echo, PAYLOAD)
        futures = [ex.submit(time.sleep, 0.001) for _ in range(200)]
        t = time.perf_counter()
        reported.append(sup.evict(lease.lease_id))
        wall.append(time.perf_counter() - t)
        assert not any(_alive(p) for p in lease.handle.pids)
        assert not list(Path("/sys/fs/cgroup").glob(f"*/colocate/{NODE}/{lease.lease_id}"))
        for f in futures:
            exc = f.exception(timeout=10)
            if exc is not None and type(exc).__name__ != "LeaseEvicted":
                not_evicted += 1
                print(f"  eviction round: a call ended with {exc!r}", file=sys.stderr)
        ex.shutdown()
    return wall, reported, not_evicted


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


# -- peers ---------------------------------------------------------------------------------
class PeerStart:
    """Start a peer's processes with every core (they inherit this process's affinity), then
    pin the calling client back to its core."""

    def __init__(self, cpus: list[int], client_cpu: int) -> None:
        self.cpus, self.client_cpu = cpus, client_cpu

    def __enter__(self) -> None:
        os.sched_setaffinity(0, set(self.cpus))

    def __exit__(self, *exc: object) -> None:
        os.sched_setaffinity(0, {self.client_cpu})


def peer_pool(n: int, start: PeerStart) -> list[float]:
    with start:
        pool = mp.get_context("fork").Pool(1)
    with pool:
        return timed(n, lambda: pool.apply(echo, (PAYLOAD,)), warmup=200)


def peer_ray(n: int, start: PeerStart) -> list[float] | str:
    try:
        import ray
    except ImportError:
        return "not installed (pip install ray)"
    with start:
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:

        @ray.remote
        class Echo:
            def echo(self, data: bytes) -> bytes:
                return data

        actor = Echo.remote()  # type: ignore[attr-defined]
        ray.get(actor.echo.remote(PAYLOAD))
        return timed(n, lambda: ray.get(actor.echo.remote(PAYLOAD)), warmup=200)
    finally:
        ray.shutdown()


def peer_dask(n: int, start: PeerStart) -> list[float] | str:
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        return "not installed (pip install 'dask[distributed]')"
    with start:
        cluster = LocalCluster(
            n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None
        )
    with cluster, Client(cluster) as client:
        return timed(n, lambda: client.submit(echo, PAYLOAD, pure=False).result(), warmup=200)


# -- main ----------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=5000, help="timed calls per latency figure")
    parser.add_argument("--rounds", type=int, default=40, help="cold starts and evictions")
    parser.add_argument("--no-peers", action="store_true", help="skip Ray and Dask")
    args = parser.parse_args()

    cpus = sorted(os.sched_getaffinity(0))
    worker_cpu, client_cpu = cpus[-1], cpus[0]
    figures: dict[str, Any] = {}
    peers: dict[str, Any] = {}
    sup = ExecutorSupervisor(ExecutorConfig(), SECRET, node=NODE)
    os.sched_setaffinity(0, {client_cpu})
    try:
        figures["tcp_pingpong"] = stats_us(tcp_pingpong(args.n, worker_cpu))
        figures["tcp_pingpong_busypoll"] = stats_us(
            tcp_pingpong(args.n, worker_cpu, busy_poll=True)
        )
        hot = colocate_hot(sup, args.n, worker_cpu)
        for key in ("invoke_tcp", "invoke_unix", "submit_result_tcp"):
            figures[key] = stats_us(hot[key])
        figures["pipelined_per_s"] = hot["pipelined_per_s"]
        figures["map_per_s"] = hot["map_per_s"]
        figures["cold_start"] = stats_us(cold_starts(sup, args.rounds, worker_cpu))
        wall, reported, wrong = evictions(sup, args.rounds, worker_cpu)
        figures["evict_wall"] = stats_us(wall)
        figures["evict_reported"] = stats_us(reported)
        figures["evict_wrong_errors"] = wrong
        confinement = sup.confinement.mode
    finally:
        sup.close()
    start = PeerStart(cpus, client_cpu)
    peers["multiprocessing.Pool.apply"] = stats_us(peer_pool(args.n, start))
    if args.no_peers:
        peers["ray actor"] = peers["dask submit().result()"] = "skipped (--no-peers)"
    else:
        for name, fn in (("ray actor", peer_ray), ("dask submit().result()", peer_dask)):
            try:
                got = fn(min(args.n, 2000), start)
            except Exception as exc:  # a peer that fails to start is reported, not fatal
                got = f"failed: {exc!r}"
            peers[name] = stats_us(got) if isinstance(got, list) else got

    b50 = figures["tcp_pingpong"]["p50_us"]
    ratios = {
        "invoke_tcp_over_pingpong": figures["invoke_tcp"]["p50_us"] / b50,
        "invoke_unix_over_pingpong": figures["invoke_unix"]["p50_us"] / b50,
        "submit_result_over_pingpong": figures["submit_result_tcp"]["p50_us"] / b50,
        "invoke_tcp_over_busypoll_pingpong": figures["invoke_tcp"]["p50_us"]
        / figures["tcp_pingpong_busypoll"]["p50_us"],
    }
    for name, value in peers.items():
        if isinstance(value, dict):
            ratios[f"{name} over invoke_tcp"] = value["p50_us"] / figures["invoke_tcp"]["p50_us"]
    targets = {
        "invoke p50 <= 2x pingpong": ratios["invoke_tcp_over_pingpong"] <= 2,
        "submit().result() p50 <= 3x pingpong": ratios["submit_result_over_pingpong"] <= 3,
        "pipelined >= 20000/s": figures["pipelined_per_s"] >= 20000,
        "cold start p50 <= 50 ms": figures["cold_start"]["p50_us"] <= 50_000,
        "eviction p99 <= 100 ms": figures["evict_wall"]["p99_us"] <= 100_000,
        "every in-flight call ended LeaseEvicted or ok": wrong == 0,
    }
    for name, value in peers.items():
        if isinstance(value, dict) and name != "multiprocessing.Pool.apply":
            targets[f"{name} p50 >= 10x invoke"] = ratios[f"{name} over invoke_tcp"] >= 10

    print(
        f"\ncolocate invocation benchmark ({platform.node()}, {os.cpu_count()} cores, confinement {confinement})"
    )
    print(f"worker on core {worker_cpu}, client on core {client_cpu}; 64-byte echo; n={args.n}\n")
    print(f"{'measure':34} {'p50':>12} {'p99':>12}  {'x pingpong p50':>14}")
    for key, value in [*figures.items(), *peers.items()]:
        if isinstance(value, dict):
            unit, scale = ("ms", 1e-3) if key.startswith(("cold", "evict")) else ("us", 1.0)
            print(
                f"{key:34} {value['p50_us'] * scale:>9.1f} {unit} {value['p99_us'] * scale:>9.1f} {unit}  {value['p50_us'] / b50:>13.1f}x"
            )
        elif isinstance(value, float):
            print(f"{key:34} {value:>12,.0f} calls/s")
        else:
            print(f"{key:34} {value}")
    print()
    for name, ok in targets.items():
        print(f"  [{'ok' if ok else 'MISSED'}] {name}")

    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = RESULTS / "invoke.json"
    out.write_text(
        json.dumps(
            {
                "when": stamp,
                "host": platform.node(),
                "cores": os.cpu_count(),
                "python": platform.python_version(),
                "confinement": confinement,
                "payload_bytes": len(PAYLOAD),
                "figures": figures,
                "peers": peers,
                "ratios": ratios,
                "targets": targets,
            },
            indent=2,
        )
    )
    print(f"\nsaved {out.relative_to(Path.cwd()) if out.is_relative_to(Path.cwd()) else out}")
    return 0 if all(targets.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
