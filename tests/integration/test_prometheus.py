"""A real Prometheus (Debian package) scrapes colocate's metrics fed with real data of this node.

Three runs (the ``run`` fixture):

- "process" and "slurm": the exporter library an agent mounts (``NodeCollector`` +
  ``serve_metrics``), fed by a small driver that does what the agent does each cycle: a real
  job (a plain process, or a batch job on the dev cluster sampled by the real monitor;
  burns half a core, holds 64 MiB), node PSI, the real ``unallocated`` policy deciding the
  offer and the expiry evictions, and real executor processes for the leases;
- "agent": the real thing on the dev cluster. A broker and ``colocate agent --config``
  for one node run as subprocesses; a batch job (-c2 --mem=1G, one core half busy, 200 MiB)
  runs there; a client leases its idle core and keeps invoking functions; the first lease
  is released (an eviction) and a second one taken. Prometheus scrapes the agent's
  ``metrics_listen`` port.

Prometheus scrapes every second; then every dashboard query must return data, the job's
wasted-cost counter must match the hand computation from its allocation, its measured use
(read from /proc apart from the agent) and the prices, and promtool must accept the
scrape, the rules and the config.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from prometheus_client import CollectorRegistry

from colocate.metrics import ExecutorMeter, LeaseState, NodeCollector, NodeState, serve_metrics
from colocate.metrics.dashboard import expand, load_dashboard, panel_queries
from colocate.metrics.openmetrics import ReplaySample
from colocate.metrics.replay_series import ReplaySeries, series_to_json
from monitors.snapshot import JobSnapshot, NodeSnapshot
from policies.limits import Limits
from policies.model import JobView, LeaseView, NodeView
from policies.prices import GIB, Prices
from policies.unallocated import UnallocatedPolicy
from tests.conftest import require

pytestmark = [pytest.mark.prometheus, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
MIB = 1024**2
JOB_ID = "4242"
JOB_CORES = 1
JOB_MEMORY = 512 * MIB
PRICES = Prices(core_hour=0.015, gib_hour=0.0015)


def _have_prometheus() -> None:
    require(
        os.access(PROMETHEUS, os.X_OK) and os.access(PROMTOOL, os.X_OK),
        "Debian package prometheus (apt-get install -y --no-install-recommends prometheus)",
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Prometheus:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """The instant query ``expr``, evaluated now or at ``at`` (epoch seconds)."""
        params: dict[str, str | float] = {"query": expr}
        if at is not None:
            params["time"] = at
        reply = httpx.get(f"{self.url}/api/v1/query", params=params, timeout=10)
        body = reply.json()
        assert reply.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
        result = body["data"]["result"]
        return result if isinstance(result, list) else [{"value": result}]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_prometheus(tmp: Path, targets: list[str], storage: Path | None = None) -> Prometheus:
    """/usr/bin/prometheus on a free port, scraping ``targets`` every second, with our rules."""
    port = _free_port()
    shutil.copy(ROOT / "deploy" / "prometheus" / "colocate-rules.yml", tmp / "colocate-rules.yml")
    scrape = (
        f"""
  - job_name: colocate
    scrape_interval: 1s
    static_configs:
      - targets: [{", ".join(f'"{t}"' for t in targets)}]
