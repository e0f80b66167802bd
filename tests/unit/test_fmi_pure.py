"""FMI's pure parts: the channel cost model, group tickets, the supervisor refusing unsigned
or out-of-group socket requests, rank-order folds and message encoding."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator

import numpy as np
import pytest

from colocate.errors import Unauthorized
from colocate.executor.fmi_sockets import Segments, answer_fmi, outside_lease
from colocate.fmi import channels as ch
from colocate.fmi.comm import MAX, MIN, PROD, SUM, fold
from colocate.fmi_ticket import GroupTicket, check_ticket, group_key, sign_ticket
from colocate.tokens import lease_key

SECRET = b"unit-test-cluster-secret-0123456789"


def test_the_cost_model_picks_shm_within_a_lease_tcp_across_redis_when_forced_or_no_direct_path() -> (
    None
):
    assert ch.route(same_lease=True, direct=True) == "shm"
    assert ch.route(same_lease=False, direct=True) == "tcp"
    assert ch.route(same_lease=False, direct=False) == "redis"
    assert ch.route(same_lease=True, direct=False) == "redis"  # the whole group falls back
    assert ch.route(same_lease=True, direct=True, forced="redis") == "redis"
    assert ch.route(same_lease=True, direct=True, forced="tcp") == "tcp"
    assert ch.route(same_lease=True, direct=True, forced="local") == "local"
    # a lease's /tmp and memory are its own
    assert ch.route(same_lease=False, direct=True, forced="local") == "tcp"
    assert ch.route(same_lease=False, direct=True, forced="shm") == "tcp"
    # another lease on the same node: a segment from the node's supervisor
    assert ch.route(same_lease=False, direct=True, same_node=True) == "shm"
    assert ch.route(same_lease=False, direct=True, forced="shm", same_node=True) == "shm"
    assert ch.route(same_lease=False, direct=True, forced="tcp", same_node=True) == "tcp"
    assert ch.route(same_lease=False, direct=True, forced="local", same_node=True) == "tcp"
    assert ch.route(same_lease=False, direct=False, forced="shm", same_node=True) == "redis"
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


def test_a_ticket_is_refused_to_a_worker_in_another_leases_cgroup() -> None:
    v1 = "12:pids:/colocate/n1/{0}\n7:memory:/colocate/n1/{0}\n1:name=systemd:/\n"
    assert outside_lease(v1.format("l-1"), "l-1") is None
    why = outside_lease(v1.format("l-2"), "l-1")
    assert why is not None and "l-2" in why and "l-1" in why
    assert outside_lease("0::/colocate/n1/l-1\n", "l-1") is None  # cgroup v2
    assert outside_lease("0::/colocate/n1/l-2\n", "l-1") is not None
    # in no lease cgroup at all (a node without cgroups: rlimits only): nothing to check
    assert outside_lease("0::/user.slice\n", "l-1") is None
    ticket = GroupTicket("g" * 32, "l-1", "127.0.0.1", time.time() + 60)
    key = lease_key(SECRET, "l-1")
    reply, sock = answer_fmi(SECRET, _request("listen", ticket, key), pid=2**22 + 12345)
    assert (reply["status"], sock) == ("unauthorized", None)  # no such worker
    reply, sock = answer_fmi(SECRET, _request("listen", ticket, key), pid=os.getpid())
    assert reply["status"] == "ok" and sock is not None  # this test is in no lease cgroup
    sock.close()


def _segment(
    segments: Segments, lease: str, pair: list[object], group: str = "g" * 32, nbytes: int = 4096
) -> tuple[dict[str, object], int | None]:
    ticket = GroupTicket(group, lease, "127.0.0.1", time.time() + 60)
    request = _request("shm", ticket, lease_key(SECRET, lease), pair=pair, bytes=nbytes)
    reply, fd = answer_fmi(SECRET, request, segments=segments)
    if fd is None:
        return reply, None
    try:
        return reply, os.dup(fd.fileno())
    finally:
        fd.close()


def test_a_pairs_segment_goes_to_its_two_leases_once_each_and_to_nobody_else() -> None:
    segments = Segments()
    pair: list[object] = [0, "l-a", 1, "l-b"]
    # an outsider cannot plant a segment for the pair (nor take one), even with a valid ticket
    # of the same group id
    reply, fd = _segment(segments, "l-c", pair)
    assert (reply["status"], fd) == ("unauthorized", None) and "l-c" in str(reply["message"])
    reply, fa = _segment(segments, "l-a", pair)
    assert reply["status"] == "ok" and fa is not None
    # the same side again (a replayed request): refused
    reply, fd = _segment(segments, "l-a", pair)
    assert (reply["status"], fd) == ("refused", None)
    # another group naming the same pair gets a segment of its own
    reply, other = _segment(segments, "l-b", pair, group="h" * 32)
    assert reply["status"] == "ok" and other is not None
    reply, fb = _segment(segments, "l-b", pair, nbytes=8192)  # not the pair's size
    assert (reply["status"], fb) == ("refused", None)
    reply, fb = _segment(segments, "l-b", pair)
    assert reply["status"] == "ok" and fb is not None
    # one memory: what a writes, b reads; the other group's segment is another memory
    os.pwrite(fa, b"from a", 100)
    assert os.pread(fb, 6, 100) == b"from a"
    assert os.pread(other, 6, 100) == b"\0" * 6
    assert len(segments) == 1  # the pair's is let go once both took it; h's waits for l-a
    for fd in (fa, fb, other):
        os.close(fd)
    # after the pair took it, the outsider still cannot ask for it
    reply, late = _segment(segments, "l-c", pair)
    assert reply["status"] == "unauthorized" and late is None


@pytest.fixture
def shm_pair() -> Iterator[tuple[ch.ShmPeer, ch.ShmPeer]]:
    """Both ends of one pair's shared-memory channel, in this process (a socketpair for the
    doorbell, one memfd mapped twice as the dialer and the acceptor do)."""
    a, b = socket.socketpair()
    fd, mm = ch.new_segment()
    low, high = ch.ShmPeer(1, a, mm, low=True), ch.ShmPeer(0, b, ch.map_segment(fd), low=False)
    yield low, high
    low.close()
    high.close()


@pytest.mark.parametrize(
    "value",
    [
        None,
        2.5,
        -(2**62),
        2**70,  # too big for the int slot: pickled
        np.float32(1.5),
        np.arange(6, dtype=np.int16).reshape(2, 3),
        np.ones(1),
        np.arange(100.0),  # 800 bytes: still a slot
        np.arange(4.0)[::2],  # not contiguous
        {"k": [1, 2]},
    ],
)
def test_slot_exchanges_give_back_what_was_put(
    shm_pair: tuple[ch.ShmPeer, ch.ShmPeer], value: object
) -> None:
    low, high = shm_pair
    for _ in range(3):  # both slots and a reused one
        assert not high.slot_ready()
        assert low.put_slot(value)
        assert high.slot_ready() and high.pending()
        inline, got = high.take_slot()
        assert inline
        if isinstance(value, np.ndarray):
            assert got.dtype == value.dtype and got.shape == value.shape
            np.testing.assert_array_equal(got, value)
        else:
            assert got == value and type(got) is type(value)


def test_arrays_after_other_values_in_the_same_slot_keep_their_meta(
    shm_pair: tuple[ch.ShmPeer, ch.ShmPeer],
) -> None:
    low, high = shm_pair
    arr = np.arange(3, dtype=np.int32)
    for value in (arr, arr, "a string over the meta" * 3, 1.5, arr, arr + 1, arr, None, arr):
        low.put_slot(value)
        high.in_views.clear()  # as if the receiver's cache were full: it reads the meta
        inline, got = high.take_slot()
        assert inline
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(got, value)
        else:
            assert got == value


def test_a_large_message_goes_from_the_ring_into_its_array_not_through_staging(
    shm_pair: tuple[ch.ShmPeer, ch.ShmPeer],
) -> None:
    low, high = shm_pair
    got: list[object] = []
    high.inbox = lambda src, kind, enc, tag, value: got.append(value)
    for n in (ch.DIRECT_MIN_BYTES // 8, 3):  # large, then small: staged
        big = np.arange(float(n))
        enc, meta, payload = ch.encode(big)
        low.queue(ch.DATA, enc, 0, 0, meta, payload)
        assert low.flush()
        high.read()
        np.testing.assert_array_equal(got[-1], big)  # type: ignore[arg-type]
        # only the small one went through the staging buffer (a header is never all zero)
        assert any(high.stage[: ch.HEADER_SIZE]) == (n == 3)


def test_what_waits_for_ring_space_is_dropped_when_the_peer_ends(
    shm_pair: tuple[ch.ShmPeer, ch.ShmPeer],
) -> None:
    """A sender blocked on a full ring to a peer that died would wait forever: the end of
    the peer's doorbell socket drops the queue (the socket channels drop it on EPIPE)."""
    low, high = shm_pair
    enc, meta, payload = ch.encode(np.ones(low.ring // 4))  # twice the ring
    low.queue(ch.DATA, enc, 0, 0, meta, payload)
    assert not low.flush() and low.outq
    high.sock.close()  # the peer's process is gone
    low.wake()
    assert low.eof and not low.outq and low.flush()


def test_a_value_too_big_for_a_slot_is_marked_for_the_ring(
    shm_pair: tuple[ch.ShmPeer, ch.ShmPeer],
) -> None:
    low, high = shm_pair
    assert not low.put_slot(np.zeros(200))  # 1600 bytes
    assert high.take_slot() == (False, None)
    assert not low.put_slot(b"raw bytes travel by the ring")


def test_rings_shrink_with_the_number_of_same_lease_peers() -> None:
    assert ch.ring_bytes(1) == ch.RING_BYTES == 4 << 20
    assert ch.ring_bytes(7) == 2 << 20  # 7 pairs x 2 directions x 2 MiB = 28 MiB
    assert ch.ring_bytes(15) == 1 << 20
    assert ch.ring_bytes(1000) == ch.MIN_RING_BYTES
    for peers in range(1, 200):
        ring = ch.ring_bytes(peers)
        assert ring & (ring - 1) == 0
        assert 2 * ring * peers <= ch.RING_BUDGET or ring == ch.MIN_RING_BYTES


def test_a_segment_of_another_size_is_refused() -> None:
    fd, mm = ch.new_segment(ch.MIN_RING_BYTES)
    mm.close()
    with pytest.raises(ConnectionError, match="wrong size"):
        ch.map_segment(fd, ch.RING_BYTES)


@pytest.mark.parametrize("ring", [ch.MIN_RING_BYTES, ch.RING_BYTES])
def test_the_ring_carries_messages_across_its_end_in_order(ring: int) -> None:
    a, b = socket.socketpair()
    fd, mm = ch.new_segment(ring)
    low, high = ch.ShmPeer(1, a, mm, low=True), ch.ShmPeer(0, b, ch.map_segment(fd, ring), False)
    assert low.ring == high.ring == ring
    got: list[object] = []
    high.inbox = lambda src, kind, enc, tag, value: got.append((src, tag, value))
    big = np.random.default_rng(1).standard_normal(ring // 8 + 1000)  # > the ring
    sent = [np.arange(10.0), big, {"x": 1}, big[::-1].copy()]
    for tag, value in enumerate(sent):
        enc, meta, payload = ch.encode(value)
        low.queue(ch.DATA, enc, tag, 0, meta, payload)
    rounds = 0
    while not low.flush() or high.pending():
        high.read()
        rounds += 1
        assert rounds < 1000
    high.read()
    assert [(src, tag) for src, tag, _v in got] == [(0, t) for t in range(len(sent))]  # from rank 0
    for (_s, _t, value), want in zip(got, sent, strict=True):
        if isinstance(want, np.ndarray):
            np.testing.assert_array_equal(value, want)
        else:
            assert value == want
    # the end of the stream: the socket closes, what was in the ring is still read
    enc, meta, payload = ch.encode("last")
    low.queue(ch.DATA, enc, 9, 0, meta, payload)
    assert low.flush()
    low.sock.shutdown(socket.SHUT_WR)
    high.wake()
    assert high.eof and got[-1] == (0, 9, "last")
    low.close()
    high.close()


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
