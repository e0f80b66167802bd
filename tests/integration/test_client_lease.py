"""The whole lease path with real processes: ``colocate broker`` + ``colocate agent --standalone``
as subprocesses, the Python client in the test, invocations straight to the executor."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import cloudpickle
import httpx
import pytest

from colocate import Client, ExecutorLost, LeaseDenied, LeaseEvicted, LeaseExpired, Unauthorized
from colocate.auth.node import node_key
from colocate.broker.secret import load_or_create_secret
from colocate.client.executor import LeaseExecutor
from colocate.tokens import LeaseClaims, sign_lease
from tests.integration.leasing import Service, control_auth, services, start_cluster, wait_until

pytestmark = pytest.mark.slow

# Ship this module's functions by value: workers run as `nobody`, who may not be able to
# import the test suite (or a Python installed under /root) by reference.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def payload_size(data: bytes) -> int:
    return len(data)


def cores_i_run_on(_: object = None) -> list[int]:
    return sorted(os.sched_getaffinity(0))


def nap(seconds: float) -> str:
    time.sleep(seconds)
    return "woke"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[Service, Service]]:
    """A broker and one standalone agent offering 2 cores and 2 GiB, reporting every 0.2 s."""
    broker, (agent,) = start_cluster(tmp_path, {"n1": (2, "2GiB")})
    with services(broker, agent):
        yield broker, agent
    for service in (broker, agent):
        assert "Traceback" not in service.logs(), service.logs()


def lease_ids(broker: Service) -> list[str]:
    return [lease.lease_id for lease in Client(broker.url).status().leases]


def test_the_contract_example_works_and_release_frees_the_cores(
    cluster: tuple[Service, Service],
) -> None:
    broker, _ = cluster
    with Client(broker.url).lease(cores=1, memory="512MiB", duration="5m") as lease:
        ex = lease.executor()
        assert ex.invoke(payload_size, b"x" * 64) == 64
        assert ex.submit(payload_size, b"x" * 64).result() == 64
        assert list(ex.map(payload_size, [b"", b"ab"])) == [0, 2]
        assert lease_ids(broker) == [lease.lease_id]
        assert lease.memory_bytes == 512 * 1024**2 and 295 < lease.remaining_s <= 300
    assert lease_ids(broker) == []
    node = Client(broker.url).status().nodes[0]
    assert len(node.free_cpu_ids) == 2 and node.free_memory_bytes == 2 * 1024**3


def test_functions_run_only_on_the_leased_cores(cluster: tuple[Service, Service]) -> None:
    broker, _ = cluster
    client = Client(broker.url)
    with (
        client.lease(cores=1, memory="256MiB", duration="1m") as first,
        client.lease(cores=1, memory="256MiB", duration="1m") as second,
    ):
        assert set(first.cpu_ids).isdisjoint(second.cpu_ids)
        assert first.executor().invoke(cores_i_run_on) == list(first.cpu_ids)
        assert second.executor().invoke(cores_i_run_on) == list(second.cpu_ids)


def test_full_node_denies_with_what_is_left_then_grants_after_release(
    cluster: tuple[Service, Service],
) -> None:
    broker, _ = cluster
    client = Client(broker.url)
    held = client.lease(cores=2, memory="1GiB", duration="1m")
    with pytest.raises(LeaseDenied) as denied:
        client.lease(cores=1, memory="512MiB", duration="1m")
    assert denied.value.available == {"cores": 0, "memory_bytes": 1024**3, "nodes": 1}
    with pytest.raises(LeaseDenied) as too_much:
        client.lease(cores=1, memory="8GiB", duration="1m")
    assert "ask for less" in str(too_much.value)
    held.release()
    with client.lease(cores=1, memory="512MiB", duration="1m") as lease:
        assert lease.executor().invoke(payload_size, b"abc") == 3


def test_renew_outlives_the_first_expiry_and_release_is_final(
    cluster: tuple[Service, Service],
) -> None:
    broker, _ = cluster
    lease = Client(broker.url).lease(cores=1, memory="256MiB", duration=1.5)
    first_expiry = lease.expires_at
    lease.renew(duration=30)
    assert lease.expires_at > first_expiry + 25
    time.sleep(2.0)  # past the first expiry: the agent must know the new one
    assert lease.executor().invoke(payload_size, b"still here") == 10
    assert Client(broker.url).status().leases[0].expires_at == pytest.approx(
        lease.expires_at, abs=0.01
    )
    lease.release()
    lease.release()  # twice is fine
    assert lease_ids(broker) == []
    with pytest.raises(LeaseExpired, match="released"):
        lease.renew(duration=30)
    with pytest.raises(LeaseExpired):
        lease.executor()


def test_expiry_evicts_the_executor_and_in_flight_calls_end_expired(
    cluster: tuple[Service, Service],
) -> None:
    broker, _ = cluster
    lease = Client(broker.url).lease(cores=1, memory="256MiB", duration=1.0)
    ex = lease.executor()
    running: Future[str] = ex.submit(nap, 30)
    with pytest.raises(LeaseExpired):
        running.result(timeout=10)
    assert lease.lease_id not in lease_ids(broker)
    with pytest.raises(LeaseExpired):
        lease.renew(duration=10)
    with pytest.raises(LeaseExpired):
        lease.executor()
    ex.shutdown(wait=False)


def test_agent_revoke_ends_in_flight_calls_with_lease_evicted(
    cluster: tuple[Service, Service], tmp_path: Path
) -> None:
    broker, agent = cluster
    lease = Client(broker.url).lease(cores=1, memory="256MiB", duration="1m")
    ex = lease.executor()
    running = [ex.submit(nap, 30) for _ in range(3)]
    started = time.monotonic()
    reply = httpx.post(
        f"{agent.url}/v1/leases/{lease.lease_id}/revoke",
        json={"grace_s": 0.2, "reason": "job_start"},
        auth=control_auth(tmp_path, "n1"),
        timeout=10,
    )
    assert reply.status_code == 200, reply.text
    for future in running:
        with pytest.raises(LeaseEvicted):
            future.result(timeout=10)
    assert time.monotonic() - started < 5
    wait_until(
        lambda: lease.lease_id not in lease_ids(broker),
        timeout_s=5,
        what="broker to drop the lease",
    )
    with pytest.raises(LeaseEvicted):
        lease.renew(duration=10)
    ex.shutdown(wait=False)


def test_executor_refuses_forged_altered_and_expired_tokens(
    cluster: tuple[Service, Service], tmp_path: Path
) -> None:
    broker, _ = cluster
    with Client(broker.url).lease(cores=1, memory="256MiB", duration="1m") as lease:
        secret = node_key(
            load_or_create_secret(tmp_path / "secret"), lease.node
        )  # tokens: the node's key
        claims = LeaseClaims(
            lease.lease_id, lease.node, lease.cpu_ids, lease.memory_bytes, lease.expires_at
        )
        forged = sign_lease(b"not the cluster secret" * 2, claims)
        _, mac = lease.token.split(".")
        other = sign_lease(
            secret,
            LeaseClaims("l-other", lease.node, lease.cpu_ids, lease.memory_bytes, lease.expires_at),
        )
        spliced = other.split(".")[0] + "." + mac
        expired = sign_lease(
            secret,
            LeaseClaims(
                lease.lease_id, lease.node, lease.cpu_ids, lease.memory_bytes, time.time() - 1
            ),
        )
        for token in (forged, spliced, "garbage", ""):
            with pytest.raises(Unauthorized):
                LeaseExecutor(lease.address, token, lease_id=lease.lease_id, workers=1)
        with pytest.raises(LeaseExpired):
            LeaseExecutor(lease.address, expired, lease_id=lease.lease_id, workers=1)
        # The genuine token still works after all that.
        assert lease.executor().invoke(payload_size, b"ok") == 2


def test_best_fit_packs_a_small_lease_onto_the_smaller_node(tmp_path: Path) -> None:
    broker, (big, small) = start_cluster(
        tmp_path, {"big": (2, "1GiB"), "small": (1, "1GiB")}, placement="best_fit"
    )
    with (
        services(broker, big, small),
        Client(broker.url).lease(cores=1, memory="256MiB", duration="1m") as lease,
    ):
        assert lease.node == "small"
        assert lease.executor().invoke(payload_size, b"xy") == 2
        # The big node stays whole for a 2-core request.
        with Client(broker.url).lease(cores=2, memory="256MiB", duration="1m") as pair:
            assert pair.node == "big"


def test_a_node_whose_agent_died_is_skipped_before_the_broker_notices(tmp_path: Path) -> None:
    broker, (big, small) = start_cluster(
        tmp_path, {"big": (2, "1GiB"), "small": (1, "1GiB")}, placement="best_fit"
    )
    with services(broker, big, small):
        small.stop(signal.SIGKILL)  # best fit would pick it; the broker still thinks it is up
        assert [n.alive for n in Client(broker.url).status().nodes] == [True, True]
        with Client(broker.url).lease(cores=1, memory="256MiB", duration="1m") as lease:
            assert lease.node == "big"
            assert lease.executor().invoke(payload_size, b"abc") == 3


def exit_worker() -> None:
    os._exit(3)


def test_a_crashed_worker_frees_its_lease(cluster: tuple[Service, Service]) -> None:
    broker, _ = cluster
    client = Client(broker.url)
    lease = client.lease(cores=2, memory="512MiB", duration="1m")
    with pytest.raises(ExecutorLost):
        lease.executor(workers=1).invoke(exit_worker)
    # The agent notices, evicts the lease and tells the broker: the cores are free again.
    wait_until(lambda: client.status().leases == [], timeout_s=5, what="broker to drop the lease")
    with pytest.raises(LeaseEvicted):
        lease.renew(duration=60)
    with client.lease(cores=2, memory="512MiB", duration="1m") as fresh:
        assert fresh.executor().invoke(payload_size, b"ok") == 2
