"""Broker load: N simulated node agents report through the agent's real code path while a
client leases and releases through the real Client.

    .venv/bin/python benchmarks/broker_load.py --nodes N --seconds S [--kill-broker-at T] [--json]

What runs (loopback only, bounded in count and time):
- a real broker: ``python -m colocate broker`` (SQLite ledger, its own secret, in a temporary
  directory; ``broker.max_connections`` = 2N + 64 so that agents reconnecting after a timeout
  do not meet the connection cap first), pinned to the first CPU with ``--pin``;
- N node agents: real :class:`slurm_plugin.agent.agent.Agent` objects, each with its own
  node key, sampling every ``--interval`` s with ``Agent.tick()`` and reporting with
  ``Agent.reporter.step()`` (the full report on change, else a heartbeat every 4 intervals;
  ``--full-reports``: ``Agent.report_once()`` every interval, the baseline) over its own
  kept-alive ``httpx.Client`` signed by ``NodeAuth`` (the path ``Agent.run`` takes). The broker and the generator run in two cgroup v1 CPU groups of equal shares
  (as root), so the generator's threads cannot starve the broker's event loop. Their node source is simulated: 4 cores and 16 GiB, of which every 5-15 s a job
  takes or frees 2 cores (the change whose staleness is measured); executors start and stop
  at once. The agents live in ``--agent-procs`` processes, each also serving the broker's
  calls to its agents (start, renew, release, revoke: ``Agent`` methods behind the same
  signature check as the agent's own API, one HTTP server per process with a path prefix per
  node instead of one server per node);
- ``--clients`` threads of one real ``colocate.Client`` (MUNGE-authenticated) that lease
  1 core for up to a minute, hold it 0.2-1 s and release it, in a loop.

Printed (one JSON object with ``--json``): ``nodes``, ``grant_p50_ms`` / ``grant_p99_ms``
(lease request to grant, as the client sees it), ``offer_staleness_p50_s`` / ``_p99_s`` (from
a simulated node's change to the broker accepting the report that carries it: the agent's
1 s sampling plus the report), ``client_errors`` (anything but "no capacity"),
``double_grants`` (a grant of a core the client still holds), ``broker_cpu_pct`` (of one
core, over the measured window), ``broker_rss_mib`` (peak), the reports held per second and
their latency. The load generator shares this machine's cores with the broker: at large N
it competes with what it measures (``loadgen_cpu_pct`` says how much).
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import json
import math
import multiprocessing as mp
import os
import platform
import random
import re
import select
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastapi import FastAPI, Request  # noqa: E402

from colocate.auth.node import NodeAuth, NodeVerifier, node_key, sign  # noqa: E402
from colocate.broker.api import (  # noqa: E402
    API_PREFIX,
    ExpiryRequest,
    ReportedLease,
    Revoked,
    RevokeRequest,
    StartReply,
    StartRequest,
)
from colocate.broker.secret import load_or_create_secret  # noqa: E402
from colocate.broker.service import (  # noqa: E402
    KEEP_ALIVE_S,
    LongLivedHeap,
    _protocol,
    install_error_handlers,
)
from colocate.errors import LeaseDenied, LeaseExpired  # noqa: E402
from colocate.lease_value import LeaseValue  # noqa: E402
from policies.model import NodeView  # noqa: E402

GIB = 1024**3
CORES = frozenset(range(4))
_URL = re.compile(r"listening on (http://[^\s,]+)")


def pct(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


# --- the simulated node ------------------------------------------------------------------


class SimNode:
    """A node whose batch job takes or frees cores 2-3 every ``change_s`` seconds on average
    (uniformly 0.5-1.5 times it; the first change anywhere in the first 1.5 times, so that the
    nodes' phases are spread): the measured change."""

    def __init__(self, node: str, rng: random.Random, change_s: float = 10.0) -> None:
        self.node = node
        self.rng = rng
        self.change_s = change_s
        self.busy = False
        self.next_change = time.time() + rng.uniform(0, 1.5 * change_s)
        self.pending: float | None = None  # when an unreported change happened
        self.last: NodeView | None = None  # the last sample (recent_view)

    def view(self, now: float) -> NodeView:
        if now >= self.next_change:
            self.busy = not self.busy
            if self.pending is None:
                self.pending = self.next_change
            self.next_change = now + self.rng.uniform(0.5, 1.5) * self.change_s
        cpus = frozenset({0, 1}) if self.busy else CORES
        self.last = NodeView(node=self.node, cpu_ids=cpus, memory_total_bytes=16 * GIB)
        return self.last

    def recent_view(self, now: float) -> NodeView:
        return self.last if self.last is not None else self.view(now)

    last_snapshot = None


class Handle:
    __slots__ = ("address", "lease_id", "pids")

    def __init__(self, lease_id: str) -> None:
        self.lease_id = lease_id
        self.address = "tcp://127.0.0.1:9"
        self.pids = (1,)


class InstantExecutors:
    """Executors that start and stop at once (the broker is what is measured)."""

    def __init__(self) -> None:
        self.running: dict[str, Handle] = {}

    detached = False

    def start(self, lease: LeaseValue) -> Handle:
        self.running[lease.lease_id] = Handle(lease.lease_id)
        return self.running[lease.lease_id]

    def evict(self, lease_id: str, grace_s: float = 0.0, reason: str = "evicted") -> float:
        self.running.pop(lease_id, None)
        return 0.0

    def renew(self, lease_id: str, expires_at: float) -> None:
        pass

    def drain_invocations(self) -> list[dict[str, Any]]:
        return []

    def handles(self) -> list[Handle]:
        return list(self.running.values())

    def exited(self) -> dict[str, tuple[int, ...]]:
        return {}

    def adopt_or_cleanup(self) -> list[str]:
        return []

    def close(self) -> None:
        pass


class RawClient:
    """The part of ``httpx.Client`` the agent's Reporter uses (``put``, ``close``), over one
    kept-alive socket per broker, requests signed by the real ``colocate.auth.node.sign``
    (what ``NodeAuth`` adds): the same bytes on the wire as the agent's httpx client, at a
    fraction of its CPU, so that the load generator is not what limits 10,000 nodes
    (``--http httpx`` is the agent's own client, the baseline)."""

    def __init__(self, key: bytes, node: str, timeout_s: float) -> None:
        self.key, self.node, self.timeout_s = key, node, timeout_s
        self.socks: dict[tuple[str, int], socket.socket] = {}

    class Reply:
        __slots__ = ("content", "method", "status_code", "url")

        def __init__(self, status_code: int, content: bytes, method: str, url: str) -> None:
            self.status_code, self.content, self.method, self.url = (
                status_code,
                content,
                method,
                url,
            )

        def raise_for_status(self) -> None:
            if self.status_code >= 400:
                request = httpx.Request(self.method, self.url)
                raise httpx.HTTPStatusError(
                    f"HTTP {self.status_code}",
                    request=request,
                    response=httpx.Response(
                        self.status_code, content=self.content, request=request
                    ),
                )

    def put(
        self, url: str, content: str | bytes = b"", headers: dict[str, str] | None = None
    ) -> RawClient.Reply:
        return self.request("PUT", url, content, headers or {})

    def post(
        self, url: str, content: str | bytes = b"", headers: dict[str, str] | None = None
    ) -> RawClient.Reply:
        return self.request("POST", url, content, headers or {})

    def request(
        self, method: str, url: str, content: str | bytes, headers: dict[str, str]
    ) -> RawClient.Reply:
        body = content.encode() if isinstance(content, str) else content
        rest = url.split("://", 1)[1]
        hostport, _, tail = rest.partition("/")
        path = "/" + tail
        host, _, port_s = hostport.partition(":")
        where = (host, int(port_s or 80))
        signed = sign(self.key, self.node, method, path, body)
        head = "".join(f"{k}: {v}\r\n" for k, v in {**headers, **signed}.items())
        data = (
            f"{method} {path} HTTP/1.1\r\nhost: {hostport}\r\ncontent-length: {len(body)}\r\n"
            f"{head}\r\n"
        ).encode() + body
        for attempt in (0, 1):  # a kept-alive socket the broker closed: one fresh try
            sock = self.socks.get(where)
            fresh = sock is None
            try:
                if sock is None:
                    sock = socket.create_connection(where, timeout=self.timeout_s)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    self.socks[where] = sock
                sock.sendall(data)
                return self._read(sock, method, url)
            except TimeoutError as exc:
                self._drop(where)
                raise httpx.ReadTimeout(str(exc)) from None
            except (OSError, ValueError) as exc:
                self._drop(where)
                if fresh or attempt:
                    raise httpx.ConnectError(str(exc) or type(exc).__name__) from None
        raise AssertionError("unreachable")

    def _read(self, sock: socket.socket, method: str, url: str) -> RawClient.Reply:
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                raise ValueError("connection closed")
            buf += chunk
        head, _, body = buf.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        length = 0
        close = False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                raise ValueError("connection closed")
            body += chunk
        if close:
            self._drop(next(w for w, s in self.socks.items() if s is sock))
        return RawClient.Reply(status, body[:length], method, url)

    def _drop(self, where: tuple[str, int]) -> None:
        sock = self.socks.pop(where, None)
        if sock is not None:
            sock.close()

    def close(self) -> None:
        for where in list(self.socks):
            self._drop(where)


def agents_app(agents: dict[str, Any]) -> FastAPI:
    """The agent API of many agents, one path prefix each (``/n/<node>/v1/...``), with the
    agent API's signature check and the same Agent calls as slurm_plugin/agent/app.py."""
    keys = {node: agent._secret for node, agent in agents.items()}
    verifier = NodeVerifier(lambda name: keys[name])
    app = FastAPI()
    app.state.start_handler_s = []  # seconds inside the start handler (the agent's share)
    install_error_handlers(app)

    async def check(request: Request, node: str) -> Any:
        body = await request.body()
        verifier.verify(request.headers, request.method, request.url.path, body, node)
        return agents[node]

    @app.post("/n/{node}" + f"{API_PREFIX}/leases", response_model=StartReply)
    async def start(node: str, request: Request) -> StartReply:
        began = time.perf_counter()
        agent = await check(request, node)
        try:
            return agent.start_lease(StartRequest.model_validate_json(await request.body()))  # type: ignore[no-any-return]
        except LeaseExpired as exc:
            raise LeaseDenied(str(exc)) from None
        finally:
            app.state.start_handler_s.append(time.perf_counter() - began)

    @app.put("/n/{node}" + f"{API_PREFIX}/leases/{{lease_id}}", response_model=ReportedLease)
    async def set_expiry(node: str, lease_id: str, request: Request) -> ReportedLease:
        agent = await check(request, node)
        body = ExpiryRequest.model_validate_json(await request.body())
        return agent.set_expiry(lease_id, body.expires_at).reported()  # type: ignore[no-any-return]

    @app.delete("/n/{node}" + f"{API_PREFIX}/leases/{{lease_id}}", response_model=Revoked)
    async def release(node: str, lease_id: str, request: Request) -> Revoked:
        return (await check(request, node)).release(lease_id)  # type: ignore[no-any-return]

    @app.post("/n/{node}" + f"{API_PREFIX}/leases/{{lease_id}}/revoke", response_model=Revoked)
    async def revoke(node: str, lease_id: str, request: Request) -> Revoked:
        agent = await check(request, node)
        body = RevokeRequest.model_validate_json(await request.body())
        return agent.revoke(lease_id, body.grace_s, body.reason)  # type: ignore[no-any-return]

    return app


def agents_process(
    names: list[str],
    secret: bytes,
    broker_url: str,
    interval_s: float,
    threads: int,
    seed: int,
    heartbeats: bool,
    change_s: float,
    stagger_s: float,
    raw_http: bool,
    window: Any,  # mp.Array('d', [start, end]) set by the parent once every process is ready
    ready: Any,
    out: Any,
) -> None:
    """One process of simulated agents: their API server and their report loops."""
    import logging

    import uvicorn

    from policies import POLICIES
    from slurm_plugin.agent.agent import Agent

    logging.getLogger("slurm_plugin").setLevel(logging.ERROR)
    # the agent API server thread answers the broker's start calls (a user's grant waits on
    # it): with Python's 5 ms switch interval it waits for the GIL behind every report thread
    sys.setswitchinterval(0.0005)
    rng = random.Random(seed)
    # IPPROTO_TCP as the real agent's (colocate.broker.service.bind): asyncio then sets
    # TCP_NODELAY, else every answer to the broker waits ~40 ms (Nagle + delayed ACK)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(4096)
    port = sock.getsockname()[1]
    sims: dict[str, SimNode] = {}
    agents: dict[str, Any] = {}
    for name in names:
        sims[name] = SimNode(name, random.Random(rng.random()), change_s)
        agents[name] = Agent(
            sims[name],
            POLICIES["unallocated"](),
            InstantExecutors(),
            secret=node_key(secret, name),
            url=f"http://127.0.0.1:{port}/n/{name}",
            broker_url=broker_url,
            interval_s=interval_s,
        )
        agents[name].recover()
        # thousands of simulated agents share a few report threads here (a real agent with
        # several brokers reports to each from its own thread)
        agents[name].reporter.concurrent = False
    api = agents_app(agents)
    server = uvicorn.Server(
        uvicorn.Config(
            api,
            log_level="error",
            access_log=False,
            backlog=4096,
            http=_protocol(),  # the real agent's HTTP (colocate.broker.service.serve)
            timeout_keep_alive=KEEP_ALIVE_S,
        )
    )
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    lock = threading.Lock()
    stats: dict[str, Any] = {
        "latency": [],
        "beat_latency": [],
        "staleness": [],
        "failures": 0,
        "reports": 0,
        "beats": 0,
        "first_ok": 0,
        "registered_in_window": 0,
    }

    def next_wake(agent: Any, sim: SimNode) -> float:
        """When this simulated agent must run next. Full reports every interval: the next
        interval. On change: the first sampling tick (a whole number of intervals from now,
        as the real agent's loop) after the node's next change, or the next heartbeat, or the
        next interval while the agent holds leases (expiries, starts to report). The ticks
        skipped could not see a change, so the broker receives what 1 s sampling sends; they
        are skipped so that 10,000 agents fit in the generator's share of this machine."""
        now = time.monotonic()
        if not heartbeats or agent._leases:
            return now + interval_s
        ticks = max(1, math.ceil((sim.next_change - time.time()) / interval_s))
        beat = min(b.last_ok for b in agent.reporter.brokers) + agent.reporter.heartbeat_s
        beat_ticks = max(1, math.ceil((beat - now) / interval_s))
        return now + min(ticks, beat_ticks) * interval_s

    # One TLS context for every client (loopback HTTP never uses it): each httpx.Client would
    # otherwise load the CA bundle, 20-50 ms apiece, which at thousands of agents ate the
    # measured window. The clients are made before the window opens.
    tls = ssl.create_default_context()
    all_clients: dict[str, Any] = {
        n: RawClient(node_key(secret, n), n, max(1.0, interval_s))
        if raw_http
        else httpx.Client(
            timeout=max(1.0, interval_s), auth=NodeAuth(node_key(secret, n), n), verify=tls
        )
        for n in names
    }
    # the broker's own garbage-collection policy (colocate.broker.service.LongLivedHeap): the
    # generator's full collections over 1,250 agents' state would otherwise stall its agent
    # API server (a grant waits on it) for hundreds of ms
    import gc

    gc.collect()
    gc.freeze()
    gc.callbacks.append(LongLivedHeap())
    ready.set()
    while window[1] == 0.0:
        time.sleep(0.05)
    start_at, end_at = window[0], window[1]

    def drive(mine: list[str]) -> None:
        clients = {n: all_clients[n] for n in mine}
        now = time.monotonic()
        # agents start over stagger_s (real agents start over minutes, not in one second):
        # their first report, a full one, is the registration
        heap = [(now + rng.uniform(0, max(interval_s, stagger_s)), n) for n in mine]
        heapq.heapify(heap)
        latency: list[float] = []
        beat_latency: list[float] = []
        staleness: list[float] = []
        failures = reports = beats = late = 0
        try:
            while heap:
                due, n = heapq.heappop(heap)
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                if time.time() >= end_at:
                    break
                agent, sim = agents[n], sims[n]
                agent.tick()
                reporter = agent.reporter
                full0, beats0 = reporter.counts["reports"], reporter.counts["heartbeats"]
                sent = time.monotonic()
                if heartbeats:  # the agent loop's path: full report on change, else heartbeat
                    reporter.step(clients[n], False)
                else:  # every interval in full (the design before heartbeats)
                    agent.report_once(clients[n])
                took = time.monotonic() - sent
                measured = time.time() >= start_at
                full = reporter.counts["reports"] > full0
                beat = reporter.counts["heartbeats"] > beats0
                if any(b.down_since is not None for b in reporter.brokers):
                    failures += measured
                if measured and (full or beat):
                    (latency if full else beat_latency).append(took)
                    reports += full
                    beats += beat
                late += measured and full and reporter.counts["reports"] == 1
                if full and sim.pending is not None:
                    if measured:
                        staleness.append(time.time() - sim.pending)
                    sim.pending = None
                heapq.heappush(heap, (next_wake(agent, sim), n))
        finally:
            for c in clients.values():
                c.close()
            with lock:
                stats["latency"] += latency
                stats["beat_latency"] += beat_latency
                stats["staleness"] += staleness
                stats["failures"] += failures
                stats["reports"] += reports
                stats["beats"] += beats
                stats["registered_in_window"] += late

    per = max(1, math.ceil(len(names) / threads))
    workers = [
        threading.Thread(target=drive, args=(names[i : i + per],))
        for i in range(0, len(names), per)
    ]
    cpu0 = time.process_time()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    stats["cpu_s"] = time.process_time() - cpu0
    stats["start_handler"] = list(api.state.start_handler_s)
    server.should_exit = True
    out.put(stats)


# --- the client --------------------------------------------------------------------------


class Leasing:
    """Client threads leasing 1 core, holding it briefly, releasing it."""

    def __init__(self, url: str, threads: int, start_at: float, end_at: float) -> None:
        from colocate import Client

        self.client = Client(url, timeout_s=10.0)  # url: several brokers, comma-separated
        self.most_retries = 0  # automatic retries of one call, at most
        self.start_at, self.end_at = start_at, end_at
        self.lock = threading.Lock()
        self.held: dict[tuple[str, int], str] = {}
        self.grants: list[float] = []
        self.granted_at: list[float] = []  # epoch seconds of each grant
        self.slowest: list[tuple[float, float, str]] = []  # (ms, epoch asked, node) per grant
        self.denied = 0
        self.errors: dict[str, int] = {}
        self.double_grants = 0
        self.threads = [threading.Thread(target=self._loop, args=(i,)) for i in range(threads)]

    def _error(self, exc: BaseException) -> None:
        with self.lock:
            key = type(exc).__name__
            self.errors[key] = self.errors.get(key, 0) + 1

    def _loop(self, i: int) -> None:
        from colocate.errors import LeaseDenied

        rng = random.Random(i)
        # one lease before the window (every node registered by then): this thread's first
        # connection and the broker's first call to an agent process are not the steady state
        while time.time() < self.start_at - 2:
            time.sleep(0.05)
        with contextlib.suppress(Exception):
            self.client.lease(cores=1, memory="64MiB", duration="1m").release()
        while time.time() < self.start_at:
            time.sleep(0.05)
        while time.time() < self.end_at:
            sent = time.perf_counter()
            retried = self.client.retried  # shared by the threads: an upper bound per call
            try:
                lease = self.client.lease(cores=1, memory="64MiB", duration="1m")
            except LeaseDenied:
                with self.lock:
                    self.denied += 1
                time.sleep(0.2)
                continue
            except Exception as exc:
                self._error(exc)
                time.sleep(0.2)
                continue
            took = time.perf_counter() - sent
            keys = [(lease.node, c) for c in lease.cpu_ids]
            with self.lock:
                self.most_retries = max(self.most_retries, self.client.retried - retried)
                self.grants.append(took)
                self.granted_at.append(time.time())
                self.slowest.append(
                    (round(took * 1000, 1), round(time.time() - took, 3), lease.node)
                )
                for k in keys:
                    if k in self.held:
                        self.double_grants += 1
                    self.held[k] = lease.lease_id
            time.sleep(rng.uniform(0.2, 1.0))
            with self.lock:  # forget before releasing: a grant after the release is fair
                for k in keys:
                    if self.held.get(k) == lease.lease_id:
                        del self.held[k]
            retried = self.client.retried
            try:
                lease.release()
            except Exception as exc:
                self._error(exc)
            with self.lock:
                self.most_retries = max(self.most_retries, self.client.retried - retried)

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self) -> None:
        for t in self.threads:
            t.join()
        self.client.close()