"""
        if targets
        else ""
    )
    (tmp / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "rule_files:\n  - colocate-rules.yml\nscrape_configs:" + (scrape or " []\n")
    )
    storage = storage or tmp / "data"
    log = tmp / "prometheus.log"
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={storage}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=30d",
        ],
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
    )
    prom = Prometheus(f"http://127.0.0.1:{port}", proc, log)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"prometheus exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{prom.url}/-/ready", timeout=1).status_code == 200:
                return prom
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    prom.stop()
    raise AssertionError(f"prometheus not ready in 30 s: {log.read_text()[-2000:]}")


# --- the driver: what the agent does each cycle, on real processes --------------------------

JOB_SCRIPT = textwrap.dedent(
    """
    import time
    buf = bytearray(64 * 1024 * 1024)
    for i in range(0, len(buf), 4096):
        buf[i] = 1
    while True:  # half a core: 20 ms busy, 20 ms asleep
        end = time.perf_counter() + 0.02
        while time.perf_counter() < end:
            pass
        time.sleep(0.02)
    """
)
EXECUTOR_SCRIPT = "import sys\nfor line in sys.stdin:\n    sys.stdout.write(str(sum(map(int, line.split()))) + '\\n'); sys.stdout.flush()\n"


def load_replay(tmp_path: Path, source_flag: str, source: Path) -> Prometheus:
    """``colocate metrics openmetrics`` on a replay, loaded with promtool into a fresh Prometheus."""
    om = tmp_path / "replay.om"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "colocate",
            "metrics",
            "openmetrics",
            source_flag,
            str(source),
            "--end-at",
            "now",
            "-o",
            str(om),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    storage = tmp_path / "data"
    proc = subprocess.run(
        [PROMTOOL, "tsdb", "create-blocks-from", "openmetrics", str(om), str(storage)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return start_prometheus(tmp_path, [], storage=storage)


def _psi(kind: str) -> float | None:
    try:
        first = Path(f"/proc/pressure/{kind}").read_text().splitlines()[0]
    except OSError:
        return None
    return float(first.split()[1].split("=")[1])


@dataclass
class Executor:
    lease: LeaseView
    proc: subprocess.Popen[str]

    def invoke(self, numbers: list[int]) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(" ".join(map(str, numbers)) + "\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())


class ProcessJob:
    """A job that is a plain process on this node; the node is described from psutil."""

    name = "process"

    def __init__(self) -> None:
        self.popen = subprocess.Popen([sys.executable, "-c", JOB_SCRIPT])
        self.proc = psutil.Process(self.popen.pid)
        self.job_id = JOB_ID
        self.node = "itest"
        self.cores = JOB_CORES
        self.memory_bytes = JOB_MEMORY
        self._last: tuple[float, float] | None = None
        self._peak = 0

    def usage(self) -> tuple[float, int]:
        times = self.proc.cpu_times()
        return times.user + times.system, self.proc.memory_info().rss

    def start_time(self) -> float:
        return float(self.proc.create_time())

    def snapshot(self, now: float) -> NodeSnapshot:
        cpu_s, rss = self.usage()
        self._peak = max(self._peak, rss)
        rate = (
            0.0 if self._last is None else max(0.0, (cpu_s - self._last[1]) / (now - self._last[0]))
        )
        self._last = (now, cpu_s)
        cores = os.cpu_count() or 1
        total = psutil.virtual_memory().total
        job = JobSnapshot(
            job_id=JOB_ID,
            user="itest",
            cores_allocated=JOB_CORES,
            cpu_ids=(0,),
            cores_used=rate,
            memory_allocated_bytes=JOB_MEMORY,
            memory_used_bytes=rss,
            memory_peak_bytes=self._peak,
            processes=1,
            cpu_pressure=_psi("cpu"),
            memory_pressure=_psi("memory"),
            uid=os.getuid(),
            start_time=self.start_time(),
            cpu_seconds_total=cpu_s,
        )
        return NodeSnapshot(
            node=self.node,
            t=now,
            cores_total=cores,
            cpu_ids=tuple(range(cores)),
            memory_total_bytes=total,
            cores_unallocated=cores - JOB_CORES,
            memory_unallocated_bytes=total - JOB_MEMORY,
            jobs=(job,),
            cpu_pressure=_psi("cpu"),
            memory_pressure=_psi("memory"),
        )

    def close(self) -> None:
        self.popen.kill()
        self.popen.wait()


class SlurmJob:
    """A real batch job on the dev cluster, sampled by the real monitor (``monitors.Sampler``).

    ``usage`` measures the job independently of the monitor: the CPU time and RSS of the
    processes whose environment holds its SLURM_JOB_ID.
    """

    name = "slurm"

    def __init__(
        self,
        node: str,
        code: str = JOB_SCRIPT,
        cores: int = JOB_CORES,
        memory_bytes: int = JOB_MEMORY,
        holds: int = 64 * MIB,
    ) -> None:
        from monitors.sampler import Sampler, default_source
        from slurm_plugin.slurm import CliSlurm
        from tests.integration.conftest import JobSubmitter, python_job

        self.submitter = JobSubmitter()
        mem_mib = memory_bytes // MIB
        job = self.submitter.submit(
            python_job(code), f"-w{node}", f"-c{cores}", f"--mem={mem_mib}M"
        )
        self.job_id = job.job_id
        self.node = node
        self.cores = cores
        self.memory_bytes = memory_bytes
        self.sampler = Sampler(node, CliSlurm(), default_source())
        self._found: list[psutil.Process] = []
        deadline = time.monotonic() + 20
        while self.usage()[1] < holds:  # past the prolog, buffer touched
            assert time.monotonic() < deadline, f"job {self.job_id} never held its {holds} bytes"
            time.sleep(0.2)
        self._found = self._processes()  # the job's processes are fixed from here on

    def _processes(self) -> list[psutil.Process]:
        if self._found and all(p.is_running() for p in self._found):
            return self._found
        found = []
        for p in psutil.process_iter():
            try:
                if p.environ().get("SLURM_JOB_ID") == self.job_id and "slurmstepd" not in p.name():
                    found.append(p)
            except psutil.Error:
                continue
        return found

    def usage(self) -> tuple[float, int]:
        cpu, rss = 0.0, 0
        for p in self._processes():
            try:
                t = p.cpu_times()
                cpu += t.user + t.system
                rss += p.memory_info().rss
            except psutil.Error:
                continue
        return cpu, rss

    def start_time(self) -> float:
        # squeue --json of Slurm 22.05 ignores -j: pick the job out of the full list.
        out = subprocess.run(["squeue", "--json"], capture_output=True, text=True, timeout=30)
        job = next(j for j in json.loads(out.stdout)["jobs"] if str(j["job_id"]) == self.job_id)
        start = job["start_time"]
        return float(start["number"] if isinstance(start, dict) else start)

    def snapshot(self, now: float) -> NodeSnapshot:
        return self.sampler.sample(now)

    def close(self) -> None:
        self.submitter.cancel_all()


JobSource = ProcessJob | SlurmJob


@dataclass
class Driver:
    """Feeds the collector like an agent; remembers what it measured for the hand computation."""

    collector: NodeCollector
    job: JobSource
    lease_s: float = 2.0
    samples: list[tuple[float, float, int]] = field(
        default_factory=list
    )  # (t, cpu s, rss) of the job
    executors: dict[str, Executor] = field(default_factory=dict)
    invocations: int = 0
    evictions: int = 0
    meter: ExecutorMeter = field(default_factory=ExecutorMeter)
    scraped_from: float = 0.0  # epoch seconds Prometheus had scraped the exporter by
    _lease_no: int = 0

    @property
    def node(self) -> str:
        return self.job.node

    def cycle(self) -> None:
        now = time.time()
        snap = self.job.snapshot(now)
        cpu_s, rss = self.job.usage()  # measured apart from the snapshot, for the hand computation
        self.samples.append((now, cpu_s, rss))
        view = NodeView(
            node=self.node,
            cpu_ids=frozenset(snap.cpu_ids),
            memory_total_bytes=snap.memory_total_bytes,
            jobs=tuple(
                JobView(
                    j.job_id,
                    frozenset(j.cpu_ids),
                    j.memory_allocated_bytes,
                    j.memory_peak_bytes,
                    start_time=j.start_time or 0.0,
                )
                for j in snap.jobs
            ),
            leases=tuple(ex.lease for ex in self.executors.values()),
        )
        decision = UnallocatedPolicy().decide(view, Limits(), now)
        events = self.collector.events(self.node)
        for eviction in decision.evictions:
            started = time.perf_counter()
            ex = self.executors.pop(eviction.lease_id)
            ex.proc.terminate()
            ex.proc.wait(timeout=5)
            events.record_eviction(eviction.reason, time.perf_counter() - started)
            self.evictions += 1
        free = sorted(
            decision.offer.cpu_ids - {c for ex in self.executors.values() for c in ex.lease.cpu_ids}
        )
        if not self.executors and free:
            started = time.perf_counter()
            self._lease_no += 1
            lease = LeaseView(
                f"L{self._lease_no}", frozenset(free[:1]), 64 * MIB, now, now + self.lease_s
            )
            proc = subprocess.Popen(
                [sys.executable, "-c", EXECUTOR_SCRIPT],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            ex = Executor(lease, proc)
            assert ex.invoke([1]) == 1  # ready
            events.record_cold_start(time.perf_counter() - started)
            self.executors[lease.lease_id] = ex
        for ex in self.executors.values():
            for _ in range(20):
                started = time.perf_counter()
                ok = ex.invoke([1, 2, 3]) == 6
                events.record_invocation("ok" if ok else "error", time.perf_counter() - started)
                self.invocations += 1
        executors = self.meter.measure(
            [(ex.lease.lease_id, (ex.proc.pid,)) for ex in self.executors.values()], now
        )
        leases = tuple(LeaseState.from_view(ex.lease) for ex in self.executors.values())
        self.collector.update(
            NodeState(snap, offer=decision.offer, leases=leases, executors=executors)
        )

    def close(self) -> None:
        for ex in self.executors.values():
            ex.proc.kill()
            ex.proc.wait()
        self.job.close()


# --- the real agent on the dev cluster -------------------------------------------------------

AGENT_JOB_CORES = 2
AGENT_JOB_MEMORY = 1024 * MIB
AGENT_JOB_HOLDS = 200 * MIB
# The first CPU of the job half busy, the other idle; holds 200 MiB. The policy keeps the
# job's peak use over its history window plus a margin of 0.25 core: a fully busy core, or a
# slow start that burns a core while filling its memory, would keep both cores.
AGENT_JOB_SCRIPT = textwrap.dedent(
    """
    import os, time
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    blocks = []
    for _ in range(20):  # 10 MiB at a time, gently
        blocks.append(bytearray(b"\\x01") * (10 * 1024 * 1024))
        time.sleep(0.05)
    time.sleep(0.5)
    while True:
        end = time.perf_counter() + 0.05
        while time.perf_counter() < end:
            pass
        time.sleep(0.05)
    """
)


class AgentRun:
    """A broker, the real Slurm agent of one dev-cluster node, a batch job there and a client
    invoking functions on the job's idle core. Samples the job's CPU time and RSS from /proc
    (apart from the agent) for the hand computation."""

    def __init__(self, tmp: Path, cluster: Any) -> None:
        from tests.integration.leasing import start_broker
        from tests.integration.slurm_agent import idle_node, start_slurm_agent

        self.samples: list[tuple[float, float, int]] = []  # (t, cpu s, rss) of the job
        self.invocations = 0
        self.evictions = 0
        self.scraped_from = 0.0
        self._held: list[tuple[Any, Any]] = []  # (lease, executor)
        self.broker = start_broker(tmp)
        self.agent: Any = None
        self._job: SlurmJob | None = None
        try:
            node = idle_node(cluster)  # n3 first: standalone-agent tests name theirs n1, n2
            self.agent = start_slurm_agent(tmp, self.broker, node, prices=PRICES)
            self._job = SlurmJob(
                node, AGENT_JOB_SCRIPT, AGENT_JOB_CORES, AGENT_JOB_MEMORY, AGENT_JOB_HOLDS
            )
            self.sample()
        except BaseException:
            self.close()
            raise

    @property
    def node(self) -> str:
        return str(self.agent.node)

    @property
    def job(self) -> SlurmJob:
        assert self._job is not None
        return self._job

    @property
    def exporter_url(self) -> str:
        return str(self.agent.metrics_url)

    def sample(self) -> None:
        cpu_s, rss = self.job.usage()
        self.samples.append((time.time(), cpu_s, rss))

    def lease(self) -> None:
        """Lease the job's idle core once the agent offers it; start its executor."""
        from tests.integration.slurm_agent import lease_when_offered

        lease = lease_when_offered(self.broker, self.agent)
        self._held.append((lease, lease.executor()))

    def release(self) -> None:
        """Give the oldest lease back: the agent evicts its executor (reason ``released``)."""
        lease, executor = self._held.pop(0)
        executor.shutdown()
        lease.release()
        self.evictions += 1

    def work(self, seconds: float) -> None:
        """Invoke functions on every held lease for ``seconds``, sampling the job meanwhile.

        The client runs on the leased cores, as a real client runs on another machine: this
        test process must not take the job's own core (its CPU pressure would evict the lease).
        """
        before = os.sched_getaffinity(0)
        leased = {cpu for lease, _ in self._held for cpu in lease.cpu_ids}
        os.sched_setaffinity(0, leased or before)
        try:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                for _, executor in self._held:
                    for _ in range(5):
                        assert executor.invoke(sum, [1, 2, 3]) == 6
                        self.invocations += 1
                self.sample()
                time.sleep(0.2)
        finally:
            os.sched_setaffinity(0, before)

    def close(self) -> None:
        for lease, executor in self._held:
            executor.shutdown(wait=False)
            lease.release()
        self._held.clear()
        if self._job is not None:
            self._job.close()
        if self.agent is not None:
            self.agent.service.stop()
            shutil.rmtree(self.agent.state_dir, ignore_errors=True)
        self.broker.stop()
        if self.agent is not None:
            assert "Traceback" not in self.agent.service.logs(), self.agent.service.logs()


