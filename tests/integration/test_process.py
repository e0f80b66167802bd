"""Serverless processes on real parts: broker and agents as subprocesses, workers in their
sandbox as the lease's owner, the state in a directory store, evictions as the agent does them
(a starting job's prolog revokes with no grace)."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from colocate import LeaseEvicted
from colocate.client.executor import LeaseExecutor
from colocate.client.lease import Client
from colocate.errors import ExecutorLost, Unauthorized
from colocate.process import Process, StateRolledBack
from tests.integration.leasing import (
    Service,
    control_auth,
    services,
    start_cluster,
    wait_until,
)
from tests.integration.test_identity import as_user

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Service, list[Service], Path]]:
    tmp = tmp_path_factory.mktemp("process")
    broker, agents = start_cluster(
        tmp, {"pr1": (1, "2GiB"), "pr2": (1, "2GiB"), "pr3": (2, "2GiB")}
    )
    with services(broker, *agents):
        yield broker, agents, tmp
    for service in (broker, *agents):
        assert "Traceback" not in service.logs(), service.logs()


def evict(cluster: tuple[Service, list[Service], Path], proc: Process) -> None:
    """What a starting job's prolog does: revoke the lease with no grace."""
    _broker, agents, tmp = cluster
    lease = proc.lease
    assert lease is not None
    agent = next(a for a in agents if a.name == f"agent {lease.node}")
    reply = httpx.post(
        f"{agent.url}/v1/leases/{lease.lease_id}/revoke",
        json={"grace_s": 0.0, "reason": "job_start"},
        auth=control_auth(tmp, lease.node),
        timeout=10,
    )
    assert reply.status_code == 200, reply.text


def add(state: Any, i: int) -> int:
    state["n"] = state.get("n", 0) + 1
    state["sum"] = state.get("sum", 0) + i
    state.setdefault("log", []).append(i)
    return int(state["n"])


def add_slowly(state: Any, i: int) -> None:
    add(state, i)
    time.sleep(30)  # the lease is taken back meanwhile


def read(state: Any) -> dict[str, Any]:
    return {
        "n": state.get("n", 0),
        "sum": state.get("sum", 0),
        "log": list(state.get("log", [])),
        "uid": os.getuid(),
    }


def test_state_of_1000_invocations_survives_an_eviction_without_the_interrupted_call(
    cluster: tuple[Service, list[Service], Path], store: str
) -> None:
    broker, _agents, _tmp = cluster
    proc = Client(broker.url).process("acc", memory="256MiB", store=store)
    for i in range(1, 1001):
        assert proc.invoke(add, i) == i
    first = proc.lease
    assert first is not None
    outcome: list[BaseException | None] = []

    def interrupted() -> None:
        try:
            proc.invoke(add_slowly, 5000)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    caller = threading.Thread(target=interrupted)
    caller.start()
    time.sleep(0.5)  # the call runs and has changed its overlay
    evict(cluster, proc)
    caller.join(20)
    assert not caller.is_alive() and isinstance(outcome[0], LeaseEvicted), outcome
    with proc:
        state = proc.invoke(read)  # a new lease, the state from the store
        assert proc.lease is not None and proc.lease.lease_id != first.lease_id
        assert (
            state["n"] == 1000 and state["sum"] == 500500 and state["log"] == list(range(1, 1001))
        )
        assert state["uid"] != 0  # the owner's worker wrote it, not root
        assert proc.notices == []
    owner_dir = Path(store) / str(state["uid"])
    assert (owner_dir.stat().st_mode & 0o777) == 0o700
    proc.delete()
    assert not (owner_dir / "acc").exists()


def put_big(state: Any, mib: int, tag: int) -> None:
    state["big"] = bytes([tag]) * (mib << 20)
    state["tag"] = tag


def tag_and_size(state: Any) -> tuple[int, int]:
    return int(state.get("tag", 0)), len(state.get("big", b""))


def test_a_state_too_large_for_the_grace_restores_the_last_consistent_snapshot_and_says_so(
    cluster: tuple[Service, list[Service], Path], store: str
) -> None:
    broker, _agents, _tmp = cluster
    proc = Client(broker.url).process("big", memory="1536MiB", store=store)
    proc.invoke(put_big, 1, 1)
    proc.snapshot()
    rolled_back = False
    for attempt in range(2, 5):  # the writer may win the race on an idle machine: try again
        proc.invoke(put_big, 400, attempt)  # returns at once: the 400 MiB go out in the background
        evict(cluster, proc)
        time.sleep(0.5)
        with _record() as seen:
            tag, size = invoke_after_eviction(proc, tag_and_size)
        # never half: either the whole update or the one before it, and then the user is told
        if tag == attempt:
            assert size == 400 << 20 and not seen
        else:
            assert (tag, size) in {(1, 1 << 20), (attempt - 1, 400 << 20)}, (tag, size)
            assert seen and "did not reach the store" in seen[0], seen
            rolled_back = True
            break
    proc.delete()
    assert rolled_back, "400 MiB always reached the store within no grace"


