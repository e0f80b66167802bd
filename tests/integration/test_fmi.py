"""FMI on real processes: a broker, two standalone agents (nodes fmi-n1, fmi-n2) whose sandboxed workers run
as the lease owner, leases on both nodes gathered into groups of 1 to 4 ranks; every operation
checked against numpy on the client; a raising rank, an evicted member mid-collective, an
outsider at a rank's listener, and the Redis channel through a private redis-server."""

from __future__ import annotations

import os
import re
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import httpx
import numpy as np
import pytest

from colocate import Client, LeaseEvicted
from colocate.client.executor import LeaseExecutor
from colocate.client.lease import Lease
from colocate.client.spmd import Group
from colocate.errors import ColocateError, Unauthorized
from colocate.fmi_ticket import GroupTicket, sign_ticket
from tests.integration.leasing import (
    Service,
    control_auth,
    services,
    start_cluster,
    wait_until,
)

pytestmark = pytest.mark.slow
NODES = ("fmi-n1", "fmi-n2")

# the functions below travel by value (workers run as the lease owner, not from this tree)
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def every_operation(comm: Any, seed: int) -> dict[str, Any]:
    import numpy as np

    from colocate.fmi import MAX, MIN, PROD, SUM

    rng = np.random.default_rng(seed + comm.rank)
    arr = rng.standard_normal(1000)
    big = rng.standard_normal(300_000)  # 2.4 MB: the shared-memory path within a lease
    out: dict[str, Any] = {"rank": comm.rank, "size": comm.size, "arr": arr, "big": big}
    out["allreduce"] = {op.name: comm.allreduce(arr, op) for op in (SUM, PROD, MIN, MAX)}
    out["allreduce_big"] = comm.allreduce(big)
    out["allreduce_obj"] = comm.allreduce(
        [comm.rank], lambda a, b: a + b
    )  # list concat, rank order
    out["reduce"] = comm.reduce(arr, MAX, root=comm.size - 1)
    out["bcast"] = comm.bcast(arr if comm.rank == 0 else None, root=0)
    out["bcast_obj"] = comm.bcast(
        {"from": comm.rank} if comm.rank == comm.size - 1 else None, root=comm.size - 1
    )
    out["gather"] = comm.gather(arr, root=0)
    out["allgather"] = comm.allgather(("r", comm.rank))
    out["scatter"] = comm.scatter(
        [np.full(3, r, dtype=np.int32) for r in range(comm.size)] if comm.rank == 0 else None
    )
    out["scan"] = comm.scan(arr)
    out["scan_obj"] = comm.scan(comm.rank + 1, PROD)
    # ring of point-to-point messages, non-blocking, two tags, bytes and objects
    right, left = (comm.rank + 1) % comm.size, (comm.rank - 1) % comm.size
    reqs = [
        comm.isend(b"x" * (comm.rank + 1), right, tag=7),
        comm.isend({"to": right}, right, tag=3),
    ]
    got_obj = comm.irecv(left, tag=3).wait()
    got_bytes = comm.recv(left, tag=7)
    for req in reqs:
        req.wait()
    out["p2p"] = (got_obj, got_bytes)
    comm.barrier()
    out["channels"] = comm.channels
    out.pop("arr")
    out.pop("big")
    return out