@dataclass
class Run:
    prom: Prometheus
    driver: Driver | AgentRun
    exporter_url: str


def _wait_scraped(prom: Prometheus, step: Any) -> None:
    deadline = time.monotonic() + 20
    while not prom.query('up{job="colocate"} == 1') and time.monotonic() < deadline:
        step()
        time.sleep(0.5)
    assert prom.query('up{job="colocate"} == 1'), prom.log.read_text()[-2000:]


def _agent_run(tmp: Path, cluster: Any) -> Iterator[Run]:
    require(os.geteuid() == 0, "the Slurm agent needs root (cgroups, control socket under /run)")
    run = AgentRun(tmp, cluster)
    prom: Prometheus | None = None
    try:
        prom = start_prometheus(tmp, [run.exporter_url.removeprefix("http://").split("/")[0]])
        _wait_scraped(prom, run.sample)
        run.scraped_from = time.time()
        run.lease()
        run.work(3.0)
        run.release()  # the eviction, seen by Prometheus before and after
        run.lease()
        run.work(6.0)
        yield Run(prom, run, run.exporter_url)
    finally:
        if prom is not None:
            prom.stop()
        run.close()


@pytest.fixture(
    scope="module",
    params=[
        "process",
        pytest.param("slurm", marks=pytest.mark.slurm),
        pytest.param("agent", marks=[pytest.mark.slurm, pytest.mark.root]),
    ],
)
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    _have_prometheus()
    if request.param == "agent":
        cluster = request.getfixturevalue("slurm_cluster")
        yield from _agent_run(tmp_path_factory.mktemp("prometheus-agent"), cluster)
        return
    job: JobSource
    if request.param == "slurm":
        cluster = request.getfixturevalue("slurm_cluster")
        job = SlurmJob(cluster.nodes[0])
    else:
        job = ProcessJob()
    tmp = tmp_path_factory.mktemp("prometheus")
    registry = CollectorRegistry()
    collector = NodeCollector(PRICES, registry=registry)
    server = serve_metrics(registry, "127.0.0.1:0")
    driver = Driver(collector, job)
    prom = start_prometheus(tmp, [f"127.0.0.1:{server.port}"])
    try:
        driver.cycle()
        _wait_scraped(prom, driver.cycle)
        driver.scraped_from = time.time()
        for _ in range(16):  # 8 s of cycles, scraped every second
            driver.cycle()
            time.sleep(0.5)
        time.sleep(2.5)  # the last state is scraped at least twice
        yield Run(prom, driver, server.url)
    finally:
        prom.stop()
        driver.close()
        server.close()