class _record:
    """Collects StateRolledBack messages issued inside the block."""

    def __enter__(self) -> list[str]:
        import warnings

        self._cm = warnings.catch_warnings(record=True)
        self._seen = self._cm.__enter__()
        warnings.simplefilter("always")
        self.messages: list[str] = []
        return self.messages

    def __exit__(self, *exc: object) -> None:
        self.messages.extend(
            str(w.message) for w in self._seen if issubclass(w.category, StateRolledBack)
        )
        self._cm.__exit__(*exc)


def invoke_after_eviction(proc: Process, fn: Any) -> Any:
    """The first call after an eviction may still meet the old lease's notice (LeaseEvicted);
    the process then moves to a new lease and the call is made there."""
    try:
        return proc.invoke(fn)
    except LeaseEvicted:
        return proc.invoke(fn)


def test_two_processes_exchange_messages_while_one_is_swapped_out(
    cluster: tuple[Service, list[Service], Path], store: str
) -> None:
    broker, _agents, _tmp = cluster
    client = Client(broker.url)
    a = client.process("ping", memory="128MiB", store=store)
    b = client.process("pong", memory="128MiB", store=store)
    b.invoke(lambda s: s.__setitem__("got", []))
    b.release()  # swapped out: no lease
    assert b.lease is None
    for i in range(3):
        a.invoke(lambda s, i: s.send("pong", {"i": i}), i)

    def drain(s: Any) -> list[int]:
        got = s["got"]
        while True:
            try:
                got.append(s.recv()["i"])
            except TimeoutError:
                return list(got)

    assert b.invoke(drain) == [0, 1, 2]  # b comes back, the messages waited in the store
    a.invoke(lambda s: s.send("pong", "live"))  # now both live: handed over directly
    assert b.invoke(lambda s: s.recv(timeout=5)) == "live"
    assert b.stats()["messages_direct"] == 1
    inbox = next(iter(Path(store).glob("*/pong/inbox")))
    assert list(inbox.iterdir()) == []
    a.release()
    b.delete()
    wait_until(lambda: not client.leases(), what="the processes' leases released")


class SlowToSend:
    """A result whose pickling takes 2 s: the call has committed, its reply is not out yet."""

    def __reduce__(self) -> tuple[Any, ...]:
        time.sleep(2)
        return (int, (7,))


def bump(state: Any) -> Any:
    with open(os.path.join(state.dir, "runs"), "a") as f:  # state.dir: written through at once
        f.write("run\n")
    state["bumps"] = state.get("bumps", 0) + 1
    return SlowToSend()


def test_a_call_evicted_after_its_commit_is_not_applied_twice_when_retried(
    cluster: tuple[Service, list[Service], Path], store: str
) -> None:
    broker, _agents, _tmp = cluster
    proc = Client(broker.url).process("once", memory="128MiB", store=store)
    assert proc.invoke(read)["n"] == 0  # the lease is up and warm
    runs = next(iter(Path(store).glob("*/once/files"))) / "runs"
    outcome: list[BaseException | None] = []
    caller = threading.Thread(target=lambda: outcome.append(_call(proc, bump)))
    caller.start()
    head = runs.parent.parent / "head"  # the last update committed, as the worker says it

    def committed() -> bool:
        return runs.exists() and int.from_bytes(head.read_bytes()[:8], "little") == 1

    wait_until(committed, 20, "the call to commit")  # then its reply takes 2 s to pickle
    evict(cluster, proc)
    caller.join(20)  # the node took the lease back (notice or killed worker): outcome unknown
    assert not caller.is_alive() and isinstance(outcome[0], LeaseEvicted | ExecutorLost), outcome
    assert invoke_retry(proc, bump) == 7  # the retry: same function, same arguments
    assert proc.invoke(lambda s: s["bumps"]) == 1  # applied once
    assert runs.read_text() == "run\n"  # and the function ran once
    proc.delete()


def _call(proc: Process, fn: Any, *args: Any) -> BaseException | None:
    try:
        proc.invoke(fn, *args)
    except BaseException as exc:
        return exc
    return None