def check_against_numpy(results: list[dict[str, Any]], seed: int) -> None:
    size = len(results)
    rngs = [np.random.default_rng(seed + r) for r in range(size)]
    arrs = [g.standard_normal(1000) for g in rngs]  # what each rank drew, in the same order
    bigs = [g.standard_normal(300_000) for g in rngs]
    assert [res["rank"] for res in results] == list(range(size))
    for r, res in enumerate(results):
        assert res["size"] == size
        np.testing.assert_allclose(res["allreduce"]["SUM"], np.sum(arrs, axis=0))
        np.testing.assert_allclose(res["allreduce"]["PROD"], np.prod(arrs, axis=0))
        np.testing.assert_array_equal(res["allreduce"]["MIN"], np.min(arrs, axis=0))
        np.testing.assert_array_equal(res["allreduce"]["MAX"], np.max(arrs, axis=0))
        np.testing.assert_allclose(res["allreduce_big"], np.sum(bigs, axis=0))
        for name in ("SUM", "PROD"):  # every rank the same bits, whatever its channels
            assert res["allreduce"][name].tobytes() == results[0]["allreduce"][name].tobytes()
        assert res["allreduce_big"].tobytes() == results[0]["allreduce_big"].tobytes()
        assert res["allreduce_obj"] == list(range(size))
        if r == size - 1:
            np.testing.assert_array_equal(res["reduce"], np.max(arrs, axis=0))
        else:
            assert res["reduce"] is None
        np.testing.assert_array_equal(res["bcast"], arrs[0])
        assert res["bcast_obj"] == {"from": size - 1}
        if r == 0:
            assert len(res["gather"]) == size
            for got, want in zip(res["gather"], arrs, strict=True):
                np.testing.assert_array_equal(got, want)
        else:
            assert res["gather"] is None
        assert res["allgather"] == [("r", k) for k in range(size)]
        np.testing.assert_array_equal(res["scatter"], np.full(3, r, dtype=np.int32))
        assert res["scatter"].dtype == np.int32
        np.testing.assert_allclose(res["scan"], np.sum(arrs[: r + 1], axis=0))
        assert res["scan_obj"] == int(np.prod(np.arange(1, r + 2)))
        left = (r - 1) % size
        assert res["p2p"] == ({"to": r}, b"x" * (left + 1))


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Service, list[Service], Path]]:
    tmp = tmp_path_factory.mktemp("fmi")
    # Not n1/n2: lease cgroups live under colocate/<node>/, and a prolog of the shared dev
    # cluster's n1 that cannot reach its agent kills the lease cgroups of "n1" on its cores
    broker, agents = start_cluster(tmp, {NODES[0]: (2, "2GiB"), NODES[1]: (2, "2GiB")})
    with services(broker, *agents):
        yield broker, agents, tmp
    for service in (broker, *agents):
        assert "Traceback" not in service.logs(), service.logs()


def two_leases(client: Client, cores: int = 2) -> tuple[Any, Any]:
    a = client.lease(cores=cores, memory="512MiB", duration="5m")
    b = client.lease(cores=cores, memory="512MiB", duration="5m")
    assert {a.node, b.node} == set(NODES), (a.node, b.node)  # one lease per node
    return a, b


@pytest.fixture
def leases(cluster: tuple[Service, list[Service], Path]) -> Iterator[tuple[Lease, Lease]]:
    """Two leases of two cores, one per node, released after the test."""
    a, b = two_leases(Client(cluster[0].url))
    with a, b:
        yield a, b


@pytest.fixture
def same_node_leases(
    cluster: tuple[Service, list[Service], Path],
) -> Iterator[tuple[Lease, Lease]]:
    """Two one-core leases on one node (a two-core lease fills the other node meanwhile)."""
    client = Client(cluster[0].url)
    with client.lease(cores=2, memory="512MiB", duration="5m") as full:
        a = client.lease(cores=1, memory="256MiB", duration="5m")
        c = client.lease(cores=1, memory="256MiB", duration="5m")
        with a, c:
            assert a.node == c.node != full.node
            yield a, c


def test_every_operation_matches_numpy_for_1_to_4_ranks_over_two_nodes(
    leases: tuple[Lease, Lease],
) -> None:
    a, b = leases
    a1, a2, b1, b2 = a.executor(workers=1), a.executor(), b.executor(workers=1), b.executor()
    groups: list[tuple[list[LeaseExecutor], dict[int, set[str]]]] = [
        ([a1], {}),
        ([a2], {0: {"shm"}}),  # two workers of one lease
        ([a1, b1], {0: {"tcp"}}),  # two nodes
        ([a2, b1], {0: {"shm", "tcp"}}),
        ([a2, b2], {0: {"shm", "tcp"}, 3: {"shm", "tcp"}}),
    ]
    for executors, channels in groups:
        group = Group(executors)
        results = group.spmd(every_operation, 40)
        check_against_numpy(results, 40)
        for rank, kinds in channels.items():
            assert set(results[rank]["channels"].values()) == kinds, results[rank]["channels"]
    # the one-lease form, on the executor itself
    assert a2.spmd(lambda comm, k: (comm.rank, comm.allreduce(k)), 5) == [(0, 10), (1, 10)]


