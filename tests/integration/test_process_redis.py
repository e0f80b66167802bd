"""Serverless processes with their state in a real Redis (a private redis-server on a loopback
port): the directory store's semantics, in this interpreter and through real workers that an
eviction kills."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from colocate.client.executor import LeaseExecutor
from colocate.config import ExecutorConfig
from colocate.errors import ExecutorLost, LeaseEvicted
from colocate.executor import ExecutorSupervisor
from colocate.process import runtime
from colocate.process.client import pickle_function
from colocate.process.redis_store import LOCK_TTL_MS
from colocate.process.runtime import Call, ProcessLiveElsewhere
from tests.conftest import require
from tests.integration.leasing import start_lease

SECRET = b"test-secret-for-process-redis-0123456"
NODE = f"pr{os.getpid()}"
CORE = sorted(os.sched_getaffinity(0))[-1]


@pytest.fixture(scope="module")
def redis_url(redis_server: str) -> str:
    return f"redis://{redis_server}/0"


@pytest.fixture
def sup(tmp_path: Path) -> Iterator[ExecutorSupervisor]:
    """An unsandboxed supervisor: a sandboxed worker cannot reach the loopback Redis."""
    require(os.geteuid() == 0, "the executor's cgroups need root")
    config = ExecutorConfig(sandbox=False)
    with ExecutorSupervisor(config, SECRET, node=NODE, state_dir=str(tmp_path)) as supervisor:
        yield supervisor


@pytest.fixture
def url(redis_url: str) -> Iterator[str]:
    yield redis_url
    runtime._swap_out()
    runtime._live.clear()


def call(url: str, name: str, fn: Any, *args: Any, call_id: str = "") -> tuple[Any, list[str]]:
    return Call(url, name, pickle_function(fn))(call_id, *args)


def forget() -> None:
    """What a lease's end does to the worker: swap out, and a new worker starts empty."""
    runtime._swap_out()
    runtime._live.clear()


def add(state: Any, n: int) -> int:
    state["total"] = state.get("total", 0) + n
    state.setdefault("seen", []).append(n)
    return int(state["total"])


def fail_after_add(state: Any, n: int) -> None:
    add(state, n)
    raise RuntimeError("boom")


def read(state: Any) -> tuple[int, list[int]]:
    return state.get("total", 0), list(state.get("seen", []))


def test_state_in_redis_commits_restores_lazily_and_applies_a_retry_once(url: str) -> None:
    name = f"r{uuid.uuid4().hex[:6]}"
    for i in range(1, 101):
        assert call(url, name, add, i)[0] == i * (i + 1) // 2
    with pytest.raises(RuntimeError):
        call(url, name, fail_after_add, 1000)
    big = os.urandom(3 << 20)
    call(url, name, lambda s, b: s.__setitem__("big", b), big)
    assert call(url, name, add, 1, call_id="once")[0] == 5051
    forget()
    assert call(url, name, add, 1, call_id="once")[0] == 5051  # the retry: not applied twice
    (total, seen), notes = call(url, name, read)
    assert (total, seen) == (5051, [*range(1, 101), 1]) and notes == []
    proc = runtime._live[(url, name)]
    assert "big" not in proc.values  # lazy: not loaded until touched
    assert call(url, name, lambda s: s["big"])[0] == big
    info = Call(url, name, b"", "snapshot")("")[0]
    assert info["keys"] == 3
    call(url, name, add, 2)
    forget()
    assert call(url, name, read)[0][0] == 5053
    Call(url, name, b"", "delete")("")
    import redis

    assert not list(redis.Redis.from_url(url).scan_iter(match=f"*:{name}:*"))


def test_a_torn_update_restores_the_last_consistent_state_and_says_so(url: str) -> None:
    import redis

    name = f"t{uuid.uuid4().hex[:6]}"
    call(url, name, add, 1)
    call(url, name, add, 2)
    forget()
    r = redis.Redis.from_url(url)
    (log,) = [k for k in r.scan_iter(match=f"*:{name}:log-*")]
    r.set(log, r.getrange(log, 0, r.strlen(log) - 10))  # the last record lost its end
    (total, seen), notes = call(url, name, read)
    assert (total, seen) == (1, [1])
    assert len(notes) == 1 and "did not reach the store" in notes[0]
    assert call(url, name, add, 5)[0] == 6  # and it goes on from there
    forget()
    assert call(url, name, read)[0] == (6, [1, 5])