def invoke_retry(proc: Process, fn: Any) -> Any:
    """Retry until a lease answers (the old lease's notice may still be in the way)."""
    for _ in range(3):
        try:
            return proc.invoke(fn)
        except (LeaseEvicted, ExecutorLost):
            continue
    return proc.invoke(fn)


def write_file_then_fail(state: Any, text: str) -> None:
    Path(state.dir, "notes.txt").write_text(text)
    state["noted"] = True
    raise RuntimeError("after the file was written")


def test_state_dir_files_are_written_through_and_not_rolled_back(
    cluster: tuple[Service, list[Service], Path], store: str
) -> None:
    """The documented semantics: keys are transactional, files in state.dir are not (they
    sit in the store at once, survive the lease, and stay when the call raises)."""
    broker, _agents, _tmp = cluster
    proc = Client(broker.url).process("files", memory="128MiB", store=store)
    with pytest.raises(RuntimeError, match="after the file"):
        proc.invoke(write_file_then_fail, "kept")
    evict(cluster, proc)
    got = invoke_retry(proc, lambda s: (Path(s.dir, "notes.txt").read_text(), "noted" in s))
    assert got == ("kept", False)
    proc.delete()


def test_a_second_client_of_the_owner_attaches_to_the_live_process(
    cluster: tuple[Service, list[Service], Path], store: str
) -> None:
    broker, _agents, _tmp = cluster
    first = Client(broker.url).process("shared", memory="128MiB", store=store)
    assert first.invoke(add, 1) == 1
    second = Client(broker.url).process("shared", memory="128MiB", store=store)
    assert second.invoke(add, 2) == 2  # the live state, not a copy from the store
    assert second.lease is not None and first.lease is not None
    assert second.lease.lease_id == first.lease.lease_id
    assert first.invoke(read)["log"] == [1, 2]
    second.release()  # an attached client leaves the lease to the one that took it
    assert first.invoke(add, 3) == 3
    first.delete()


TAKE = """
from colocate.process import Process
proc = Client(values["url"]).process(values["name"], memory="128MiB", store=values["store"])
try:
    out = {"n": proc.invoke(lambda s, n: s.setdefault("n", n), values["n"]), "lease": proc.lease.lease_id}
    if not values.get("keep"):
        proc.release()  # swap out; gives the lease back unless attached to another client's
except Exception:
    if proc.lease is not None:
        proc.lease.release()
    raise
"""


def test_a_process_is_its_owners_another_user_is_refused_in_one_line(
    cluster: tuple[Service, list[Service], Path], store: str, users: tuple[str, str]
) -> None:
    broker, _agents, _tmp = cluster
    a, b = users
    first = as_user(a, TAKE, url=broker.url, store=store, name="mine", n=41, keep=True)["ok"]
    try:
        assert first["n"] == 41
        # another client of a (another process on the machine) reaches the live one
        again = as_user(a, TAKE, url=broker.url, store=store, name="mine", n=0)["ok"]
        assert again == first
        # b's "mine" is b's own; a's is refused, naming the owner
        assert as_user(b, TAKE, url=broker.url, store=store, name="mine", n=7)["ok"]["n"] == 7
        refused = as_user(b, TAKE, url=broker.url, store=store, name=f"{a}/mine", n=0)
        assert refused["error"] == "Forbidden", refused
        assert f"belongs to {a}: only {a}'s leases reach it" in refused["message"]
        assert "\n" not in refused["message"].split("\n\nRemote traceback")[0]
    finally:
        as_user(
            a,
            "out = Client(values['url']).release(values['lease'])",
            url=broker.url,
            lease=first["lease"],
        )
        wait_until(lambda: not Client(broker.url).leases(), 30, "the users' leases to end")


