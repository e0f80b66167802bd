"""What crosses HTTP between broker, agent and client: errors come back as the same colocate
exception (fields included), listen addresses parse, the cluster secret is created once."""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

import httpx
import pytest

from colocate import errors
from colocate.broker.replies import checked_body
from colocate.broker.secret import control_token, control_token_ok, load_or_create_secret
from colocate.broker.service import error_reply, parse_listen, raise_for_reply
from colocate.errors import ColocateError, ConfigError

CASES: list[tuple[ColocateError, int]] = [
    (
        errors.LeaseDenied(
            "no node has 4 free cores", available={"cores": 2, "memory_bytes": 10, "nodes": 1}
        ),
        409,
    ),
    (errors.LeaseEvicted("was evicted by its node", lease_id="l-1"), 410),
    (errors.LeaseExpired("has expired", lease_id="l-2"), 410),
    (errors.ExecutorLost("executor vanished", lease_id="l-3"), 502),
    (errors.LeaseError("is not known", lease_id="l-4"), 404),
    (errors.Unauthorized("wrong control token"), 401),
    (errors.BadRequest("cores must be positive"), 400),
    (errors.BackendUnavailable("agent at http://x did not answer"), 503),
]


@pytest.mark.parametrize(
    ("exc", "status"), CASES, ids=lambda c: type(c).__name__ if isinstance(c, Exception) else str(c)
)
def test_errors_round_trip_as_the_same_exception(exc: ColocateError, status: int) -> None:
    reply = error_reply(exc)
    assert reply.status_code == status
    body = json.loads(bytes(reply.body))
    with pytest.raises(type(exc)) as raised:
        raise_for_reply(reply.status_code, body, "broker http://b")
    assert type(raised.value) is type(exc)
    assert str(raised.value) == str(exc)
    if isinstance(exc, errors.LeaseError):
        assert isinstance(raised.value, errors.LeaseError) and raised.value.lease_id == exc.lease_id
    if isinstance(exc, errors.LeaseDenied):
        assert (
            isinstance(raised.value, errors.LeaseDenied) and raised.value.available == exc.available
        )


def test_replies_that_are_not_error_bodies_name_the_service() -> None:
    with pytest.raises(
        errors.BackendUnavailable, match="broker http://b: broker http://b answered HTTP 502"
    ):
        raise_for_reply(502, None, "broker http://b")
    with pytest.raises(errors.BadRequest, match="HTTP 418"):
        raise_for_reply(418, ["not", "a", "dict"], "broker http://b")
    with pytest.raises(errors.BadRequest):  # a name that is not a colocate error is not trusted
        raise_for_reply(400, {"error": "SystemExit", "message": "x"}, "broker http://b")
    raise_for_reply(200, {"anything": 1}, "broker http://b")


def test_checked_body_gives_a_json_body_or_none_and_raises_what_an_error_reply_names() -> None:
    assert checked_body(httpx.Response(200, json={"leases": []}), "agent") == {"leases": []}
    assert checked_body(httpx.Response(204), "agent") is None  # no body
    reply = error_reply(errors.LeaseEvicted("was evicted by its node", lease_id="l-9"))
    evicted = httpx.Response(reply.status_code, content=bytes(reply.body))
    with pytest.raises(errors.LeaseEvicted, match="evicted by its node"):
        checked_body(evicted, "agent at http://n1")
    with pytest.raises(errors.BackendUnavailable, match="agent at http://n1 answered HTTP 502"):
        checked_body(httpx.Response(502, text="<html>bad gateway</html>"), "agent at http://n1")


def test_payload_and_config_errors_arrive_as_bad_requests() -> None:
    for exc, status in (
        (errors.PayloadTooLarge(10, 5), 413),
        (ConfigError("cannot read size 'lots'"), 400),
    ):
        reply = error_reply(exc)
        assert reply.status_code == status
        with pytest.raises(errors.BadRequest, match=str(exc)[:20]):
            raise_for_reply(reply.status_code, json.loads(bytes(reply.body)), "agent")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:8642", ("127.0.0.1", 8642)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        (":9000", ("0.0.0.0", 9000)),  # as in Prometheus and Go: every IPv4 address
        ("node1", ("node1", 8642)),
        ("[::1]:8000", ("::1", 8000)),
    ],
)
def test_listen_addresses(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text, 8642) == expected


@pytest.mark.parametrize("text", ["127.0.0.1:http", "127.0.0.1:70000", "host:-1"])
def test_bad_listen_addresses_say_how_to_write_them(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_listen(text, 8642)


def test_secret_is_created_private_once_even_by_racing_processes(tmp_path: Path) -> None:
    path = tmp_path / "state" / "cluster.secret"
    found: list[bytes] = []
    threads = [
        threading.Thread(target=lambda: found.append(load_or_create_secret(path))) for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(found)) == 1 and len(found[0]) == 64
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["cluster.secret"]  # no temp files left
    assert control_token_ok(found[0], control_token(found[0]))
    assert not control_token_ok(found[0], control_token(b"other secret bytes!!"))
    assert not control_token_ok(found[0], None)


def test_secret_readable_by_others_or_too_short_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared.secret"
    shared.write_text("a" * 64)
    os.chmod(shared, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_or_create_secret(shared)
    short = tmp_path / "short.secret"
    short.write_text("abc")
    os.chmod(short, 0o600)
    with pytest.raises(ConfigError, match="shorter"):
        load_or_create_secret(short)