def test_messages_wait_in_redis_for_a_swapped_out_receiver(url: str) -> None:
    a, b = f"a{uuid.uuid4().hex[:6]}", f"b{uuid.uuid4().hex[:6]}"
    call(url, b, lambda s: None)
    forget()
    call(url, a, lambda s, to: s.send(to, 1), b)
    call(url, a, lambda s, to: s.send(to, 2), b)

    def take_then_fail(s: Any) -> None:
        s.recv()
        raise ValueError("not taken")

    with pytest.raises(ValueError):
        call(url, b, take_then_fail)
    assert call(url, b, lambda s: [s.recv(), s.recv()])[0] == [1, 2]
    with pytest.raises(TimeoutError):
        call(url, b, lambda s: s.recv(timeout=0.05))


@pytest.mark.root
def test_a_worker_killed_by_eviction_leaves_its_state_in_redis_for_the_next_lease(
    sup: ExecutorSupervisor, redis_url: str
) -> None:
    name = f"w{uuid.uuid4().hex[:6]}"
    fn = Call(redis_url, name, pickle_function(add))
    for lease in ("l1", "l2"):
        handle, token = start_lease(sup, SECRET, lease, (CORE,), 256 << 20)
        with LeaseExecutor(handle.address, token, lease_id=lease, workers=1) as ex:
            if lease == "l1":
                for i in range(1, 51):
                    assert ex.invoke(fn, uuid.uuid4().hex, i)[0] == i * (i + 1) // 2
                sup.evict(lease)
                with pytest.raises((LeaseEvicted, ExecutorLost)):  # notice or worker gone
                    for _ in range(50):
                        ex.invoke(fn, uuid.uuid4().hex, 0)
                        time.sleep(0.05)
            else:
                got, notes = ex.invoke(Call(redis_url, name, pickle_function(read)), "")
                assert got == (1275, list(range(1, 51))) and notes == []
                ex.invoke(Call(redis_url, name, b"", "delete"), "")
        sup.evict(lease)


def worker_pid() -> int:
    return os.getpid()


@pytest.mark.root
@pytest.mark.slow
def test_the_lock_of_a_hard_killed_worker_expires_and_the_next_lease_takes_over_within_the_ttl(
    sup: ExecutorSupervisor, redis_url: str
) -> None:
    name = f"k{uuid.uuid4().hex[:6]}"
    executors = {}
    for lease in ("k1", "k2"):
        handle, token = start_lease(sup, SECRET, lease, (CORE,), 256 << 20)
        executors[lease] = LeaseExecutor(handle.address, token, lease_id=lease, workers=1)
    first, second = executors["k1"], executors["k2"]
    try:
        for i in range(1, 21):
            assert first.invoke(Call(redis_url, name, pickle_function(add)), "", i)[0] == (
                i * (i + 1) // 2
            )
        os.kill(first.invoke(worker_pid), signal.SIGKILL)  # no exit hook: the lock stays
        killed = time.monotonic()
        # at once, the lock still names the dead lease: the next one is told where it is
        with pytest.raises(ProcessLiveElsewhere) as held:
            second.invoke(Call(redis_url, name, pickle_function(read)), "")
        assert held.value.lease_id == "k1"
        # waiting for the lock, the next lease gets it when its TTL runs out
        wait_s = LOCK_TTL_MS / 1000 + 10
        got, notes = second.invoke(Call(redis_url, name, pickle_function(read), wait_s=wait_s), "")
        took = time.monotonic() - killed
        assert got == (210, list(range(1, 21))) and notes == []
        assert took <= LOCK_TTL_MS / 1000 + 3, took  # within the TTL (and some load)
        second.invoke(Call(redis_url, name, b"", "delete"), "")
    finally:
        for ex in executors.values():
            ex.shutdown(wait=False, cancel_futures=True)
        for lease in executors:
            sup.evict(lease)
