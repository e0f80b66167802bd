"""FMI's pure parts: the channel cost model, group tickets, the supervisor refusing unsigned
or out-of-group socket requests, rank-order folds and message encoding."""

from __future__ import annotations

import json
import socket
import time

import numpy as np
import pytest

from colocate.errors import Unauthorized
from colocate.executor.fmi_sockets import answer_fmi
from colocate.fmi import channels as ch
from colocate.fmi.comm import MAX, MIN, PROD, SUM, fold
from colocate.fmi_ticket import GroupTicket, check_ticket, group_key, sign_ticket
from colocate.tokens import lease_key

SECRET = b"unit-test-cluster-secret-0123456789"


def test_the_cost_model_picks_local_within_a_lease_tcp_across_redis_when_forced_or_no_direct_path() -> (
    None
):
    assert ch.route(same_lease=True, direct=True) == "local"
    assert ch.route(same_lease=False, direct=True) == "tcp"
    assert ch.route(same_lease=False, direct=False) == "redis"
    assert ch.route(same_lease=True, direct=True, forced="redis") == "redis"
    assert ch.route(same_lease=True, direct=True, forced="tcp") == "tcp"
    assert (
        ch.route(same_lease=False, direct=True, forced="local") == "tcp"
    )  # a lease's /tmp is its own
    with pytest.raises(ValueError, match="choose one of"):
        ch.route(True, True, "carrier-pigeon")


def test_a_ticket_checks_only_under_its_lease_key_and_before_expiry() -> None:
    key = lease_key(SECRET, "l-1")
    ticket = GroupTicket("g" * 32, "l-1", "127.0.0.1", time.time() + 60, (("127.0.0.1", 5000),))
    sig = sign_ticket(key, ticket)
    assert check_ticket(key, ticket.encode(), sig, time.time()) == ticket
    with pytest.raises(Unauthorized):
        check_ticket(lease_key(SECRET, "l-2"), ticket.encode(), sig, time.time())
    altered = GroupTicket("g" * 32, "l-1", "127.0.0.1", ticket.expires_at, (("10.0.0.9", 22),))
    with pytest.raises(Unauthorized):
        check_ticket(key, altered.encode(), sig, time.time())
    with pytest.raises(Unauthorized, match="expired"):
        check_ticket(key, ticket.encode(), sig, ticket.expires_at + 1)


def test_group_keys_differ_per_group_and_per_member_set() -> None:
    k1, k2 = lease_key(SECRET, "l-1"), lease_key(SECRET, "l-2")
    assert group_key([k1, k2], "g1") != group_key([k1, k2], "g2")
    assert group_key([k1, k2], "g1") != group_key([k1], "g1")
    assert len(group_key([k1], "g1")) == 32


def _request(op: str, ticket: GroupTicket, key: bytes, **extra: object) -> bytes:
    return json.dumps(
        {"op": op, "ticket": ticket.encode().decode(), "sig": sign_ticket(key, ticket), **extra}
    ).encode()


def test_the_supervisor_makes_sockets_only_for_signed_tickets_and_group_peers() -> None:
    with socket.create_server(("127.0.0.1", 0)) as peer:
        port = peer.getsockname()[1]
        ticket = GroupTicket("g" * 32, "l-1", "127.0.0.1", time.time() + 60, (("127.0.0.1", port),))
        key = lease_key(SECRET, "l-1")
        reply, sock = answer_fmi(SECRET, _request("listen", ticket, key))
        assert reply["status"] == "ok" and sock is not None
        assert sock.getsockname()[0] == "127.0.0.1"  # bound to the ticket's host
        sock.close()
        reply, sock = answer_fmi(SECRET, _request("connect", ticket, key, to=["127.0.0.1", port]))
        assert reply["status"] == "ok" and sock is not None and sock.getpeername()[1] == port
        sock.close()
        # not a peer of the group: refused, no socket
        reply, sock = answer_fmi(SECRET, _request("connect", ticket, key, to=["127.0.0.1", 22]))
        assert (reply["status"], sock) == ("unauthorized", None)
        # signed with another lease's key (a worker of l-2 presenting l-1's ticket it forged)
        reply, sock = answer_fmi(SECRET, _request("listen", ticket, lease_key(SECRET, "l-2")))
        assert (reply["status"], sock) == ("unauthorized", None)
        reply, sock = answer_fmi(SECRET, b"{not json")
        assert (reply["status"], sock) == ("unauthorized", None)


def test_folds_go_in_rank_order_and_leave_the_inputs_alone() -> None:
    arrs = [np.arange(4.0) + r for r in range(3)]
    before = [a.copy() for a in arrs]
    np.testing.assert_array_equal(fold(arrs, SUM), arrs[0] + arrs[1] + arrs[2])
    np.testing.assert_array_equal(fold(arrs, PROD), arrs[0] * arrs[1] * arrs[2])
    np.testing.assert_array_equal(fold(arrs, MIN), arrs[0])
    np.testing.assert_array_equal(fold(arrs, MAX), arrs[2])
    for a, b in zip(arrs, before, strict=True):
        np.testing.assert_array_equal(a, b)
    assert fold(["a", "b", "c"], lambda x, y: x + y) == "abc"  # not commutative: rank order
    assert fold([3, 1, 2], MIN) == 1


@pytest.mark.parametrize(
    "value",
    [
        np.arange(12, dtype=np.int16).reshape(3, 4),
        np.float64(2.5),
        b"raw",
        bytearray(b"ba"),
        {"k": [1, 2]},
    ],
)
def test_messages_decode_to_what_was_sent(value: object) -> None:
    enc, meta, payload = ch.encode(value)
    holder, view = ch.target(enc, meta, len(payload))
    view[:] = payload
    got = ch.finish(enc, holder)
    if isinstance(value, np.ndarray):
        assert enc == ch.ENC_ARRAY and got.dtype == value.dtype  # raw bytes, not a pickle
        np.testing.assert_array_equal(got, value)
    elif isinstance(value, bytes | bytearray):
        assert enc == ch.ENC_BYTES and got == bytes(value)
    else:
        assert got == value
