"""The broker as a real process: bad input gets a clear 4xx and never takes it down; agents
must prove the cluster secret; denials say what is free; the client names an absent broker."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from colocate import BackendUnavailable, Client, ConfigError, LeaseDenied, LeaseError
from colocate.auth import ClientAuth
from tests.integration.leasing import Service, control_auth, start_broker

GiB = 1024**3


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Service]:
    service = start_broker(tmp_path)
    yield service
    service.stop()
    assert "Traceback" not in service.logs(), service.logs()


@pytest.fixture(scope="module")
def shared_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """One broker for the tests that only check it survives bad input."""
    service = start_broker(tmp_path_factory.mktemp("broker"))
    yield service
    service.stop()
    assert "Traceback" not in service.logs(), service.logs()


def register(broker: Service, tmp: Path, node: str, cores: int, memory: int) -> None:
    body = {
        "url": "http://127.0.0.1:9",
        "cpu_ids": list(range(cores)),
        "memory_bytes": memory,
        "generation": 0,
    }
    reply = httpx.put(f"{broker.url}/v1/nodes/{node}", json=body, auth=control_auth(tmp, node))
    assert reply.status_code == 200, reply.text


GARBAGE: list[tuple[str, str, bytes, dict[str, str]]] = [
    ("POST", "/v1/leases", b"not json at all", {"content-type": "application/json"}),
    ("POST", "/v1/leases", b"\xff\xfe\x00garbage", {"content-type": "application/json"}),
    ("POST", "/v1/leases", b'{"cores": "many"}', {"content-type": "application/json"}),
    ("POST", "/v1/leases", b'{"cores": -1}', {"content-type": "application/json"}),
    ("POST", "/v1/leases", b'{"cores": 1e400}', {"content-type": "application/json"}),
    ("POST", "/v1/leases", b'{"cores": 1, "memory": "lots"}', {"content-type": "application/json"}),
    ("POST", "/v1/leases", b'{"cores": 1, "memory": 0}', {"content-type": "application/json"}),
    (
        "POST",
        "/v1/leases",
        b'{"cores": 1, "duration": "forever"}',
        {"content-type": "application/json"},
    ),
    ("POST", "/v1/leases", b'{"cores": 1, "gpus": 4}', {"content-type": "application/json"}),
    ("POST", "/v1/leases", b"[1, 2, 3]", {"content-type": "application/json"}),
    ("POST", "/v1/leases", b"[" * 10000 + b"]" * 10000, {"content-type": "application/json"}),
    (
        "POST",
        "/v1/leases",
        b'{"cores": 1' + b" " * 2_000_000 + b"}",
        {"content-type": "application/json"},
    ),
    ("POST", "/v1/leases/xyz/renew", b'{"duration": []}', {"content-type": "application/json"}),
    ("PUT", "/v1/nodes/bad%20name", b"{}", {"content-type": "application/json"}),
    ("PUT", "/v1/nodes/n1", b'{"url": 5}', {"content-type": "application/json"}),
    ("GET", "/v1/nope", b"", {}),
    ("PATCH", "/v1/leases", b"", {}),
]


@pytest.mark.parametrize(("method", "path", "body", "headers"), GARBAGE, ids=range(len(GARBAGE)))
def test_garbage_gets_a_clear_4xx_and_the_broker_keeps_serving(
    shared_broker: Service, method: str, path: str, body: bytes, headers: dict[str, str]
) -> None:
    broker = shared_broker
    reply = httpx.request(method, f"{broker.url}{path}", content=body, headers=headers, timeout=10)
    assert 400 <= reply.status_code < 500, reply.text
    error = reply.json()
    assert (
        error["error"] in {"BadRequest", "Unauthorized", "PayloadTooLarge"}
        and len(error["message"]) > 10
    )
    assert broker.alive()
    assert httpx.get(f"{broker.url}/healthz").json() == {"ok": True}


def test_raw_socket_garbage_and_vanishing_clients_do_not_hurt_the_broker(
    shared_broker: Service,
) -> None:
    broker = shared_broker
    host, port = broker.url.removeprefix("http://").rsplit(":", 1)
    for junk in (
        b"\x00" * 4096,
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        b'POST /v1/leases HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"co',
    ):
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(junk)  # and vanish mid-request
    assert broker.alive()
    assert httpx.get(f"{broker.url}/healthz").json() == {"ok": True}


def test_bad_field_is_named_in_the_message(broker: Service) -> None:
    reply = httpx.post(
        f"{broker.url}/v1/leases", json={"cores": 1, "memory": "lots"}, auth=ClientAuth()
    )
    assert reply.status_code == 400
    assert "memory" in reply.json()["message"] and "512MiB" in reply.json()["message"]


def test_agent_report_without_the_cluster_secret_is_refused(
    broker: Service, tmp_path: Path
) -> None:
    body = {"url": "http://127.0.0.1:9", "cpu_ids": [0], "memory_bytes": GiB, "generation": 0}
    for headers in ({}, {"X-Colocate-Control": "0" * 64}):
        reply = httpx.put(f"{broker.url}/v1/nodes/intruder", json=body, headers=headers)
        assert reply.status_code == 401 and "secret" in reply.json()["message"]
    assert httpx.get(f"{broker.url}/v1/status", auth=ClientAuth()).json()["nodes"] == []


def test_denial_says_what_is_available(broker: Service, tmp_path: Path) -> None:
    with Client(broker.url) as client:
        with pytest.raises(LeaseDenied, match="no node agent is registered") as no_nodes:
            client.lease(cores=1, memory="512MiB", duration="1m")
        assert no_nodes.value.available["nodes"] == 0
        register(broker, tmp_path, "small", cores=2, memory=GiB)
        register(broker, tmp_path, "big", cores=3, memory=GiB // 2)
        with pytest.raises(LeaseDenied) as denied:
            client.lease(cores=4, memory="256MiB", duration="1m")
    assert denied.value.available == {"cores": 3, "memory_bytes": GiB // 2, "nodes": 2}
    assert "big" in str(denied.value) and "3 cores" in str(denied.value)


def test_status_lists_registered_nodes_and_marks_silent_ones(tmp_path: Path) -> None:
    # node_timeout_s comes from the config (environment override here).
    import os

    os.environ["COLOCATE_BROKER__NODE_TIMEOUT_S"] = "0.5"
    try:
        service = start_broker(tmp_path)
    finally:
        del os.environ["COLOCATE_BROKER__NODE_TIMEOUT_S"]
    try:
        register(service, tmp_path, "n1", cores=2, memory=GiB)
        nodes = Client(service.url).status().nodes
        assert [(n.node, n.alive, n.free_cpu_ids) for n in nodes] == [("n1", True, [0, 1])]
        time.sleep(0.7)
        assert [n.alive for n in Client(service.url).status().nodes] == [False]
        with pytest.raises(LeaseDenied):
            Client(service.url).lease(cores=1, memory=1, duration=10)
    finally:
        service.stop()


def test_unknown_lease_is_a_lease_error_naming_it(broker: Service) -> None:
    reply = httpx.delete(f"{broker.url}/v1/leases/l-nosuch", auth=ClientAuth())
    assert reply.status_code == 404 and reply.json()["lease_id"] == "l-nosuch"
    with pytest.raises(LeaseError, match="l-nosuch"):
        Client(broker.url)._call("POST", "/leases/l-nosuch/renew", {"duration": 10})


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"cores": 0}, "cores=0"),
        ({"memory": 0}, "memory: Input should be greater than 0"),
        ({"memory": "lots"}, "cannot read size"),
        ({"duration": 0}, "duration: Input should be greater than or equal to 1"),
    ],
)
def test_client_refuses_bad_requests_before_sending(kwargs: dict[str, object], says: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(says)):
        Client("http://127.0.0.1:9").lease(**kwargs)


def test_unreachable_broker_names_its_url() -> None:
    url = "http://127.0.0.1:9"  # discard port: nothing listens
    with pytest.raises(
        BackendUnavailable, match=re.escape("broker http://127.0.0.1:9 did not answer")
    ):
        Client(url, timeout_s=2).lease(cores=1, memory="512MiB", duration="5m")


def test_openapi_describes_the_lease_api(broker: Service) -> None:
    spec = httpx.get(f"{broker.url}/openapi.json").json()
    assert {"/v1/leases", "/v1/leases/{lease_id}/renew", "/v1/status", "/v1/nodes/{node}"} <= set(
        spec["paths"]
    )
    request = spec["components"]["schemas"]["LeaseRequest"]
    assert request["additionalProperties"] is False and set(request["properties"]) == {
        "cores",
        "memory",
        "duration",
        "account",
    }


def test_broker_exports_its_view_and_lease_requests_to_prometheus(
    broker: Service, tmp_path: Path
) -> None:
    register(broker, tmp_path, "n1", 2, 4 * GiB)
    with pytest.raises(LeaseDenied):
        Client(broker.url).lease(cores=8, memory="1GiB", duration="1m").__enter__()
    text = httpx.get(f"{broker.url}/metrics/").text
    assert 'colocate_broker_cores{node="n1",state="offered"} 2.0' in text
    assert 'colocate_broker_lease_requests_total{result="denied"} 1.0' in text
    assert 'colocate_broker_nodes{state="alive"} 1.0' in text