def test_every_dashboard_query_returns_data(run: Run) -> None:
    queries = panel_queries(load_dashboard(ROOT / "deploy" / "grafana" / "colocate.json"))
    assert queries
    empty = []
    for q in queries:
        expr = expand(q.expr)
        result = run.prom.query(expr)
        values = [float(r["value"][1]) for r in result]
        if not result or not any(math.isfinite(v) for v in values):
            empty.append(f"{q.row} / {q.panel} / {q.ref_id}: {expr} -> {values}")
    assert not empty, "\n".join(empty)
    assert run.driver.invocations > 0 and run.driver.evictions > 0
    # The counters behind those panels count what really happened (a rate of 0 has data too).
    node = f'node="{run.driver.node}"'
    invoked = float(
        run.prom.query(f'sum(colocate_invocations_total{{{node}, result="ok"}})')[0]["value"][1]
    )
    evicted = float(run.prom.query(f"sum(colocate_evictions_total{{{node}}})")[0]["value"][1])
    started = float(run.prom.query(f"sum(colocate_cold_starts_total{{{node}}})")[0]["value"][1])
    assert 0 < invoked <= run.driver.invocations  # an agent's executors report in batches
    assert evicted >= 1 and started >= 1


def test_the_dashboard_variables_list_the_node_and_the_job(run: Run) -> None:
    # Grafana's label_values(metric{...}, label) is the series API's label values.
    dashboard = load_dashboard(ROOT / "deploy" / "grafana" / "colocate.json")
    found = {}
    for var in dashboard["templating"]["list"]:
        m = re.fullmatch(r"label_values\((.+), (\w+)\)", var.get("definition", ""))
        if not m:
            continue
        reply = httpx.get(
            f"{run.prom.url}/api/v1/label/{m.group(2)}/values",
            params={"match[]": expand(m.group(1))},
            timeout=10,
        ).json()
        found[var["name"]] = reply["data"]
    assert run.driver.node in found["node"]
    assert run.driver.job.job_id in found["job_id"]
    assert found["policy"] == []  # live data has no policy label; replays do


