"""The Client's automatic retries (bounded, jittered) and fail-over between brokers, against
an in-process HTTP transport that plays the brokers' answers (the real broker: see
tests/integration/test_broker_failover.py)."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from colocate.client import lease as lease_module
from colocate.client.lease import Client
from colocate.errors import BackendUnavailable, ConfigError, LeaseDenied

GRANT = {
    "lease_id": "l-0123456789abcdef",
    "node": "n1",
    "address": "tcp://127.0.0.1:1",
    "cpu_ids": [0],
    "memory_bytes": 1 << 20,
    "granted_at": 1.0,
    "expires_at": 4_000_000_000.0,
    "token": "t",
    "max_payload_bytes": 1 << 20,
}
SHED = {"error": "BackendUnavailable", "message": "the broker is at capacity; retry after 1 s"}


@pytest.fixture(autouse=True)
def no_sleeping(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The waits the client chose (not slept: the unit tests stay fast)."""
    waits: list[float] = []
    monkeypatch.setattr(lease_module.time, "sleep", waits.append)
    return waits


def client(
    handler: Callable[[httpx.Request], httpx.Response], urls: str = "http://a:1", retries: int = 3
) -> tuple[Client, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return handler(request)

    c = Client(urls, retries=retries)
    c._http.close()
    c._http = httpx.Client(transport=httpx.MockTransport(record))
    return c, seen


def test_a_shed_lease_request_is_retried_after_retry_after_with_the_same_key(
    no_sleeping: list[float],
) -> None:
    answers = iter(
        [
            httpx.Response(503, json=SHED, headers={"retry-after": "1"}),
            httpx.Response(200, json=GRANT),
        ]
    )
    c, seen = client(lambda r: next(answers))
    lease = c.lease(cores=1, memory="1MiB", duration=60)
    assert lease.lease_id == GRANT["lease_id"]
    assert c.retried == 1
    keys = {r.headers["idempotency-key"] for r in seen}
    assert len(seen) == 2 and len(keys) == 1 and len(keys.pop()) >= 16
    assert [r.headers["idempotency-retry"] for r in seen] == ["0", "1"]
    assert 1.0 <= no_sleeping[0] <= 1.5  # Retry-After, jittered upwards, never sooner


def test_two_lease_requests_carry_different_keys() -> None:
    c, seen = client(lambda r: httpx.Response(200, json=GRANT))
    c.lease()
    c.lease()
    assert seen[0].headers["idempotency-key"] != seen[1].headers["idempotency-key"]


def test_an_unreachable_broker_fails_over_to_the_next_at_once(no_sleeping: list[float]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "a":
            raise httpx.ConnectError("connection refused", request=request)
        if request.method == "GET":
            return httpx.Response(200, json={"leases": []})
        return httpx.Response(200, json=GRANT)

    c, seen = client(handler, "http://a:1, http://b:2/")
    assert c.broker_urls == ["http://a:1", "http://b:2"]
    c.lease()
    assert [r.url.host for r in seen] == ["a", "b"]
    assert seen[0].headers["idempotency-key"] == seen[1].headers["idempotency-key"]
    assert seen[1].headers["idempotency-retry"] == "1"
    assert no_sleeping[0] < 0.1  # another broker: no back-off
    assert c.leases() == []  # later calls stay on the broker that answers
    assert seen[-1].url.host == "b" and c.broker_url == "http://b:2"


def test_retries_are_bounded_and_the_error_names_every_broker(no_sleeping: list[float]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    c, seen = client(handler, "http://a:1,http://b:2", retries=3)
    with pytest.raises(BackendUnavailable, match=r"http://a:1, http://b:2 did not answer"):
        c.lease()
    assert len(seen) == 4 and c.retried == 3


def test_one_broker_backs_off_with_jitter_and_gives_up(no_sleeping: list[float]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, json=SHED, headers={"retry-after": "0"})

    c, seen = client(handler, retries=2)
    with pytest.raises(BackendUnavailable, match="at capacity"):
        c.status()
    assert len(seen) == 3
    assert all(0 < w <= lease_module.RETRY_MAX_S for w in no_sleeping)


def test_answers_that_a_retry_cannot_change_are_not_retried() -> None:
    denied = {"error": "LeaseDenied", "message": "no node has 64 free cores", "available": {}}
    c, seen = client(lambda r: httpx.Response(409, json=denied))
    with pytest.raises(LeaseDenied):
        c.lease(cores=64)
    c2, seen2 = client(
        lambda r: httpx.Response(503, json={"error": "BackendUnavailable", "message": "agent down"})
    )
    with pytest.raises(BackendUnavailable, match="agent down"):
        c2.lease()
    assert len(seen) == 1 and len(seen2) == 1  # 503 without Retry-After: not load shedding


def test_a_bad_broker_list_is_one_clear_error() -> None:
    with pytest.raises(ConfigError, match="'ftp://x' must start with http"):
        Client("http://a:1,ftp://x")
    with pytest.raises(ConfigError, match="no broker URL"):
        Client(" , ")