def test_a_forced_channel_is_used_and_gives_the_same_results(
    cluster: tuple[Service, list[Service], Path],
) -> None:
    """Two ranks of one lease: the cost model picks shared memory; forced, the Unix socket
    or TCP (made by the supervisor) carry the same operations, checked against numpy."""
    broker, _agents, _tmp = cluster
    a, b = two_leases(Client(broker.url))
    with a, b:
        ex = a.executor()
        for forced, want in (("local", "local"), ("tcp", "tcp"), ("shm", "shm")):
            results = ex.spmd(every_operation, 11, channel=forced)
            check_against_numpy(results, 11)
            assert results[0]["channels"] == {1: want}, (forced, results[0]["channels"])
        # forcing shm across leases cannot share memory: the pair between them takes TCP
        across = Group([a.executor(workers=1), b.executor(workers=1)])
        assert across.spmd(lambda comm: comm.channels, channel="shm") == [{1: "tcp"}, {0: "tcp"}]


def _die_on(node: str) -> str:
    """Unpickled on every rank with its call's arguments, before the rank joins its group:
    the worker on ``node`` exits there (a rank whose worker dies at startup)."""
    from colocate.executor import worker

    current = worker.current()
    if current is not None and current.spec.node == node:
        os._exit(3)
    return node


class DieOn:
    def __init__(self, node: str) -> None:
        self.node = node

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (_die_on, (self.node,))


def test_a_rank_whose_worker_dies_at_startup_is_reported_within_2_s(
    leases: tuple[Lease, Lease],
) -> None:
    a, b = leases
    group = Group([a.executor(), b.executor()])  # ranks 2 and 3 on lease b
    assert group.spmd(lambda comm, _x: comm.rank, "warm") == [0, 1, 2, 3]
    started = time.monotonic()
    with pytest.raises(LeaseEvicted) as info:
        group.spmd(lambda comm, _x: comm.allreduce(1), DieOn(b.node), setup_timeout_s=30)
    took = time.monotonic() - started
    assert took < 2.0, f"took {took:.1f} s (the setup timeout was 30 s)"
    # the lease a ranks name the member that never joined
    assert re.search(rf"rank [23] \(lease {b.lease_id} on {b.node}\) left", str(info.value))


def raise_on(comm: Any, bad: int) -> int:
    comm.allreduce(comm.rank)
    if comm.rank == bad:
        raise ValueError(f"bad input on rank {comm.rank}")
    comm.allreduce(comm.rank)  # the others wait here for the one that raised
    return comm.rank


def test_a_rank_that_raises_ends_every_rank_and_names_its_rank(
    leases: tuple[Lease, Lease],
) -> None:
    a, b = leases
    group = Group([a.executor(), b.executor()])
    started = time.monotonic()
    with pytest.raises(ValueError, match="bad input on rank 2") as info:
        group.spmd(raise_on, 2)
    assert info.value.rank == 2  # type: ignore[attr-defined]
    assert time.monotonic() - started < 20
    # every rank ended: the same workers serve the next call at once
    assert group.spmd(raise_on, -1) == [0, 1, 2, 3]


def allreduce_forever(comm: Any) -> None:
    import numpy as np

    arr = np.ones(200_000)
    while True:
        comm.allreduce(arr)


