"""``colocate agent --standalone`` as a real process: it waits for a broker, guards its API with
the cluster secret, never starts more than it offers, and refuses bad options in one line."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import httpx
import pytest

from colocate import Client, LeaseEvicted, LeaseExpired
from colocate.auth import ClientAuth
from tests.integration.leasing import (
    Service,
    control_auth,
    free_port,
    node_registered,
    services,
    start_agent,
    start_broker,
    start_cluster,
    wait_until,
)

GiB = 1024**3
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers run as nobody


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Service]:
    """An agent offering 1 core and 1 GiB to a broker that is not there."""
    service = start_agent(
        tmp_path, f"http://127.0.0.1:{free_port()}", node="solo", cores=1, memory="1GiB"
    )
    yield service
    service.stop()
    assert "Traceback" not in service.logs(), service.logs()


def start_body(lease_id: str, cpu_ids: list[int], memory: int) -> dict[str, object]:
    return {
        "lease_id": lease_id,
        "cpu_ids": cpu_ids,
        "memory_bytes": memory,
        "granted_at": 0.0,
        "expires_at": 4e9,
    }


def test_agent_registers_once_the_broker_comes_up(tmp_path: Path) -> None:
    port = free_port()
    agent = start_agent(
        tmp_path, f"http://127.0.0.1:{port}", node="early", cores=1, memory="512MiB"
    )
    with services(agent):
        broker = start_broker(tmp_path, listen=f"127.0.0.1:{port}")
        with services(broker):
            wait_until(
                lambda: node_registered(broker.url, "early"), timeout_s=10, what="late registration"
            )
            node = httpx.get(f"{broker.url}/v1/status", auth=ClientAuth()).json()["nodes"][0]
            assert (len(node["cpu_ids"]), node["memory_bytes"]) == (1, 512 * 1024**2)
            assert node["url"] == agent.url
    assert "broker" in agent.logs() and "retrying" in agent.logs()


def test_agent_api_needs_the_cluster_secret(agent: Service, tmp_path: Path) -> None:
    assert httpx.get(f"{agent.url}/v1/status").status_code == 401
    bad = httpx.post(
        f"{agent.url}/v1/leases",
        json=start_body("l-x", [0], GiB),
        headers={"X-Colocate-Control": "f" * 64},
    )
    assert bad.status_code == 401 and "secret" in bad.json()["message"]
    status = httpx.get(f"{agent.url}/v1/status", auth=control_auth(tmp_path, "solo")).json()
    assert (status["node"], len(status["cpu_ids"]), status["memory_bytes"], status["leases"]) == (
        "solo",
        1,
        GiB,
        [],
    )


def test_agent_never_starts_more_than_it_offers(agent: Service, tmp_path: Path) -> None:
    signed = control_auth(tmp_path, "solo")
    offered = httpx.get(f"{agent.url}/v1/status", auth=signed).json()["cpu_ids"]
    other_core = max(offered) + 1
    for body in (
        start_body("l-toomany", [*offered, other_core], GiB // 2),
        start_body("l-elsewhere", [other_core], GiB // 2),
        start_body("l-toobig", offered, 2 * GiB),
    ):
        reply = httpx.post(f"{agent.url}/v1/leases", json=body, auth=signed, timeout=10)
        assert reply.status_code == 409, reply.text
        assert reply.json()["error"] == "LeaseDenied" and "free now" in reply.json()["message"]
    started = httpx.post(
        f"{agent.url}/v1/leases",
        json=start_body("l-fits", offered, GiB // 2),
        auth=signed,
        timeout=10,
    )
    assert started.status_code == 200, started.text
    assert started.json()["address"].startswith("tcp://")
    again = httpx.post(
        f"{agent.url}/v1/leases",
        json=start_body("l-second", offered, GiB // 4),
        auth=signed,
        timeout=10,
    )
    assert again.status_code == 409
    released = httpx.delete(f"{agent.url}/v1/leases/l-fits", auth=signed, timeout=10)
    assert released.status_code == 200 and released.json()["reason"] == "released"
    assert httpx.get(f"{agent.url}/v1/status", auth=signed).json()["leases"] == []


@pytest.mark.parametrize(
    "body",
    [
        b"nonsense",
        b'{"lease_id": "../../etc", "cpu_ids": [0], "memory_bytes": 1, "granted_at": 0, "expires_at": 4e9}',
        b'{"lease_id": "l", "cpu_ids": [-1], "memory_bytes": 1, "granted_at": 0, "expires_at": 4e9}',
        b'{"lease_id": "l", "cpu_ids": [0], "memory_bytes": 1, "granted_at": 0, "expires_at": 1}',
    ],
    ids=["not-json", "path-in-lease-id", "negative-core", "already-expired"],
)
def test_agent_answers_bad_starts_with_4xx_and_keeps_running(
    agent: Service, tmp_path: Path, body: bytes
) -> None:
    headers = {"content-type": "application/json"}
    reply = httpx.post(
        f"{agent.url}/v1/leases",
        content=body,
        headers=headers,
        auth=control_auth(tmp_path, "solo"),
        timeout=10,
    )
    assert 400 <= reply.status_code < 500, reply.text
    assert len(reply.json()["message"]) > 10
    assert agent.alive() and httpx.get(f"{agent.url}/healthz").status_code == 200


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["agent"], "--standalone"),
        (["agent", "--standalone", "--cores", "999"], "--cores 999"),
        (["agent", "--standalone", "--memory", "lots"], "lots"),
        (["agent", "--standalone", "--listen", "127.0.0.1:notaport"], "listen address"),
    ],
)
def test_bad_agent_options_fail_with_one_clear_line(
    tmp_path: Path, argv: list[str], says: str
) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "colocate",
            *argv,
            "--secret-file",
            str(tmp_path / "secret"),
            "--state-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0] and "Traceback" not in result.stderr


def nap(seconds: float) -> str:
    time.sleep(seconds)
    return "woke"


def test_stopping_the_agent_evicts_its_leases_and_tells_the_broker(tmp_path: Path) -> None:
    broker, (agent,) = start_cluster(tmp_path, {"leaving": (1, "512MiB")}, interval_s=5)
    with services(broker, agent):
        client = Client(broker.url)
        lease = client.lease(cores=1, memory="256MiB", duration="5m")
        running = lease.executor().submit(nap, 30)
        agent.stop()
        assert agent.process.returncode == 0
        with pytest.raises(LeaseEvicted):
            running.result(timeout=10)
        # Told at once, not after the node timeout or the lease's expiry.
        assert client.status().leases == []
        with pytest.raises(LeaseEvicted):
            lease.renew(duration=60)
    assert "Traceback" not in agent.logs(), agent.logs()


def test_a_lease_ends_at_its_expiry_not_at_the_next_report(tmp_path: Path) -> None:
    broker, (agent,) = start_cluster(tmp_path, {"slow": (1, "512MiB")}, interval_s=30)
    with services(broker, agent):
        lease = Client(broker.url).lease(cores=1, memory="256MiB", duration=1.0)
        running = lease.executor().submit(nap, 30)
        with pytest.raises(LeaseExpired):
            running.result(timeout=10)
        assert time.time() - lease.expires_at < 3.0  # not the 30 s report interval


def test_restarted_agent_adopts_the_live_lease_and_its_client_sees_no_error(tmp_path: Path) -> None:
    broker, (agent,) = start_cluster(tmp_path, {"phoenix": (1, "512MiB")}, interval_s=0.2)
    with services(broker):
        client = Client(broker.url)
        lease = client.lease(cores=1, memory="256MiB", duration="5m")
        executor = lease.executor()
        running = executor.submit(nap, 3)
        agent.stop(signal.SIGKILL, keep_state=True)  # crash: no goodbye to the broker
        reborn = start_agent(tmp_path, broker.url, node="phoenix", cores=1, memory="512MiB")
        with services(reborn):
            # The new agent adopts the executor the old one left (lease valid, core free): the
            # call in flight finishes, the broker keeps the lease, renew and invoke just work.
            assert running.result(timeout=30) == "woke"
            assert [held.lease_id for held in client.leases()] == [lease.lease_id]
            lease.renew(duration=60)
            assert executor.invoke(nap, 0) == "woke"
            lease.release()
            wait_until(
                lambda: client.status().leases == [],
                timeout_s=10,
                what="broker to drop the released lease",
            )
            with client.lease(cores=1, memory="256MiB", duration="1m") as fresh:
                assert fresh.executor().invoke(nap, 0) == "woke"
        assert "adopted" in reborn.logs(), reborn.logs()
        assert "Traceback" not in reborn.logs(), reborn.logs()
