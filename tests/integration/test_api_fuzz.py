"""A bounded schemathesis run over the broker's and the node agent's OpenAPI (issue 12): no
request the description allows may get a 5xx, be refused as invalid (400), or get an answer
the description does not state. Plus the hand-made findings of the fuzzing report."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx
import pytest

from colocate.auth import ClientAuth, munge
from colocate.auth.identity import request_payload
from colocate.auth.node import node_key, sign
from colocate.broker.secret import load_or_create_secret
from tests.integration.leasing import Service, services, start_agent, start_broker

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.root]
EXAMPLES = 60  # per operation: ~10 s for the broker, a little more for the agent


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, Service, Path]]:
    tmp = tmp_path_factory.mktemp("fuzz")
    broker = start_broker(tmp)
    agent = start_agent(tmp, broker.url, node="fuzz1", cores=1, memory="512MiB")
    with services(broker, agent):
        yield broker, agent, tmp
    for service in (broker, agent):
        assert "Traceback" not in service.logs(), service.logs()


def signed_by(tmp: Path, node: str | None) -> Any:
    """A requests auth hook signing as ``node``'s agent (None: the node named in the path)."""
    secret = load_or_create_secret(tmp / "secret")

    def hook(request: Any) -> Any:
        path = urlsplit(request.url).path
        name = node or unquote(path.rsplit("/", 1)[-1])
        body = request.body or b""
        request.headers.update(
            sign(
                node_key(secret, name),
                name,
                request.method,
                path,
                body if isinstance(body, bytes) else body.encode(),
            )
        )
        return request

    return hook


def fuzz(url: str, headers_for: Any, node_signer: Any = lambda template: None) -> list[str]:
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    problems: list[str] = []
    for result in schema.get_all_operations():
        fuzz_operation(result.ok(), headers_for, node_signer, problems)
    return problems


def fuzz_operation(operation: Any, headers_for: Any, node_signer: Any, problems: list[str]) -> None:
    @given(case=operation.as_strategy())
    @settings(
        max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    def run(case: Any) -> None:
        headers = {
            **(case.headers or {}),
            **headers_for(case.method, case.formatted_path, operation.path),
        }
        response = case.call(headers=headers, auth=node_signer(operation.path), timeout=10)
        if response.status_code >= 500:
            problems.append(
                f"{case.method} {case.formatted_path}: HTTP {response.status_code} {response.text[:200]}"
            )
        try:
            case.validate_response(response)
        except BaseException as exc:  # schemathesis' FailureGroup
            problems.append(f"{case.method} {case.formatted_path}: {str(exc)[:400]}")

    run()


def test_broker_openapi_fuzz_finds_no_server_error_or_mismatch(
    stack: tuple[Service, Service, Path],
) -> None:
    broker, _, tmp = stack

    def headers(method: str, path: str, template: str) -> dict[str, str]:
        if template == "/v1/nodes/{node}":
            return {}
        return {"Authorization": "MUNGE " + munge.encode(request_payload(method, path))}

    node_signed = signed_by(tmp, None)
    assert (
        fuzz(
            broker.url,
            headers,
            lambda template: node_signed if template == "/v1/nodes/{node}" else None,
        )
        == []
    )


def test_agent_openapi_fuzz_finds_no_server_error_or_mismatch(
    stack: tuple[Service, Service, Path],
) -> None:
    _, agent, tmp = stack
    agent_signed = signed_by(tmp, "fuzz1")
    problems = fuzz(agent.url, lambda *_: {}, lambda template: agent_signed)
    assert problems == [], "\n".join(p[:300].replace("\n", " ") for p in problems)


def auth(method: str, path: str) -> dict[str, str]:
    return {"Authorization": "MUNGE " + munge.encode(request_payload(method, path))}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"memory": "9" * 400}, "memory"),  # was HTTP 500 (OverflowError)
        ({"memory": 10**400}, "memory"),
        ({"cores": True}, "cores"),  # was accepted as 1
        ({"cores": "1"}, "cores"),
        ({"duration": 1e-9}, "duration"),  # was 503 "expires before its executor could start"
        ({"duration": True}, "duration"),
        ({"duration": float("1e308") * 10}, "duration"),
    ],
)
def test_hand_made_findings_get_400_naming_the_field(
    stack: tuple[Service, Service, Path], body: dict[str, Any], field: str
) -> None:
    broker, _, _ = stack
    content = (
        httpx.Request("POST", "/", json=body).content
        if body.get("duration") != float("inf")
        else b'{"duration": 1e999}'
    )
    reply = httpx.post(
        f"{broker.url}/v1/leases",
        content=content,
        headers={**auth("POST", "/v1/leases"), "content-type": "application/json"},
    )
    assert reply.status_code == 400, reply.text
    assert field in reply.json()["message"]