def test_an_evicted_member_ends_every_rank_with_lease_evicted(
    cluster: tuple[Service, list[Service], Path],
) -> None:
    broker, agents, tmp = cluster
    client = Client(broker.url)
    a, b = two_leases(client)
    with a:
        group = Group([a.executor(), b.executor()])
        outcome: list[BaseException | list[Any]] = []
        caller = threading.Thread(target=lambda: outcome.append(_call(group, allreduce_forever)))
        caller.start()
        time.sleep(1.5)  # mid-collective: the ranks are exchanging arrays
        assert len(processes_in_lease(b.lease_id)) >= 2  # its two ranks, seen by their cgroup
        agent_b = next(ag for ag in agents if ag.name == f"agent {b.node}")
        reply = httpx.post(
            f"{agent_b.url}/v1/leases/{b.lease_id}/revoke",
            json={"grace_s": 0.5, "reason": "job_start"},
            auth=control_auth(tmp, b.node),
            timeout=10,
        )
        assert reply.status_code == 200, reply.text
        caller.join(timeout=20)
        assert not caller.is_alive(), "the group's call hung after an eviction"
        assert isinstance(outcome[0], LeaseEvicted), outcome
        # no rank of lease a is left running the function: both serve a new group call now
        survivors = Group([a.executor()])
        assert survivors.spmd(lambda comm: comm.allreduce(1)) == [2, 2]
        wait_until(
            lambda: b.lease_id not in [x.lease_id for x in client.status().leases],
            what="lease b gone",
        )
        # no orphan: no process is left in lease b's cgroups (its ranks and anything they forked)
        wait_until(
            lambda: not processes_in_lease(b.lease_id), timeout_s=5, what="lease b's processes gone"
        )