def _cpu_at(samples: list[tuple[float, float, int]], t: float) -> float:
    """The job's CPU seconds at ``t``, interpolated between the two samples around it."""
    for (ta, ca, _), (tb, cb, _) in pairwise(samples):
        if ta <= t <= tb:
            return ca if tb == ta else ca + (cb - ca) * (t - ta) / (tb - ta)
    raise AssertionError(f"no samples around {t} (from {samples[0][0]} to {samples[-1][0]})")


def test_job_wasted_cost_matches_the_hand_computation(run: Run) -> None:
    job, samples = run.driver.job, run.driver.samples
    node, job_id = run.driver.node, job.job_id

    def stored(at: float) -> tuple[float, float]:
        """(the exporter's sample time, the job's wasted cost) of the last scrape before ``at``."""
        cost = run.prom.query(f'sum(colocate_job_wasted_cost_total{{job_id="{job_id}"}})', at)
        t = run.prom.query(f'colocate_node_sample_timestamp_seconds{{node="{node}"}}', at)
        return float(t[0]["value"][1]), float(cost[0]["value"][1])

    # The counter as Prometheus stored it, at two scrapes some seconds apart; each scrape also
    # says when the exporter sampled the node, which is where the interval starts and ends.
    (s0, cost0), (s1, cost1) = stored(run.driver.scraped_from + 2.0), stored(samples[-1][0])
    elapsed = s1 - s0
    assert elapsed > 4.0, (s0, s1)
    # By hand, from the allocation, what /proc said the job used in between (apart from
    # the exporter's monitor), and the prices: idle core-seconds and idle byte-seconds.
    cpu0, cpu1 = _cpu_at(samples, s0), _cpu_at(samples, s1)
    idle_core_s = job.cores * elapsed - (cpu1 - cpu0)
    rss = [r for t, _, r in samples if s0 <= t <= s1]
    idle_byte_s = (job.memory_bytes - sum(rss) / len(rss)) * elapsed
    by_hand = idle_core_s / 3600 * PRICES.core_hour + idle_byte_s / GIB / 3600 * PRICES.gib_hour
    assert idle_core_s > 0.3 * elapsed  # the job really left part of its cores idle
    # The allocation the exporter saw is the one requested (sbatch -c/--mem for Slurm).
    cores = run.prom.query(f'colocate_job_cores{{job_id="{job_id}", state="allocated"}}')
    memory = run.prom.query(f'colocate_job_memory_bytes{{job_id="{job_id}", state="allocated"}}')
    assert float(cores[0]["value"][1]) == job.cores
    assert float(memory[0]["value"][1]) == job.memory_bytes
    print(
        f"job {job_id}: {elapsed:.2f} s, idle {idle_core_s:.2f} core-s, wasted "
        f"{cost1 - cost0:.4g} {PRICES.currency} stored vs {by_hand:.4g} by hand "
        f"({(cost1 - cost0) / by_hand - 1:+.2%})"
    )
    assert cost1 - cost0 == pytest.approx(by_hand, rel=0.05)
    eff = run.prom.query(f'colocate_job_cpu_efficiency_ratio{{job_id="{job_id}"}}', samples[-1][0])
    # jobstats: CPU seconds / (elapsed since the job started x allocated cores), at s1.
    expected = cpu1 / ((s1 - job.start_time()) * job.cores)
    assert float(eff[0]["value"][1]) == pytest.approx(expected, rel=0.05)


