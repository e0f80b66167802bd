"""FMI groups of forked processes that call ``colocate.fmi.rank`` directly (no broker or
agent: the client's rendezvous done here), to cover what the two-core dev nodes cannot hold:
3, 4 and 5 ranks of one lease over shared memory (recursive doubling over the slots, with
MPICH's pairing first when the size is not a power of two), checked against numpy, with
every rank getting the same bits and non-commutative folds in rank order."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import queue
import re
import sys
import time
from typing import Any

import cloudpickle
import numpy as np
import pytest

from colocate.fmi import rank as fmi_rank
from tests.integration.test_fmi import check_against_numpy, every_operation

cloudpickle.register_pickle_by_value(sys.modules[__name__])
pytestmark = pytest.mark.slow


def _rank(
    r: int,
    fn: bytes,
    group: str,
    ticket: str,
    channel: str,
    args: tuple[Any, ...],
    q: Any,
    lease: str = "one-lease",
) -> None:
    try:
        info = fmi_rank.prepare(group, ticket, "", channel)
        info["lease"] = lease  # ranks of other leases: TCP between them (no supervisor here)
        q[0].put((r, info))
        members = q[1 + r].get(timeout=30)
        result = fmi_rank.run(
            fn, group, r, members, "00" * 32, channel, None, ticket, "", args, {}, 10.0
        )
        q[0].put((r, ("ok", cloudpickle.dumps(result))))
    except BaseException as exc:
        q[0].put((r, ("error", repr(exc))))


def run_forked(
    fn: Any,
    size: int,
    channel: str,
    *args: Any,
    errors: bool = False,
    leases: list[str] | None = None,
) -> list[Any]:
    """``fn(comm, *args)`` on ``size`` forked ranks of one lease (or of ``leases``, one name
    per rank); the results in rank order (with ``errors``: ("ok", result) or ("error", repr)
    per rank, None for a rank whose process died)."""
    ctx = mp.get_context("fork")
    group = os.urandom(16).hex()
    ticket = json.dumps([group, "one-lease", "127.0.0.1", time.time() + 60, []])
    queues = [ctx.Queue() for _ in range(size + 1)]
    procs = [
        ctx.Process(
            target=_rank,
            args=(
                r,
                cloudpickle.dumps(fn),
                group,
                ticket,
                channel,
                args,
                queues,
                leases[r] if leases else "one-lease",
            ),
        )
        for r in range(size)
    ]
    for proc in procs:
        proc.start()
    try:
        members: list[Any] = [None] * size
        for _ in range(size):
            r, info = queues[0].get(timeout=30)
            members[r] = info
        for r in range(size):
            queues[1 + r].put(members)
        results: list[Any] = [None] * size
        deadline = time.monotonic() + 60
        while any(res is None and procs[r].exitcode in (None, 0) for r, res in enumerate(results)):
            assert time.monotonic() < deadline, f"ranks hung: {results}"
            try:
                r, (status, value) = queues[0].get(timeout=0.2)
            except queue.Empty:
                continue
            if errors:
                results[r] = (status, cloudpickle.loads(value) if status == "ok" else value)
            else:
                assert status == "ok", f"rank {r}: {value}"
                results[r] = cloudpickle.loads(value)
        return results
    finally:
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()


def sums_many_times(comm: Any) -> list[Any]:
    import numpy as np

    rng = np.random.default_rng(comm.rank)
    out = []
    for n in (1, 7, 120, 5000):  # slots (up to ~1 KiB) and the ring
        x = rng.standard_normal(n)
        out.append((x, comm.allreduce(x)))
    out.append((None, comm.allreduce(0.1 * (comm.rank + 1))))
    out.append((None, comm.allreduce(comm.rank + 1)))
    out.append((None, comm.allreduce([comm.rank])))  # SUM of lists: concatenation
    comm.barrier()
    return out


@pytest.mark.parametrize("size", [3, 4])
def test_every_operation_over_shared_memory_for_3_and_4_ranks(size: int) -> None:
    results = run_forked(every_operation, size, "auto", 5)
    check_against_numpy(results, 5)
    assert all(set(r["channels"].values()) == {"shm"} for r in results)


@pytest.mark.parametrize("size", [4, 5])
def test_allreduce_gives_every_rank_the_same_bits_in_rank_order(size: int) -> None:
    results = run_forked(sums_many_times, size, "auto")
    inputs = [[x for x, _ in res[:4]] for res in results]
    for k in range(4):
        want = np.sum([inputs[r][k] for r in range(size)], axis=0)
        first = results[0][k][1]
        np.testing.assert_allclose(first, want)
        for res in results[1:]:
            assert res[k][1].tobytes() == first.tobytes()  # identical, not only close
    assert {res[4][1] for res in results} == {results[0][4][1]}
    assert abs(results[0][4][1] - 0.1 * size * (size + 1) / 2) < 1e-12
    assert [res[5][1] for res in results] == [size * (size + 1) // 2] * size
    assert [res[6][1] for res in results] == [list(range(size))] * size


@pytest.mark.parametrize("leases", ["aab", "aabb", "abb", "aaabb"])
def test_a_group_mixing_shared_memory_and_tcp_gives_numpys_results(leases: str) -> None:
    """Ranks of two leases: shm within each, TCP between; every operation checked against
    numpy, every rank the same bits, many collectives in a row; then again with recursive
    doubling forced on (slots with shm partners, sockets with the others), which hung on
    the third collective while a slot published for it counted as progress."""
    size = len(leases)
    results = run_forked(every_operation, size, "auto", 9, leases=list(leases))
    check_against_numpy(results, 9)
    for r, res in enumerate(results):
        want = {o: "shm" if leases[o] == leases[r] else "tcp" for o in range(size) if o != r}
        assert res["channels"] == want
    many = run_forked(sums_many_times, size, "auto", leases=list(leases))
    for k in range(4):
        want = np.sum([many[r][k][0] for r in range(size)], axis=0)
        np.testing.assert_allclose(many[0][k][1], want)
        assert all(res[k][1].tobytes() == many[0][k][1].tobytes() for res in many)
    assert [res[6][1] for res in many] == [list(range(size))] * size
    doubled = run_forked(doubling_forced, size, "auto", leases=list(leases))
    want = np.sum([np.arange(5.0) * (r + 1) for r in range(size)], axis=0)
    for res in doubled:
        assert len(res) == 20
        for got in res:
            np.testing.assert_array_equal(got, want)


def doubling_forced(comm: Any) -> list[Any]:
    import numpy as np

    comm._fast = True  # every rank alike: the mixed group's recursive doubling
    out = []
    for _ in range(20):
        out.append(comm.allreduce(np.arange(5.0) * (comm.rank + 1)))
        comm.barrier()
    return out


def dies_mid_allreduce(comm: Any) -> None:
    import os

    import numpy as np

    for i in range(10_000):
        if i == 100 and comm.rank == 2:
            os._exit(1)  # its worker killed, mid-collective
        comm.allreduce(np.ones(3))


def test_a_rank_that_dies_mid_allreduce_ends_every_other_rank_fast() -> None:
    """The shm fast path spins on a slot: a partner that died is noticed from its doorbell
    socket's end, and the others learn it from the abort that follows."""
    started = time.monotonic()
    results = run_forked(dies_mid_allreduce, 4, "auto", errors=True)
    assert results[2] is None  # died
    for r in (0, 1, 3):
        status, value = results[r]
        assert status == "error" and re.match(r"LeaseEvicted\(.rank 2 ", value), (r, value)
    assert time.monotonic() - started < 10