def processes_in_lease(lease_id: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cgroup") as f:
                if f"/{lease_id}" in f.read():
                    found.append(int(pid))
        except OSError:
            continue
    return found


def _call(group: Group, fn: Any) -> BaseException | list[Any]:
    try:
        return group.spmd(fn)
    except BaseException as exc:
        return exc


def test_an_outsider_cannot_join_or_inject(leases: tuple[Lease, Lease]) -> None:
    """A process without the group key connects to a rank's TCP listener (made outside the
    sandbox, so it is reachable) and sends a forged hello and a message: it is dropped and
    the group's result is unchanged."""
    a, b = leases
    group = Group([a.executor(workers=1), b.executor(workers=1)])
    real_frame = LeaseExecutor._frame
    intruders: list[socket.socket] = []

    def spy(self: LeaseExecutor, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if fn == "colocate.fmi.rank:run" and not intruders:
            for member in args[3]:  # the members: where their listeners are
                intruder = socket.create_connection(tuple(member["tcp"]), timeout=5)
                forged_hello = b"FMI1" + args[1].encode() + (1).to_bytes(4, "little") + b"n" * 16
                intruder.sendall(forged_hello + b"injected message" * 16)
                intruders.append(intruder)
        return real_frame(self, fn, args, kwargs)

    LeaseExecutor._frame = spy  # type: ignore[method-assign]
    try:
        results = group.spmd(lambda comm: comm.allreduce(comm.rank + 1))
    finally:
        LeaseExecutor._frame = real_frame  # type: ignore[method-assign]
    assert len(intruders) == 2
    for intruder in intruders:  # a random challenge at most, then dropped: no proof, no reply
        answer = b""
        try:
            while chunk := intruder.recv(64):
                answer += chunk
        except ConnectionResetError:
            pass
        assert len(answer) in (0, 16), answer
        intruder.close()
    assert results == [3, 3]


def test_a_ticket_that_leaked_to_another_leases_worker_opens_nothing(
    same_node_leases: tuple[Lease, Lease], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Leases a and c on the same node (one supervisor, so a's ticket checks there): c's
    rank presents a's validly signed ticket; the supervisor sees that the asking worker sits
    in lease c's cgroup and passes no socket."""
    a, c = same_node_leases
    group = Group([a.executor(), c.executor()])
    real_frame = LeaseExecutor._frame
    tickets: dict[str, tuple[str, str]] = {}

    def swap(self: LeaseExecutor, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if fn == "colocate.fmi.rank:run":
            tickets.setdefault(self.lease_id, (args[7], args[8]))
            if self.lease_id == c.lease_id:  # rank 1 gets rank 0's ticket
                args = (*args[:7], *tickets[a.lease_id], *args[9:])
        return real_frame(self, fn, args, kwargs)

    monkeypatch.setattr(LeaseExecutor, "_frame", swap)
    started = time.monotonic()
    with pytest.raises(Unauthorized, match=f"is in lease {c.lease_id}, not {a.lease_id}"):
        group.spmd(lambda comm: comm.allreduce(1))
    assert time.monotonic() - started < 5  # rank 0 saw rank 1 leave, no timeout
    monkeypatch.undo()
    assert group.spmd(lambda comm: comm.allreduce(1)) == [2, 2]


def ask_segment(ticket: str, sig: str, pair: list[Any], mark: bytes) -> tuple[str, bytes]:
    """In a worker: ask the node's supervisor for a pair's segment as an FMI rank does; what
    the segment held at its start (then ``mark`` is written there)."""
    import os

    from colocate.fmi import rank

    request = {"op": "shm", "ticket": ticket, "sig": sig, "pair": pair, "bytes": 4096}
    try:
        fd = rank._ask_fd(rank._worker(), request)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}", b""
    try:
        seen = os.pread(fd, len(mark), 0)
        os.pwrite(fd, mark, 0)
        return "ok", seen
    finally:
        os.close(fd)


def _ticket(ex: LeaseExecutor, group: str) -> tuple[str, str]:
    ticket = GroupTicket(group, ex.lease_id, "127.0.0.1", time.time() + 60)
    return ticket.encode().decode(), sign_ticket(bytes.fromhex(ex.lease_key), ticket)


def test_two_leases_on_one_node_talk_through_shared_memory_no_outsider_gets_it(
    same_node_leases: tuple[Lease, Lease],
) -> None:
    """Leases a and c on the same node: the pair between them is shared memory (a segment
    from the node's supervisor), every operation checked against numpy; tcp stays
    forceable. Then the outsider's moves on that node's supervisor, against a pair (a, "b")
    whose segment a took and the other side has not yet: c with its own valid ticket of
    the same group, and c replaying a's ticket, get nothing; c naming itself in the pair
    gets a memory of its own, not a's."""
    a, c = same_node_leases
    ea, ec = a.executor(), c.executor()
    group = Group([ea, ec])
    results = group.spmd(every_operation, 23)
    check_against_numpy(results, 23)
    assert [r["channels"] for r in results] == [{1: "shm"}, {0: "shm"}]
    assert group.spmd(lambda comm: comm.channels, channel="tcp") == [
        {1: "tcp"},
        {0: "tcp"},
    ]

    gid = "f" * 32
    pair = [0, a.lease_id, 1, "lease-b-not-yet-asked"]
    ta, tc = _ticket(ea, gid), _ticket(ec, gid)
    assert ea.invoke(ask_segment, *ta, pair, b"secret-a") == ("ok", b"\0" * 8)
    status, seen = ec.invoke(ask_segment, *tc, pair, b"c-plants")
    assert (status.split(":")[0], seen) == ("Unauthorized", b""), status
    assert f"lease {c.lease_id} is not a side of the pair" in status
    status, seen = ec.invoke(ask_segment, *ta, pair, b"c-replay")
    assert f"is in lease {c.lease_id}, not {a.lease_id}" in status and seen == b""
    own = [0, a.lease_id, 1, c.lease_id]
    assert ec.invoke(ask_segment, *tc, own, b"c-own..") == ("ok", b"\0" * 7)
    # a asks again for its pair: once per side, even for its own lease
    status, _seen = ea.invoke(ask_segment, *ta, pair, b"again")
    assert "already took this pair's segment" in status, status


def test_the_redis_channel_gives_the_same_results(
    leases: tuple[Lease, Lease], redis_server: str
) -> None:
    a, b = leases
    group = Group([a.executor(), b.executor(workers=1)])
    results = group.spmd(every_operation, 7, channel="redis", redis=redis_server)
    check_against_numpy(results, 7)
    assert set(results[0]["channels"].values()) == {"redis"}


def test_the_kmeans_example_matches_numpy_on_one_machine(
    cluster: tuple[Service, list[Service], Path],
) -> None:
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "examples" / "kmeans_fmi.py"
    spec = importlib.util.spec_from_file_location("kmeans_fmi", path)
    assert spec is not None and spec.loader is not None
    kmeans = importlib.util.module_from_spec(spec)
    sys.modules["kmeans_fmi"] = kmeans
    spec.loader.exec_module(kmeans)
    broker, _agents, _tmp = cluster
    a, b = two_leases(Client(broker.url))
    with a, b:
        group = Group([a.executor(), b.executor()])
        results = group.spmd(kmeans.kmeans_rank, 20_000, 4, 5, 8, 3)
    want = kmeans.kmeans_local(4, 20_000, 4, 5, 8, 3)
    assert sum(r["points"] for r in results) == 20_000
    for r in results:
        np.testing.assert_allclose(r["centroids"], want, rtol=1e-9)


def sum_and_channels(comm: Any) -> tuple[Any, dict[int, str]]:
    import numpy as np

    return comm.allreduce(np.arange(3.0) * (comm.rank + 1)), comm.channels


_real_gather = Group._gather


def _members_changed(change: Any) -> Any:
    """Group._gather, with ``change`` applied to the members the ranks' prepare returned
    (a rank without a listener, or one at an address nothing can reach)."""
    real = _real_gather

    def gather(futures: list[Any]) -> list[Any]:
        results = real(futures)
        if results and isinstance(results[0], dict) and "direct" in results[0]:
            change(results)
        return results

    return staticmethod(gather)


def test_a_group_that_cannot_connect_directly_goes_through_redis_as_a_whole(
    cluster: tuple[Service, list[Service], Path],
    redis_server: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broker, _agents, _tmp = cluster
    a, b = two_leases(Client(broker.url))
    want = np.arange(3.0) * (1 + 2 + 3 + 4)
    with a, b:
        group = Group([a.executor(), b.executor()])

        def no_listener(members: list[dict[str, Any]]) -> None:
            members[2].update(direct=False, tcp=None, why="test: no listener")

        monkeypatch.setattr(Group, "_gather", _members_changed(no_listener))
        # without a Redis: one clear error naming the rank, before any function runs
        with pytest.raises(ColocateError, match=r"rank 2 \(lease .*test: no listener.*redis="):
            group.spmd(sum_and_channels)
        with caplog.at_level("WARNING", logger="colocate.client.spmd"):
            results = group.spmd(sum_and_channels, redis=redis_server)
        assert "the whole group of 4 ranks goes through Redis" in caplog.text
        for total, channels in results:
            np.testing.assert_array_equal(total, want)
            assert set(channels.values()) == {"redis"}  # every pair, not only rank 2's

        # every rank has a listener, but rank 0's cannot be reached from lease b (no route to
        # its address): the setup fails on every rank before the function runs, and the call
        # is run again through Redis
        def unreachable(members: list[dict[str, Any]]) -> None:
            members[0]["tcp"] = ["255.255.255.255", 9]  # ENETUNREACH for TCP

        monkeypatch.setattr(Group, "_gather", _members_changed(unreachable))
        caplog.clear()
        t0 = time.monotonic()
        with caplog.at_level("WARNING", logger="colocate.client.spmd"):
            results = group.spmd(sum_and_channels, redis=redis_server)
        assert "runs again through Redis" in caplog.text
        assert "cannot reach it" in caplog.text  # why, per rank
        assert time.monotonic() - t0 < 8  # the failed setup ends at once, not at its timeout
        for total, channels in results:
            np.testing.assert_array_equal(total, want)
            assert set(channels.values()) == {"redis"}
        monkeypatch.undo()
        assert [set(c.values()) for _t, c in group.spmd(sum_and_channels)] == [{"shm", "tcp"}] * 4