def test_promtool_finds_no_naming_problems_in_a_real_scrape(run: Run) -> None:
    text = httpx.get(run.exporter_url, timeout=10).text
    assert f'job_id="{run.driver.job.job_id}"' in text
    proc = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), (
        proc.stdout + proc.stderr
    )


def test_alert_rules_load_and_evaluate(run: Run) -> None:
    proc = subprocess.run(
        [PROMTOOL, "check", "rules", str(ROOT / "deploy" / "prometheus" / "colocate-rules.yml")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    body = httpx.get(f"{run.prom.url}/api/v1/rules", timeout=10).json()
    rules = [r for g in body["data"]["groups"] for r in g["rules"]]
    assert {r["name"] for r in rules} >= {
        "ColocateEvictionsTooFrequent",
        "ColocateJobSlowedByColocation",
    }
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
    recorded = run.prom.query("colocate:wasted_cost:rate1h")
    assert recorded


def test_scrape_config_is_valid() -> None:
    _have_prometheus()
    proc = subprocess.run(
        [PROMTOOL, "check", "config", str(ROOT / "deploy" / "prometheus" / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_replayed_history_loads_with_promtool_and_feeds_the_dashboard(tmp_path: Path) -> None:
    _have_prometheus()
    # A replay's series (two policies, 5-minute intervals, 6 hours), exported by the CLI.
    t0 = 1_600_000_000.0
    policies = {
        name: [
            ReplaySample(
                t=t0 + 300 * i,
                cores={
                    "total": 128,
                    "allocated": 100,
                    "idle_allocated": 30 + i % 7,
                    "unallocated": 28,
                    "offered": share * 50,
                    "leased": share * 40,
                    "used_by_functions": share * 35,
                },
                memory_bytes={
                    "total": 512 * GIB,
                    "idle_allocated": 200 * GIB,
                    "unallocated": 100 * GIB,
                    "offered": share * 250 * GIB,
                    "leased": share * 150 * GIB,
                    "used_by_functions": share * 90 * GIB,
                },
                wasted_cost={
                    ("cores", "idle_allocated"): 0.04,
                    ("cores", "unallocated"): 0.035,
                    ("memory", "idle_allocated"): 0.025,
                    ("memory", "unallocated"): 0.0125,
                },
                recovered_cost={"cores": share * 0.05, "memory": share * 0.01},
                evictions={"pressure": i % 3 == 0, "job_start": 1},
                invocations={"ok": 1000 * share},
                leases=share * 10,
            )
            for i in range(72)
        ]
        for name, share in (("headroom", 1.0), ("unallocated", 0.4))
    }
    series_file = tmp_path / "series.json"
    series_file.write_text(
        json.dumps(series_to_json(ReplaySeries("replay", "EUR", "resources", policies)))
    )
    prom = load_replay(tmp_path, "--from-replay", series_file)
    try:
        # The money panels over the replayed 6 hours: headroom recovers more than unallocated.
        recovered = {
            r["metric"]["policy"]: float(r["value"][1])
            for r in prom.query("sum by (policy) (increase(colocate_recovered_cost_total[6h]))")
        }
        assert set(recovered) == {"headroom", "unallocated"}
        assert recovered["headroom"] > recovered["unallocated"] > 0
        # Every dashboard query that only needs what a replay produces returns data for it.
        replayed = {
            "colocate_node_cores",
            "colocate_node_memory_bytes",
            "colocate_wasted_cost_total",
            "colocate_recovered_cost_total",
            "colocate_evictions_total",
            "colocate_invocations_total",
            "colocate_leases",
        }
        checked = 0
        for q in panel_queries(load_dashboard(ROOT / "deploy" / "grafana" / "colocate.json")):
            used = set(re.findall(r"\bcolocate_[a-z_]+\b", q.expr))
            if not used or not used <= replayed:
                continue
            expr = expand(q.expr, {"__rate_interval": "15m", "__range": "6h", "policy": "headroom"})
            assert prom.query(expr), f"{q.panel}: {expr}"
            checked += 1
        assert checked >= 8
    finally:
        prom.stop()


def test_a_real_replay_shows_in_prometheus_with_the_money_it_reported(tmp_path: Path) -> None:
    _have_prometheus()
    replay_mod = pytest.importorskip("traces.replay")
    from colocate.metrics.replay_series import save_replay_series
    from traces.azure import read_azure2019
    from traces.bundled import AZURE2019, HPC2N_CORES_PER_NODE, HPC2N_EXCERPT, HPC2N_MEMORY_PER_NODE
    from traces.placement import Cluster
    from traces.swf import read_swf

    prices = Prices()
    result = replay_mod.replay(
        read_swf(HPC2N_EXCERPT).head(200),  # 6 days: promtool writes one block per 2 h
        read_azure2019(AZURE2019),
        Cluster(120, HPC2N_CORES_PER_NODE, HPC2N_MEMORY_PER_NODE),
        prices=prices,
    )
    out_dir = tmp_path / "replay-out"
    save_replay_series(result, prices, out_dir, node="hpc2n")
    prom = load_replay(tmp_path, "--replay-out", out_dir)
    try:
        span_h = math.ceil((result.t[-1] - result.t[0] + result.step_s) / 3600) + 1
        for name, series in result.policies.items():
            stored = prom.query(
                f'sum(max_over_time(colocate_recovered_cost_total{{policy="{name}"}}[{span_h}h]))'
            )
            assert float(stored[0]["value"][1]) == pytest.approx(
                series.summary["recovered_cost"], rel=0.01
            )
        wasted = prom.query(
            f"sum by (policy) (max_over_time(colocate_wasted_cost_total[{span_h}h]))"
        )
        assert {r["metric"]["policy"] for r in wasted} == set(result.policies)
        for r in wasted:
            assert float(r["value"][1]) == pytest.approx(float(result.wasted_cost.sum()), rel=0.01)
    finally:
        prom.stop()
