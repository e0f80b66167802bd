"""Executors with real processes and sockets: invocations, errors, tokens, payload limits,
privilege drop, pinning, pipelining, several workers, function references."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import as_completed, wait
from pathlib import Path

import pytest

from colocate import (
    BackendUnavailable,
    BadRequest,
    ConfigError,
    LeaseExpired,
    PayloadTooLarge,
    Unauthorized,
)
from colocate.client.executor import LeaseExecutor, RemoteError
from colocate.config import ExecutorConfig
from colocate.executor import ExecutorHandle, ExecutorSupervisor
from colocate.lease_value import LeaseValue
from colocate.tokens import LeaseClaims, sign_lease
from tests.conftest import require

SECRET = b"test-secret-for-executors-0123456789"
LIMIT = 256 * 1024
NODE = f"t{os.getpid()}"
CORES = sorted(os.sched_getaffinity(0))


class Unpicklable(Exception):
    def __init__(self, a: int, b: int) -> None:  # pickles, but cannot be rebuilt from args
        super().__init__(f"{a}/{b}")


def echo(data: bytes) -> bytes:
    return data


def add(a: int, b: int = 0) -> int:
    return a + b


def whoami(_: object = None) -> tuple[int, int, list[int], int]:
    return os.getuid(), os.getgid(), sorted(os.sched_getaffinity(0)), os.getpid()


def divide(a: int, b: int) -> float:
    return a / b


def raise_unpicklable() -> None:
    raise Unpicklable(1, 2)


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@pytest.fixture(scope="module")
def supervisor() -> Iterator[ExecutorSupervisor]:
    sup = ExecutorSupervisor(ExecutorConfig(max_payload_bytes=LIMIT), SECRET, node=NODE)
    try:
        yield sup
    finally:
        sup.close()


class Leased:
    """A started executor and a token for it, evicted at the end of the test."""

    count = 0

    def __init__(
        self,
        sup: ExecutorSupervisor,
        cores: tuple[int, ...],
        memory: int = 256 << 20,
        ttl: float = 120,
    ) -> None:
        Leased.count += 1
        self.sup = sup
        self.lease_id = f"lease{Leased.count}"
        self.expires_at = time.time() + ttl
        self.claims = LeaseClaims(self.lease_id, NODE, cores, memory, self.expires_at)
        self.token = sign_lease(SECRET, self.claims)
        self.handle: ExecutorHandle = sup.start(
            LeaseValue.of(self.lease_id, cores, memory, time.time(), self.expires_at)
        )

    def executor(self, token: str | None = None, **kw: object) -> LeaseExecutor:
        return LeaseExecutor(
            self.handle.address,
            self.token if token is None else token,
            lease_id=self.lease_id,
            workers=len(self.handle.cpu_ids),
            **kw,  # type: ignore[arg-type]
        )


@pytest.fixture
def lease(supervisor: ExecutorSupervisor) -> Iterator[Leased]:
    leased = Leased(supervisor, (CORES[-1],))
    try:
        yield leased
    finally:
        supervisor.evict(leased.lease_id)


def test_invoke_submit_and_map_return_results(lease: Leased) -> None:
    with lease.executor() as ex:
        assert ex.invoke(echo, b"x" * 64) == b"x" * 64
        assert ex.invoke(add, 2, b=3) == 5
        assert ex.submit(add, 40, 2).result(timeout=10) == 42
        assert list(ex.map(add, range(100), range(100))) == [2 * i for i in range(100)]


def test_many_calls_in_flight_on_one_connection(lease: Leased) -> None:
    with lease.executor() as ex:
        futures = [ex.submit(add, i, 1) for i in range(5000)]
        _done, not_done = wait(futures, timeout=30)
        assert not not_done
        assert [f.result() for f in futures] == [i + 1 for i in range(5000)]


def test_sync_and_future_calls_from_many_threads(lease: Leased) -> None:
    errors: list[BaseException] = []
    with lease.executor() as ex:

        def hammer(k: int) -> None:
            try:
                for i in range(300):
                    if i % 2:
                        assert ex.invoke(add, k, i) == k + i
                    else:
                        assert ex.submit(add, k, i).result(timeout=10) == k + i
            except BaseException as exc:
                errors.append(exc)

        def stream(k: int) -> None:  # many calls in flight, collected without result()
            try:
                futures = {ex.submit(add, k, i): i for i in range(2000)}
                done = 0
                for fut in as_completed(futures, timeout=30):
                    assert fut.exception() is None and fut.result() == k + futures[fut]
                    done += 1
                assert done == 2000
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=hammer, args=(k,)) for k in range(6)]
        threads += [threading.Thread(target=stream, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    assert not errors


def test_function_exception_is_reraised_with_remote_traceback(lease: Leased) -> None:
    with lease.executor() as ex:
        with pytest.raises(ZeroDivisionError) as info:
            ex.invoke(divide, 1, 0)
        assert "in divide" in info.value.remote_traceback  # type: ignore[attr-defined]
        assert any("Remote traceback" in note for note in info.value.__notes__)
        with pytest.raises(ZeroDivisionError):
            ex.submit(divide, 1, 0).result(timeout=10)
        with pytest.raises(RemoteError) as remote:
            ex.invoke(raise_unpicklable)
        assert "Unpicklable" in remote.value.type_name and "1/2" in remote.value.message
        assert ex.invoke(add, 1, 1) == 2  # the worker lives on


def test_payloads_at_the_limit_pass_and_above_are_refused(lease: Leased) -> None:
    with lease.executor() as ex:
        assert len(ex.invoke(echo, b"a" * LIMIT)) == LIMIT
        with pytest.raises(PayloadTooLarge) as info:
            ex.invoke(echo, b"a" * (LIMIT + 1))
        assert (info.value.size, info.value.limit) == (LIMIT + 1, LIMIT)
        with pytest.raises(PayloadTooLarge):
            ex.submit(echo, b"a" * (LIMIT + 1)).result(timeout=10)
        with pytest.raises(PayloadTooLarge):  # a result too large to send back
            ex.invoke(bytes, LIMIT + 1)
        assert ex.invoke(echo, b"ok") == b"ok"


def test_forged_expired_and_foreign_tokens_are_refused(
    supervisor: ExecutorSupervisor, lease: Leased
) -> None:
    forged = sign_lease(b"not-the-cluster-secret", lease.claims)
    with pytest.raises(Unauthorized):
        lease.executor(token=forged)
    with pytest.raises(Unauthorized):
        lease.executor(token="garbage.token")
    expired = sign_lease(
        SECRET,
        LeaseClaims(
            lease.lease_id, NODE, lease.claims.cpu_ids, lease.claims.memory_bytes, time.time() - 1
        ),
    )
    with pytest.raises(LeaseExpired):
        lease.executor(token=expired)
    other = Leased(supervisor, (CORES[0],))
    try:
        with pytest.raises(Unauthorized, match="another lease"):
            lease.executor(token=other.token)
        wrong_cores = sign_lease(
            SECRET,
            LeaseClaims(
                lease.lease_id, NODE, (0, 1, 2), lease.claims.memory_bytes, lease.expires_at
            ),
        )
        with pytest.raises(Unauthorized, match="cores"):
            lease.executor(token=wrong_cores)
    finally:
        supervisor.evict(other.lease_id)
    with lease.executor() as ex:  # the real holder still gets in
        assert ex.invoke(add, 1) == 1


@pytest.mark.root
def test_functions_run_unprivileged_on_the_leased_core(lease: Leased) -> None:
    require(os.geteuid() == 0, "privilege drop needs the supervisor to run as root")
    with lease.executor() as ex:
        uid, gid, cores, pid = ex.invoke(whoami)
    assert uid != 0 and gid != 0
    assert cores == [CORES[-1]]
    # a sandboxed worker 0 is pid 1 of the lease's own pid namespace
    assert pid == 1 if lease.handle.sandboxed else pid in lease.handle.pids


def test_one_pinned_worker_per_leased_core(supervisor: ExecutorSupervisor) -> None:
    require(len(CORES) >= 2, "needs two cores")
    leased = Leased(supervisor, tuple(CORES[:2]))
    try:
        assert len(leased.handle.pids) == 2
        with leased.executor() as ex:
            assert ex.workers == 2
            seen = {tuple(r[2]): r[3] for r in ex.map(whoami, range(200))}
        assert sorted(seen) == [(CORES[0],), (CORES[1],)]
        # sandboxed: the lease's own pid namespace, worker 0 is its pid 1
        want = [1, 2] if leased.handle.sandboxed else sorted(leased.handle.pids)
        assert sorted(seen.values()) == want
        with LeaseExecutor(
            leased.handle.unix_address or "", leased.token, lease_id=leased.lease_id, workers=2
        ) as ex:
            assert ex.workers == 2 and ex.invoke(add, 2, 2) == 4
    finally:
        supervisor.evict(leased.lease_id)


def test_module_function_references(lease: Leased) -> None:
    with lease.executor(functions=["os:getpid", "json:dumps"]) as ex:
        assert ex.invoke("os:getpid") in ((1,) if lease.handle.sandboxed else lease.handle.pids)
        assert ex.invoke("json:dumps", [1, 2]) == "[1, 2]"
        with pytest.raises(BadRequest, match="cannot be loaded"):
            ex.invoke("no_such_module_xyz:fn")
        with pytest.raises(BadRequest):
            ex.invoke("not a reference")
        assert ex.invoke(nap, 0) == 0


@pytest.mark.root
def test_a_supervisor_refuses_to_run_functions_as_root_or_a_missing_user() -> None:
    require(os.geteuid() == 0, "the user check applies when the agent runs as root")
    with pytest.raises(ConfigError, match="never run as root"):
        ExecutorSupervisor(ExecutorConfig(run_as_user="root"), SECRET, node=NODE)
    with pytest.raises(ConfigError, match="no user"):
        ExecutorSupervisor(ExecutorConfig(run_as_user="no-such-user-xyz"), SECRET, node=NODE)


def test_start_refuses_bad_leases(supervisor: ExecutorSupervisor, lease: Leased) -> None:
    with pytest.raises(BadRequest):
        supervisor.start(
            LeaseValue.of(lease.lease_id, [CORES[0]], 1 << 20, time.time(), time.time() + 60)
        )  # duplicate
    with pytest.raises(BadRequest):
        supervisor.start(
            LeaseValue.of("../escape", [CORES[0]], 1 << 20, time.time(), time.time() + 60)
        )
    with pytest.raises(BadRequest):
        supervisor.start(LeaseValue.of("nocores", [999], 1 << 20, time.time(), time.time() + 60))
    assert [h.lease_id for h in supervisor.handles()] == [lease.lease_id]


def test_a_client_on_the_same_node_switches_to_the_unix_socket(lease: Leased) -> None:
    with lease.executor() as ex:
        assert ex.addresses == [lease.handle.unix_address]
        assert ex.invoke(add, 1, 2) == 3
    with lease.executor(prefer_unix=False) as ex:
        assert ex.addresses == [lease.handle.address]
        assert ex.invoke(add, 1, 2) == 3


def test_a_dead_fork_server_is_replaced_on_the_next_start(supervisor: ExecutorSupervisor) -> None:
    supervisor._fork_proc.kill()
    supervisor._fork_proc.wait()
    leased = Leased(supervisor, (CORES[0],))
    try:
        with leased.executor() as ex:
            assert ex.invoke(add, 2, 3) == 5
    finally:
        supervisor.evict(leased.lease_id)


def test_map_raises_at_the_failing_call_and_shutdown_can_cancel(lease: Leased) -> None:
    with lease.executor() as ex:
        results = ex.map(divide, [4, 6, 1], [2, 3, 0], chunksize=2)
        assert next(results) == 2 and next(results) == 2
        with pytest.raises(ZeroDivisionError):
            next(results)
    ex = lease.executor()
    slow = [ex.submit(nap, 0.2) for _ in range(10)]
    t = time.monotonic()
    ex.shutdown(wait=True, cancel_futures=True)
    assert time.monotonic() - t < 1.5  # did not wait for ten naps
    assert all(f.cancelled() for f in slow)
    with pytest.raises(RuntimeError):
        ex.submit(add, 1)


def signal_zero(pid: int) -> str:
    try:
        os.kill(pid, 0)
    except PermissionError:
        return "denied"
    return "allowed"


@pytest.mark.root
def test_lease_uid_range_keeps_leases_from_signalling_each_other(tmp_path: Path) -> None:
    require(os.geteuid() == 0, "distinct uids need the supervisor to run as root")
    # without the sandbox, so that the uids alone are what keeps the leases apart
    config = ExecutorConfig(lease_uid_range=(61000, 61001), sandbox=False)
    with ExecutorSupervisor(config, SECRET, node=NODE, state_dir=str(tmp_path)) as sup:
        a, b = Leased(sup, (CORES[0],)), Leased(sup, (CORES[-1],))
        with a.executor() as ea, b.executor() as eb:
            uid_a, uid_b = ea.invoke(whoami)[0], eb.invoke(whoami)[0]
            assert {uid_a, uid_b} == {61000, 61001}
            assert ea.invoke(signal_zero, b.handle.pids[0]) == "denied"
            assert ea.invoke(signal_zero, a.handle.pids[0]) == "allowed"
        with pytest.raises(BackendUnavailable, match="lease_uid_range"):
            Leased(sup, (CORES[0],))
        sup.evict(a.lease_id)
        c = Leased(sup, (CORES[0],))  # a's uid is free again
        with c.executor() as ec:
            assert ec.invoke(whoami)[0] == uid_a


def test_a_deep_state_directory_still_gets_unix_sockets(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    with ExecutorSupervisor(ExecutorConfig(), SECRET, node=NODE, state_dir=str(deep)) as sup:
        leased = Leased(sup, (CORES[0],))
        assert leased.handle.unix_address and len(leased.handle.unix_address) < 107
        with LeaseExecutor(
            leased.handle.unix_address, leased.token, lease_id=leased.lease_id, workers=1
        ) as ex:
            assert ex.invoke(add, 20, 22) == 42
        assert (deep / f"executors-{NODE}" / f"{leased.lease_id}.json").exists()


def test_a_fresh_but_identical_lambda_is_shipped_once(lease: Leased) -> None:
    with lease.executor() as ex:
        results = [ex.invoke(lambda x: x * 2, i) for i in range(300)]
        assert results == [2 * i for i in range(300)]
        assert ex.shipped_functions == 1


def test_futures_outliving_their_executor_still_complete(lease: Leased) -> None:
    import gc

    ex = lease.executor()
    futures = [ex.submit(nap, 0.1) for _ in range(3)]
    del ex
    gc.collect()
    assert [f.result(timeout=10) for f in futures] == [0.1] * 3


def test_workers_report_their_invocation_counts(supervisor: ExecutorSupervisor) -> None:
    from colocate.metrics.events import InvocationTally

    supervisor.drain_invocations()
    leased = Leased(supervisor, (CORES[0],))
    try:
        with leased.executor() as ex:
            for i in range(5):
                ex.invoke(add, i)
            with pytest.raises(ZeroDivisionError):
                ex.invoke(divide, 1, 0)
            with pytest.raises(BadRequest):
                ex.invoke("no_such_module_xyz:fn")
            totals: dict[str, int] = {}
            deadline = time.monotonic() + 5
            while totals.get("ok", 0) < 5 and time.monotonic() < deadline:
                for tally in supervisor.drain_invocations():
                    assert tally["lease_id"] == leased.lease_id
                    results, durations = InvocationTally.from_json(tally)
                    assert durations.count == sum(results.values())
                    for key, n in results.items():
                        totals[key] = totals.get(key, 0) + n
                time.sleep(0.05)
        assert totals == {"ok": 5, "error": 1, "rejected": 1}
    finally:
        supervisor.evict(leased.lease_id)