def cores_and_threads(state: Any) -> tuple[int, int]:
    import threading as th

    state["runs"] = state.get("runs", 0) + 1
    done: list[int] = []
    threads = [th.Thread(target=lambda: done.append(sum(range(10_000)))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(os.sched_getaffinity(0)), len(done)


def test_a_process_with_two_cores_runs_its_functions_on_both(
    cluster: tuple[Service, list[Service], Path], store: str
) -> None:
    broker, _agents, _tmp = cluster
    proc = Client(broker.url).process("wide", cores=2, memory="128MiB", store=store)
    assert proc.invoke(cores_and_threads) == (2, 4)
    assert proc.lease is not None and proc.lease.cores == 2 and proc.lease.node == "pr3"
    assert proc.invoke(lambda s: s["runs"]) == 1
    proc.delete()


def bump_shared(state: Any, i: int) -> int:
    state["n"] = state.get("n", 0) + 1
    state.setdefault("seen", []).append(i)
    return os.getpid()


def test_two_workers_share_one_state_and_lose_no_update(
    cluster: tuple[Service, list[Service], Path], store: str
) -> None:
    broker, _agents, _tmp = cluster
    proc = Client(broker.url).process("pair", workers=2, memory="256MiB", store=store)
    futures = [proc.submit(bump_shared, i) for i in range(200)]
    pids = {f.result(timeout=60) for f in futures}
    assert len(pids) == 2  # both workers ran calls
    n, seen = proc.invoke(lambda s: (s["n"], sorted(s["seen"])))
    assert n == 200 and seen == list(range(200))  # every call once, none lost to a race
    proc.snapshot()  # one worker compacts; the other follows the new log
    assert {proc.submit(bump_shared, 200 + i).result(timeout=30) for i in range(20)} == pids
    assert proc.invoke(lambda s: s["n"]) == 220
    proc.release()
    assert proc.invoke(lambda s: (s["n"], len(s["seen"]))) == (220, 220)  # from the store
    proc.delete()


def test_a_client_whose_token_an_attacher_renewed_keeps_calling_and_reconnects_by_renewing(
    cluster: tuple[Service, list[Service], Path], store: str
) -> None:
    broker, _agents, _tmp = cluster
    first = Client(broker.url).process("stale", memory="128MiB", store=store)
    assert first.invoke(add, 1) == 1
    assert first.lease is not None
    stale = first.lease.token
    second = Client(broker.url).process("stale", memory="128MiB", store=store)
    assert second.invoke(add, 2) == 2  # attached: renewed the lease, a new token
    # the first client's token is refused by the executor now
    with (
        pytest.raises(Unauthorized, match="replaced"),
        LeaseExecutor(first.lease.address, stale, lease_id=first.lease.lease_id, workers=1) as old,
    ):
        old.invoke(os.getpid)
    # ... yet the first client's calls go on, on the same lease: its connection was
    # authenticated before the renewal
    assert first.invoke(add, 3) == 3
    assert second.lease is not None and first.lease.lease_id == second.lease.lease_id
    assert first.invoke(read)["log"] == [1, 2, 3]
    # the first client's connection is cut (as a network drop would): the call in hand fails
    # with the connection, the next one connects to the same lease again, is refused the
    # replaced token at HELLO, renews (Process._refresh) and runs there, once
    executor = first._executor
    assert executor is not None
    for conn in executor._conns:
        conn.sock.shutdown(socket.SHUT_RDWR)
    with pytest.raises(ExecutorLost):
        first.invoke(add, 4)
    assert first.invoke(add, 4) == 4  # the retry of the call that failed: applied once
    assert first.lease.lease_id == second.lease.lease_id  # the live process, not a new lease
    assert first.lease.token not in (stale, second.lease.token)  # renewed: a token of its own
    assert second.invoke(add, 5) == 5  # the attached client's connection is unaffected
    assert first.invoke(read)["log"] == [1, 2, 3, 4, 5]
    second.release()
    first.delete()


def set_pair(state: Any, i: int) -> int:
    state["a"] = i
    time.sleep(0.002)  # a window between the two writes for the eviction to fall into
    state["b"] = i
    state["n"] = state.get("n", 0) + 1
    state.setdefault("seen", []).append(i)
    return i


def test_an_eviction_amid_concurrent_commits_of_two_workers_leaves_no_partial_write(
    cluster: tuple[Service, list[Service], Path], store: str
) -> None:
    broker, _agents, _tmp = cluster
    proc = Client(broker.url).process("torn", workers=2, memory="256MiB", store=store)
    assert proc.invoke(set_pair, -1) == -1
    futures = [proc.submit(set_pair, i) for i in range(600)]
    wait_until(lambda: sum(f.done() for f in futures) >= 100, timeout_s=60, what="100 calls")
    evict(cluster, proc)  # while the rest are running or queued on the two workers
    acknowledged: set[int] = set()
    failed = 0
    for f in futures:
        try:
            acknowledged.add(f.result(timeout=60))
        except (LeaseEvicted, ExecutorLost):
            failed += 1
    assert acknowledged and failed, (len(acknowledged), failed)  # the eviction fell amid them
    a, b, n, seen = invoke_after_eviction(proc, lambda s: (s["a"], s["b"], s["n"], list(s["seen"])))
    assert a == b == seen[-1]  # the last committed call's two writes, never half of one
    assert n == len(seen) == len(set(seen))  # every committed call once, all of its writes
    assert acknowledged <= set(seen)  # nothing a caller was told committed is lost
    assert set(seen) <= {-1, *range(600)}
    proc.delete()
