"""No single point of failure (issue 13 item 2): two brokers serve the dev cluster at once.

Two ``colocate broker`` processes share the cluster secret and one PostgreSQL ledger; two
Slurm-integrated agents (one per dev-cluster node, each lending the idle core of a running
job) report to both. Two clients lease and release in a loop, one preferring each broker,
while one broker is SIGKILLed halfway. Every lease is granted once (no core of a node is
held by two grants at the same time, no lease id twice) or refused with a clear LeaseDenied;
no client sees any other error, and no call needs more than one automatic retry.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from colocate import LeaseDenied
from colocate.auth import ClientAuth
from colocate.broker.ledger import Ledger
from colocate.client.lease import Client
from policies.prices import Prices
from tests.conftest import require
from tests.integration.conftest import JobSubmitter, SlurmCluster, _remove_if_stale
from tests.integration.leasing import Service, _launch, _ready, free_port, wait_until
from tests.integration.slurm_agent import (
    HALF_BUSY,
    MiB,
    _write_config,
    idle_node,
    job_cpus,
    job_script,
)
from tests.integration.test_ledger_postgres import postgres_url  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.slurm, pytest.mark.root, pytest.mark.slow]

BEFORE_KILL_S = 6.0
AFTER_KILL_S = 8.0
HOLD_S = 0.3


@dataclass
class Traffic:
    """What one client saw: grants (lease id, node, cpus, granted, released), denials, errors."""

    name: str
    grants: list[tuple[str, str, tuple[int, ...], float, float]] = field(default_factory=list)
    denied: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    most_retries: int = 0
    answered_at: list[float] = field(default_factory=list)  # grants and denials


def lease_loop(client: Client, traffic: Traffic, stop: threading.Event) -> None:
    while not stop.is_set():
        before = client.retried
        try:
            lease = client.lease(cores=1, memory=64 * MiB, duration="30s")
        except LeaseDenied as exc:
            traffic.denied.append(str(exc))
            traffic.answered_at.append(time.time())
            time.sleep(0.2)
            continue
        except Exception as exc:  # anything else is a failure the test reports
            traffic.errors.append(f"lease: {type(exc).__name__}: {exc}")
            time.sleep(0.2)
            continue
        finally:
            traffic.most_retries = max(traffic.most_retries, client.retried - before)
        granted = time.time()
        traffic.answered_at.append(granted)
        time.sleep(HOLD_S)
        before = client.retried
        try:
            lease.release()
        except Exception as exc:
            traffic.errors.append(f"release {lease.lease_id}: {type(exc).__name__}: {exc}")
        traffic.most_retries = max(traffic.most_retries, client.retried - before)
        traffic.grants.append((lease.lease_id, lease.node, lease.cpu_ids, granted, time.time()))


def start_broker(tmp: Path, ledger: str, name: str) -> Service:
    port = free_port()
    log = tmp / f"broker-{name}.log"
    argv = [
        "broker", "--listen", f"127.0.0.1:{port}", "--secret-file", str(tmp / "secret"),
        "--ledger", ledger,
    ]  # fmt: skip
    return _ready(f"broker {name}", _launch(argv, log), log)


def start_agent(tmp: Path, node: str, broker_urls: str) -> tuple[Service, str]:
    import tempfile

    state = tempfile.mkdtemp(prefix=f"colocate-{node}-")
    node_tmp = tmp / node
    node_tmp.mkdir()
    config = _write_config(node_tmp, free_port(), None)
    argv = [
        "agent", "--config", str(config), "--node", node, "--broker", broker_urls,
        "--secret-file", str(tmp / "secret"), "--state-dir", state,
    ]  # fmt: skip
    log = tmp / f"agent-{node}.log"
    return _ready(f"agent {node}", _launch(argv, log), log), state


def free_cores(broker: Service, node: str) -> list[int]:
    nodes = httpx.get(f"{broker.url}/v1/status", timeout=5, auth=ClientAuth()).json()["nodes"]
    return next((list(n["free_cpu_ids"]) for n in nodes if n["node"] == node), [])


@pytest.mark.parametrize("killed", [0, 1], ids=["kill-first-broker", "kill-second-broker"])
def test_two_brokers_one_killed_mid_traffic_grant_each_lease_once(
    tmp_path: Path,
    postgres_url: str,  # noqa: F811
    slurm_cluster: SlurmCluster,
    jobs: JobSubmitter,
    killed: int,
) -> None:
    require(os.geteuid() == 0, "the Slurm agent needs root (cgroups, control socket under /run)")
    brokers = [start_broker(tmp_path, postgres_url, "a")]
    brokers.append(start_broker(tmp_path, postgres_url, "b"))  # after a: the secret exists
    urls = ",".join(b.url for b in brokers)
    agents: list[tuple[Service, str, str]] = []
    try:
        nodes = []
        for _ in range(2):
            node = idle_node(slurm_cluster)
            service, state = start_agent(tmp_path, node, urls)
            agents.append((service, state, node))
            nodes.append(node)
        for node in nodes:
            job = jobs.submit(job_script(HALF_BUSY), "-w", node, "-c2", "--mem=300M")
            assert len(job_cpus(job.job_id, node)) == 2
        for broker in brokers:  # both brokers hear every node: each offers its idle core
            wait_until(
                lambda b=broker: all(free_cores(b, n) for n in nodes),  # type: ignore[misc]
                40,
                f"both idle cores on {broker.name}",
            )

        traffic = [Traffic("a-first"), Traffic("b-first")]
        clients = [Client(urls), Client([brokers[1].url, brokers[0].url])]
        stop = threading.Event()
        threads = [
            threading.Thread(target=lease_loop, args=(c, t, stop), daemon=True)
            for c, t in zip(clients, traffic, strict=True)
        ]
        for thread in threads:
            thread.start()
        time.sleep(BEFORE_KILL_S)
        killed_at = time.time()
        brokers[killed].process.send_signal(signal.SIGKILL)
        time.sleep(AFTER_KILL_S)
        stop.set()
        for thread in threads:
            thread.join(30)
        for client in clients:
            client.close()

        grants = [g for t in traffic for g in t.grants]
        report = {
            t.name: (len(t.grants), len(t.denied), t.errors, t.most_retries, t.denied[-1:])
            for t in traffic
        }
        print("traffic (grants, denials, errors, most retries of one call):", report)
        assert not any(t.errors for t in traffic), report
        assert all(t.most_retries <= 1 for t in traffic), report
        # Each lease once: unique ids, and no core held by two grants at once.
        assert len({g[0] for g in grants}) == len(grants), report
        for i, (id1, node1, cpus1, start1, end1) in enumerate(grants):
            for id2, node2, cpus2, start2, end2 in grants[i + 1 :]:
                if node1 == node2 and set(cpus1) & set(cpus2):
                    assert end1 <= start2 or end2 <= start1, f"{id1} and {id2} overlap on {node1}"
        # Refusals are clear: they say what is free and what to do.
        unclear = [m for t in traffic for m in t.denied if "free" not in m]
        assert not unclear, unclear
        # Leases kept coming after the kill, through the surviving broker.
        survivor = brokers[1 - killed]
        seen = httpx.get(f"{survivor.url}/v1/status", timeout=5, auth=ClientAuth()).json()
        held = [(n["node"], n["cpu_ids"], n["free_cpu_ids"]) for n in seen["nodes"]]
        held_leases = [(le["node"], le["lease_id"], le["cpu_ids"]) for le in seen["leases"]]
        # Both clients kept getting answers after the kill (the one whose broker died, through
        # the other), and leases were granted after it unless no node offered a core by then
        # (the Slurm agents lend a job's idle core only while it stays idle on this loaded
        # machine: refusing is then the right answer).
        assert all(any(t > killed_at + 0.5 for t in tr.answered_at) for tr in traffic), report
        offered = any(cpus for _, cpus, _ in held)
        assert any(g[3] > killed_at + 0.5 for g in grants) or not offered, (
            report,
            held,
            held_leases,
        )
        assert len(grants) >= 4, report
        # Both brokers wrote every grant to the one shared ledger, once.
        ledger = Ledger.postgres(postgres_url, Prices())
        try:
            rows = {r.lease_id: r for r in ledger.rows()}
        finally:
            ledger.close_db()
        assert {g[0] for g in grants} <= set(rows), report
    finally:
        for service, state, _node in agents:
            service.stop()
            shutil.rmtree(state, ignore_errors=True)
        for broker in brokers:
            broker.stop()
        for service, _state, node in agents:
            assert "Traceback" not in service.logs(), service.logs()
            from slurm_plugin.devcluster import CONTROL_SOCKET

            _remove_if_stale(CONTROL_SOCKET.replace("{node}", node))