@pytest.mark.parametrize("key", ["null", "short", "has space in it", "k" * 129])
def test_a_bad_idempotency_key_is_a_declared_400_naming_the_header(
    stack: tuple[Service, Service, Path], key: str
) -> None:
    """The header is an optional string of 8-128 safe characters, never null (a fuzzer sent
    "null" for the nullable form the description had): anything else is a 400 it declares."""
    broker, _, _ = stack
    spec = httpx.get(f"{broker.url}/openapi.json").json()["paths"]["/v1/leases"]["post"]
    declared = next(p for p in spec["parameters"] if p["name"] == "Idempotency-Key")
    assert declared["schema"]["type"] == "string" and "anyOf" not in declared["schema"]
    assert "400" in spec["responses"]
    reply = httpx.post(
        f"{broker.url}/v1/leases",
        json={"cores": 1, "memory": "1MiB", "duration": 10},
        headers={**auth("POST", "/v1/leases"), "Idempotency-Key": key},
    )
    assert reply.status_code == 400, reply.text
    assert "Idempotency-Key" in reply.json()["message"]


def test_renew_with_a_boolean_duration_is_refused(stack: tuple[Service, Service, Path]) -> None:
    broker, _, _ = stack
    path = "/v1/leases/l-0000/renew"
    reply = httpx.post(f"{broker.url}{path}", json={"duration": True}, headers=auth("POST", path))
    assert reply.status_code == 400 and "duration" in reply.json()["message"]


def test_non_ascii_control_header_is_401_on_broker_and_agent(
    stack: tuple[Service, Service, Path],
) -> None:
    broker, agent, _ = stack
    header = {"X-Colocate-Control": "é".encode("latin-1")}
    body = {"url": "http://127.0.0.1:9", "cpu_ids": [0], "memory_bytes": 1, "generation": 0}
    assert httpx.put(f"{broker.url}/v1/nodes/n1", json=body, headers=header).status_code == 401  # type: ignore[arg-type]
    assert httpx.get(f"{agent.url}/v1/status", headers=header).status_code == 401  # type: ignore[arg-type]
    bad_auth = {"Authorization": "MUNGE é".encode("latin-1")}
    assert httpx.get(f"{broker.url}/v1/status", headers=bad_auth).status_code == 401  # type: ignore[arg-type]


def test_a_chunked_body_over_the_cap_is_refused_without_reading_it_all(
    stack: tuple[Service, Service, Path],
) -> None:
    broker, _, _ = stack

    def chunks() -> Iterator[bytes]:  # 100 MB of [{},{},...] without a Content-Length
        yield b"["
        for _ in range(100 * 1024):
            yield b"{}," * 341 + b"{}"
        yield b"]"

    started = time.monotonic()
    reply = httpx.post(
        f"{broker.url}/v1/leases",
        content=chunks(),
        headers={**auth("POST", "/v1/leases"), "content-type": "application/json"},
        timeout=30,
    )
    assert reply.status_code == 413 and "limit" in reply.json()["message"]
    assert time.monotonic() - started < 20
    assert httpx.get(f"{broker.url}/healthz").json() == {"ok": True}


def test_half_sent_requests_past_the_fd_limit_do_not_starve_the_broker(
    stack: tuple[Service, Service, Path],
) -> None:
    """1,100 connections that send half a request line: they are closed after the head
    timeout, and a real client is served meanwhile (was: 100 % CPU, 265 MB of tracebacks)."""
    broker, _, _ = stack
    host, port = broker.url.removeprefix("http://").split(":")
    held: list[socket.socket] = []
    try:
        for _ in range(1100):
            try:
                sock = socket.create_connection((host, int(port)), timeout=5)
            except OSError:
                break  # our own process ran out of descriptors first
            sock.sendall(b"POST /v1/leases HTTP/1.1\r\nHost: x\r\n")
            held.append(sock)
        assert len(held) > 900
        with httpx.Client(auth=ClientAuth(), timeout=15) as client:
            assert client.get(f"{broker.url}/v1/status").status_code in (200, 503)
            time.sleep(6)  # the head timeout (5 s) closes the half-sent ones
            assert client.get(f"{broker.url}/v1/status").status_code == 200
    finally:
        for sock in held:
            sock.close()
    assert len(broker.logs()) < 200_000  # no traceback storm