# --- the run -----------------------------------------------------------------------------


CPU_CGROUP = Path("/sys/fs/cgroup/cpu")


class CpuGroups:
    """cgroup v1 CPU groups for the broker and the load generator (root only): the kernel
    shares CPU fairly between threads, so hundreds of generator threads would starve the
    broker's one event-loop thread; as groups they share by ``cpu.shares`` instead."""

    def __init__(self, shares: dict[str, int], quota_cores: dict[str, float] | None = None) -> None:
        self.paths: dict[str, Path] = {}
        quota_cores = quota_cores or {}
        if not os.access(CPU_CGROUP / "cgroup.procs", os.W_OK):
            return
        for name, value in shares.items():
            path = CPU_CGROUP / f"colocate-broker-load-{os.getpid()}-{name}"
            path.mkdir(exist_ok=True)
            (path / "cpu.shares").write_text(str(value))
            if name in quota_cores:  # at most this many cores, whatever else is idle
                (path / "cpu.cfs_period_us").write_text("100000")
                (path / "cpu.cfs_quota_us").write_text(str(int(100000 * quota_cores[name])))
            self.paths[name] = path

    def add(self, name: str, pid: int) -> None:
        if name in self.paths:
            with contextlib.suppress(OSError):
                (self.paths[name] / "cgroup.procs").write_text(str(pid))

    def close(self) -> None:
        for path in self.paths.values():
            for pid in (path / "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):
                    (CPU_CGROUP / "cgroup.procs").write_text(pid)
            with contextlib.suppress(OSError):
                path.rmdir()


def start_postgres(tmp: Path) -> tuple[str, list[str]]:
    """A throwaway PostgreSQL server (Unix socket only) for brokers sharing one ledger; returns
    its URL and the command that stops it."""
    import glob
    import shutil

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    initdb = shutil.which("initdb") or (found[-1] if found else None)
    if initdb is None or os.geteuid() != 0:
        raise SystemExit("--brokers > 1 needs root and PostgreSQL (apt-get install postgresql)")
    pg_ctl = str(Path(initdb).with_name("pg_ctl"))
    base = tmp / "pg"
    data, sock = base / "data", base / "sock"
    sock.mkdir(parents=True)
    for path in (tmp, base, sock):
        path.chmod(0o755)
    shutil.chown(base, "postgres")
    shutil.chown(sock, "postgres")
    run_as = ["/usr/sbin/runuser", "-u", "postgres", "--"]
    subprocess.run([*run_as, initdb, "-D", str(data), "-A", "trust", "-U", "postgres"],
                   check=True, capture_output=True)  # fmt: skip
    subprocess.run([*run_as, pg_ctl, "-D", str(data), "-l", str(base / "log"), "-w", "-o",
                    f"-k {sock} -c listen_addresses=''", "start"], check=True, capture_output=True)  # fmt: skip
    return f"postgresql://postgres@/postgres?host={sock}", [
        *run_as, pg_ctl, "-D", str(data), "-m", "immediate", "stop",
    ]  # fmt: skip


# --gc-trace: installed in the broker process through a sitecustomize module on its
# PYTHONPATH (before colocate's own LongLivedHeap callback, so the time of each collection is
# its own). Per generation-1/2 collection one line: wall time, generation, pause ms,
# collected; after a full one also the objects it left to scan (gen 2) and the asyncio
# TimerHandles among them (counting them stalls the loop a few ms: a diagnostic, not a row).
_GC_TRACE = """
import gc, os, time
from asyncio.events import TimerHandle
_out = open(os.environ["COLOCATE_GC_TRACE"], "w", buffering=1)
_t0 = [0.0]
def _colocate_gc_trace(phase, info):
    if phase == "start":
        _t0[0] = time.perf_counter()
        return
    ms = (time.perf_counter() - _t0[0]) * 1000
    gen = info["generation"]
    if gen == 0:
        return
    extra = ""
    if gen == 2:
        left = gc.get_objects(2)
        extra = " %d %d" % (len(left), sum(type(o) is TimerHandle for o in left))
        if os.environ.get("COLOCATE_GC_TYPES"):
            kinds = {}
            for o in left:
                kinds[type(o).__name__] = kinds.get(type(o).__name__, 0) + 1
            top = sorted(kinds.items(), key=lambda kv: -kv[1])[:12]
            extra += " " + ",".join("%s=%d" % kv for kv in top)
        del left
    _out.write("%.3f %d %.2f %d%s\\n" % (time.time(), gen, ms, info["collected"], extra))
gc.callbacks.insert(0, _colocate_gc_trace)
"""


def gc_summary(path: Path, start_at: float, end_at: float) -> dict[str, Any]:
    """The broker's generation-1 and -2 collections inside the window (``--gc-trace``)."""
    pauses: dict[int, list[float]] = {1: [], 2: []}
    left: list[int] = []
    timers: list[int] = []
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            fields = line.split()
            if len(fields) < 4 or not start_at <= float(fields[0]) <= end_at:
                continue
            pauses[int(fields[1])].append(float(fields[2]))
            if len(fields) >= 6:
                left.append(int(fields[4]))
                timers.append(int(fields[5]))
    return {
        f"gen{g}": {
            "count": len(ms),
            "max_ms": round(max(ms), 1) if ms else None,
            "total_ms": round(sum(ms), 1),
        }
        for g, ms in pauses.items()
    } | {
        "gen2_objects_left_max": max(left) if left else None,
        "gen2_timer_handles_max": max(timers) if timers else None,
    }


def start_broker(
    tmp: Path,
    nodes: int,
    cpus: set[int] | None,
    ledger: str | None = None,
    name: str = "broker",
    gc_trace: bool = False,
    keep_alive: str = "sweep",
) -> tuple[subprocess.Popen[str], str]:
    config = tmp / f"{name}.toml"
    config.write_text(f"[broker]\nmax_connections = {2 * nodes + 64}\n")
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    if keep_alive == "per-request":
        env["COLOCATE_KEEP_ALIVE"] = "per-request"  # uvicorn's timer per request: the baseline
    if gc_trace:
        hook = tmp / f"{name}-gc-hook"
        hook.mkdir()
        (hook / "sitecustomize.py").write_text(_GC_TRACE)
        env["PYTHONPATH"] = f"{hook}{os.pathsep}{ROOT}"
        env["COLOCATE_GC_TRACE"] = str(tmp / f"{name}-gc.log")
    log = (tmp / f"{name}.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "colocate",
            "-v",
            "broker",
            "--listen",
            "127.0.0.1:0",
            "--secret-file",
            str(tmp / "secret"),
            "--ledger",
            ledger or str(tmp / "ledger.db"),
            "--config",
            str(config),
        ],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        env=env,
        cwd=str(ROOT),
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], 0.1)[0]:
            match = _URL.search(proc.stdout.readline())
            if match:
                return proc, match.group(1)
        if proc.poll() is not None:
            break
    proc.kill()
    raise SystemExit(f"the broker did not start; see {tmp / f'{name}.log'}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="colocate-broker-load-"))
    secret = load_or_create_secret(tmp / "secret")
    allowed = sorted(os.sched_getaffinity(0))
    pin = args.pin and len(allowed) >= 2
    broker_cpus, gen_cpus = ({allowed[0]}, set(allowed[1:])) if pin else (None, None)
    ledger, stop_postgres = start_postgres(tmp) if args.brokers > 1 else (None, [])
    brokers = [
        start_broker(
            tmp,
            args.nodes,
            broker_cpus,
            ledger,
            f"broker{i}" if i else "broker",
            args.gc_trace,
            args.keep_alive,
        )
        for i in range(args.brokers)
    ]
    broker, _ = brokers[0]  # the one --kill-broker-at kills: every client's first choice
    url = ",".join(u for _, u in brokers)  # agents report to all; clients fail over in order
    groups = (
        # one core for the broker, taken first from whatever else runs on the machine (other
        # processes outside the groups weigh 1024 each), never more than one
        CpuGroups({"broker": 16384, "loadgen": 1024}, {"broker": 1.0})
        if args.broker_core
        else CpuGroups({"broker": 1024, "loadgen": 1024})
    )
    for proc, _ in brokers:
        groups.add("broker", proc.pid)
    if gen_cpus:
        os.sched_setaffinity(0, gen_cpus)  # the children inherit it
    survivor, _ = brokers[-1]
    survivor_name = f"broker{len(brokers) - 1}" if len(brokers) > 1 else "broker"
    bp = psutil.Process(survivor.pid)  # the broker measured: the one that is never killed
    procs = args.agent_procs or max(1, min(8, math.ceil(args.nodes / 250)))
    names = [f"sim{i:05d}" for i in range(args.nodes)]
    ctx = mp.get_context("fork")
    window = ctx.Array("d", [0.0, 0.0])
    out = ctx.Queue()
    readies = []
    children = []
    # all agents registered (first full report accepted) before the window opens
    warmup = args.warmup if args.warmup is not None else max(5.0, args.nodes / 150)
    for p in range(procs):
        ready = ctx.Event()
        mine = names[p::procs]
        child = ctx.Process(
            target=agents_process,
            args=(
                mine,
                secret,
                url,
                args.interval,
                min(len(mine), args.threads),
                p,
                not args.full_reports,
                args.change_every,
                warmup * 0.6,
                args.http == "raw",
                window,
                ready,
                out,
            ),
            daemon=True,
        )
        child.start()
        if child.pid is not None:
            groups.add("loadgen", child.pid)
        readies.append(ready)
        children.append(child)
    for ready in readies:
        if not ready.wait(300):
            raise SystemExit("the simulated agents did not start within 300 s")
    start_at = time.time() + warmup
    end_at = start_at + args.seconds
    window[0] = start_at
    window[1] = end_at
    leasing = Leasing(url, args.clients, start_at, end_at)
    leasing.start()
    rss: list[float] = []
    killed_at = None
    while time.time() < start_at:
        time.sleep(0.05)
    cpu0 = sum(bp.cpu_times()[:2])
    gen0 = sum(psutil.Process().cpu_times()[:2]) + sum(
        sum(psutil.Process(c.pid).cpu_times()[:2]) for c in children if c.pid
    )
    t0 = time.time()
    cpu1, t1 = cpu0, t0
    while time.time() < end_at:
        if survivor.poll() is None:
            with contextlib.suppress(psutil.Error):
                rss.append(bp.memory_info().rss / 2**20)
                cpu1, t1 = sum(bp.cpu_times()[:2]), time.time()
        if (
            args.kill_broker_at is not None
            and killed_at is None
            and time.time() >= start_at + args.kill_broker_at
        ):
            broker.send_signal(signal.SIGKILL)
            killed_at = time.time() - start_at
        time.sleep(0.25)
    gen1 = sum(psutil.Process().cpu_times()[:2]) + sum(
        sum(psutil.Process(c.pid).cpu_times()[:2]) for c in children if c.pid
    )
    leasing.join()
    stats: dict[str, Any] = {
        "latency": [], "beat_latency": [], "staleness": [], "start_handler": [], "failures": 0, "reports": 0, "beats": 0,
        "registered_in_window": 0, "cpu_s": 0.0,
    }  # fmt: skip
    for _ in children:
        part = out.get(timeout=120)
        for key in ("latency", "beat_latency", "staleness", "start_handler"):
            stats[key] += part[key]
        for key in ("failures", "reports", "beats", "registered_in_window", "cpu_s"):
            stats[key] += part[key]
    for child in children:
        child.join(10)
    for proc, _ in brokers:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
    if stop_postgres:
        subprocess.run(stop_postgres, check=False, capture_output=True)
    groups.close()
    ms = [g * 1000 for g in leasing.grants]
    wall = end_at - start_at

    def r(x: float | None, n: int = 1) -> float | None:
        return None if x is None else round(x, n)

    return {
        "label": args.label,
        "nodes": args.nodes,
        "seconds": args.seconds,
        "interval_s": args.interval,
        "grants": len(ms),
        "grant_p50_ms": r(pct(ms, 50)),
        "grant_p99_ms": r(pct(ms, 99)),
        "grant_max_ms": r(max(ms) if ms else None),
        "grant_slowest": [  # ms, seconds into the window it was asked, node
            [g, round(at - start_at, 3), node] for g, at, node in sorted(leasing.slowest)[-3:]
        ],
        "denied": leasing.denied,
        "client_errors": sum(leasing.errors.values()),
        "client_retries": leasing.client.retried,
        "client_most_retries_of_one_call": leasing.most_retries,
        "client_error_kinds": leasing.errors,
        "double_grants": leasing.double_grants,
        "offer_staleness_p50_s": r(pct(stats["staleness"], 50), 3),
        "offer_staleness_p99_s": r(pct(stats["staleness"], 99), 3),
        "offer_changes_seen": len(stats["staleness"]),
        "reporting": "full report every interval"
        if args.full_reports
        else "full report on change, else a heartbeat every 4 intervals",
        "agent_http": args.http,
        "node_change_every_s": args.change_every,
        "warmup_s": warmup,
        "registration_spread_s": r(warmup * 0.6),
        "registered_in_window": stats["registered_in_window"],
        "reports_per_s": r(stats["reports"] / wall),
        "heartbeats_per_s": r(stats["beats"] / wall),
        "heartbeat_p50_ms": r(pct([x * 1000 for x in stats["beat_latency"]], 50)),
        "heartbeat_p99_ms": r(pct([x * 1000 for x in stats["beat_latency"]], 99)),
        "reports_per_s_sent_by_design": r(args.nodes / args.interval),
        "report_p50_ms": r(pct([x * 1000 for x in stats["latency"]], 50)),
        "report_p99_ms": r(pct([x * 1000 for x in stats["latency"]], 99)),
        "report_failures": stats["failures"],
        # time inside the simulated agents' start handler (the rest of a grant's start call is
        # the broker, the connection and the agents process's GIL)
        "agent_start_handler_p99_ms": r(pct([x * 1000 for x in stats["start_handler"]], 99)),
        "agent_start_handler_max_ms": r(max(stats["start_handler"], default=0) * 1000),
        "broker_cpu_pct": r((cpu1 - cpu0) / max(1e-9, t1 - t0) * 100),
        "broker_rss_mib": r(max(rss) if rss else None),
        "brokers": args.brokers,
        "broker_killed_at_s": r(killed_at),
        "grants_after_kill": None
        if killed_at is None
        else sum(t > start_at + killed_at for t in leasing.granted_at),
        "loadgen_cpu_pct": r((gen1 - gen0) / wall * 100),
        "agent_procs": procs,
        "cpu_groups": (
            "broker: one core (cgroup v1 quota 1.0, shares 16384), load generator: shares 1024"
            if args.broker_core
            else "broker and load generator in cgroup v1 cpu groups of equal shares"
        )
        if groups.paths
        else "none (not root)",
        "broker_cpus": sorted(broker_cpus) if broker_cpus else "any",
        "loadgen_cpus": sorted(gen_cpus) if gen_cpus else "any",
        "client_threads": args.clients,
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "loadavg_after": os.getloadavg(),
        },
        "broker_log": str(tmp / "broker.log"),
        "broker_keep_alive": args.keep_alive,
        "broker_gc": gc_summary(tmp / f"{survivor_name}-gc.log", start_at, end_at)
        if args.gc_trace
        else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=100, help="simulated node agents (1..20000)")
    parser.add_argument("--seconds", type=float, default=30.0, help="measured seconds (1..600)")
    parser.add_argument(
        "--kill-broker-at",
        type=float,
        metavar="T",
        help="SIGKILL the (first) broker T s into the window",
    )
    parser.add_argument(
        "--brokers",
        type=int,
        default=1,
        help="brokers serving the cluster at once (default 1; more share a throwaway PostgreSQL "
        "ledger, agents report to all, the client fails over; broker_cpu_pct is the last one's)",
    )
    parser.add_argument(
        "--interval",
        type=float,
        default=1.0,
        help="agent report interval, s (default 1, the agent's)",
    )
    parser.add_argument(
        "--clients", type=int, default=4, help="client threads leasing and releasing (default 4)"
    )
    parser.add_argument(
        "--agent-procs", type=int, help="processes for the agents (default: one per 250, at most 8)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=8,
        help="report threads per agent process (default 8: with kept-alive raw sockets a report "
        "takes a few ms; more threads starve the agent API server thread of the GIL, which put "
        "grant p99 at 1.6 s at 10,000 nodes with 64)",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="broker on the first CPU, load generator on the others (default: both float; with "
        "2 CPUs the generator needs more than one at 1,000 nodes)",
    )
    parser.add_argument(
        "--out", metavar="FILE", help="also append the JSON object to FILE (a JSON list)"
    )
    parser.add_argument(
        "--label", default="", help="names the run in --out (e.g. before/after a change)"
    )
    parser.add_argument(
        "--broker-core",
        action="store_true",
        help="give the broker one whole core (cgroup quota of 1 core, shares well above the "
        "machine's other processes): the goal's 'one core', on a machine others load",
    )
    parser.add_argument(
        "--full-reports",
        action="store_true",
        help="every agent sends its full report every interval (the design before heartbeats: "
        "the baseline)",
    )
    parser.add_argument(
        "--change-every",
        type=float,
        default=600.0,
        metavar="S",
        help="mean seconds between two changes of one node (a job starting or ending; default "
        "600: a few an hour, as on a real node; the run before r4 used 10)",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        help="seconds before the window opens (default max(5, nodes/150)); the agents start "
        "over the first 60 %% of it, so every node has registered when the window opens",
    )
    parser.add_argument(
        "--http",
        choices=("raw", "httpx"),
        default="raw",
        help="the simulated agents' HTTP client: raw (kept-alive sockets, requests signed by the "
        "real sign(); default) or httpx (the agent's own client: the generator's CPU baseline)",
    )
    parser.add_argument(
        "--keep-alive",
        choices=("sweep", "per-request"),
        default="sweep",
        help="the broker's keep-alive deadlines: one sweep a second (default, the broker's) or "
        "uvicorn's timer per request (the baseline before r5)",
    )
    parser.add_argument(
        "--gc-trace",
        action="store_true",
        help="record the measured broker's generation-1/2 garbage collections in the window "
        "(broker_gc: count, longest and total pause; objects and TimerHandles a full "
        "collection left to scan, whose counting stalls the broker a few ms)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if not 1 <= args.nodes <= 20000 or not 1 <= args.seconds <= 600:
        parser.error("--nodes must be 1..20000 and --seconds 1..600 (bounded load on loopback)")
    result = run(args)
    if args.out:
        path = Path(args.out)
        rows = json.loads(path.read_text()) if path.exists() else []
        rows = [
            r
            for r in rows
            if r.get("nodes") != result["nodes"]
            or r.get("broker_killed_at_s") != result["broker_killed_at_s"]
            or r.get("brokers", 1) != result["brokers"]
            or r.get("reporting") != result["reporting"]
            or r.get("label", "") != result["label"]
        ]
        path.write_text(json.dumps([*rows, result], indent=2) + "\n")
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>28}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
