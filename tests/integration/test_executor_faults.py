"""Executors under faults, with real processes and sockets: killed workers, eviction during a
stream of calls, garbage on the wire, memory limits, a restarted agent, idle CPU."""

from __future__ import annotations

import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import pytest

from colocate import ExecutorLost, LeaseEvicted, LeaseExpired
from colocate import protocol as P
from colocate.client.executor import LeaseExecutor
from colocate.config import ExecutorConfig
from colocate.executor import ExecutorSupervisor
from colocate.lease_value import LeaseValue
from colocate.tokens import LeaseClaims, sign_lease
from tests.conftest import require
from tests.integration.leasing import start_lease

SECRET = b"test-secret-for-executor-faults-0123"
NODE = f"f{os.getpid()}"
CORE = sorted(os.sched_getaffinity(0))[-1]
LIMIT = 64 * 1024


def add(a: int, b: int = 0) -> int:
    return a + b


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def spin(seconds: float) -> float:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
    return seconds


def hog(nbytes: int) -> int:
    block = bytearray(nbytes)
    for i in range(0, nbytes, 4096):  # touch every page so it is really resident
        block[i] = 1
    return len(block)


@pytest.fixture(scope="module")
def supervisor() -> Iterator[ExecutorSupervisor]:
    sup = ExecutorSupervisor(
        ExecutorConfig(max_payload_bytes=LIMIT, hot_timeout_s=0.005), SECRET, node=NODE
    )
    try:
        yield sup
    finally:
        sup.close()


_count = 0


def start(sup: ExecutorSupervisor, memory: int = 256 << 20) -> tuple[str, str, str]:
    """(lease id, token, address) of a fresh one-core executor."""
    global _count
    _count += 1
    lease_id = f"fault{_count}"
    handle, token = start_lease(sup, SECRET, lease_id, (CORE,), memory)
    return lease_id, token, handle.address


def executor(sup: ExecutorSupervisor, memory: int = 256 << 20) -> tuple[str, LeaseExecutor]:
    lease_id, token, address = start(sup, memory)
    return lease_id, LeaseExecutor(address, token, lease_id=lease_id, workers=1)


def outcomes(futures: list[Future[object]], timeout: float = 15) -> dict[str, int]:
    """Kind of ending of every future; fails the test if one is still pending."""
    counts: dict[str, int] = {}
    deadline = time.monotonic() + timeout
    for fut in futures:
        exc = fut.exception(timeout=max(0.0, deadline - time.monotonic()))
        kind = "ok" if exc is None else type(exc).__name__
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def test_worker_killed_mid_invocation_fails_every_pending_call(
    supervisor: ExecutorSupervisor,
) -> None:
    lease_id, ex = executor(supervisor)
    pid = supervisor.handles()[-1].pids[0]
    running = ex.submit(nap, 30)
    queued = [ex.submit(add, i) for i in range(50)]
    time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)
    assert outcomes([running, *queued], timeout=10) == {"ExecutorLost": 51}
    with pytest.raises(ExecutorLost):
        ex.invoke(add, 1)
    deadline = time.monotonic() + 5  # the socket closes a moment before the process is gone
    while not supervisor.exited() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert supervisor.exited() == {lease_id: (pid,)}
    assert supervisor.evict(lease_id) < 1.0


def test_worker_killed_during_a_synchronous_invoke(supervisor: ExecutorSupervisor) -> None:
    lease_id, ex = executor(supervisor)
    pid = supervisor.handles()[-1].pids[0]
    threading.Timer(0.3, os.kill, (pid, signal.SIGKILL)).start()
    t = time.monotonic()
    with pytest.raises(ExecutorLost):
        ex.invoke(nap, 30)
    assert time.monotonic() - t < 5
    supervisor.evict(lease_id)


def test_eviction_during_a_stream_ends_every_call(supervisor: ExecutorSupervisor) -> None:
    lease_id, ex = executor(supervisor)
    pids = supervisor.handles()[-1].pids
    futures: list[Future[object]] = []
    stop = threading.Event()
    sync_errors: list[str] = []

    def stream() -> None:
        while not stop.is_set():
            fut = ex.submit(spin, 0.0005)
            futures.append(fut)
            if len(futures) % 50 == 0:
                try:
                    ex.invoke(add, 1)
                except LeaseEvicted:
                    sync_errors.append("LeaseEvicted")
                except BaseException as exc:
                    sync_errors.append(type(exc).__name__)
                time.sleep(0.001)

    thread = threading.Thread(target=stream)
    thread.start()
    time.sleep(0.3)
    elapsed = supervisor.evict(lease_id, grace_s=0.0)
    time.sleep(0.1)
    stop.set()
    thread.join(timeout=10)
    counts = outcomes(futures)
    assert set(counts) <= {"ok", "LeaseEvicted"}, counts
    assert counts.get("ok", 0) > 0 and counts.get("LeaseEvicted", 0) > 0
    assert set(sync_errors) <= {"LeaseEvicted"}
    assert elapsed < 1.0
    assert not any(_alive(p) for p in pids)


def test_grace_period_lets_the_running_call_finish(supervisor: ExecutorSupervisor) -> None:
    lease_id, ex = executor(supervisor)
    running = ex.submit(nap, 0.3)
    queued = [ex.submit(add, i) for i in range(20)]
    time.sleep(0.1)
    elapsed = supervisor.evict(lease_id, grace_s=2.0)
    assert running.result(timeout=5) == 0.3
    assert outcomes(queued) == {"LeaseEvicted": 20}
    assert elapsed < 1.5  # the worker left as soon as its call was done


def test_grace_period_then_kill(supervisor: ExecutorSupervisor) -> None:
    lease_id, ex = executor(supervisor)
    pids = supervisor.handles()[-1].pids
    running = ex.submit(nap, 30)
    time.sleep(0.1)
    elapsed = supervisor.evict(lease_id, grace_s=0.3)
    assert 0.25 < elapsed < 2.0
    assert outcomes([running]) == {"LeaseEvicted": 1}
    assert not any(_alive(p) for p in pids)


def test_expiry_ends_calls_with_lease_expired(supervisor: ExecutorSupervisor) -> None:
    lease_id, ex = executor(supervisor)
    running = ex.submit(nap, 30)
    time.sleep(0.1)
    supervisor.evict(lease_id, reason="expired")
    assert outcomes([running]) == {"LeaseExpired": 1}
    with pytest.raises(LeaseExpired):
        ex.invoke(add, 1)


# -- garbage on the wire ------------------------------------------------------------------
def _raw(address: str) -> socket.socket:
    host, port = address.removeprefix("tcp://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=5)
    return sock


def _read_reply(sock: socket.socket) -> tuple[int, int, bytes] | None:
    head = sock.recv(P.HEADER_SIZE, socket.MSG_WAITALL)
    if len(head) < P.HEADER_SIZE:
        return None
    length, _kind, _flags, status, cid = P.HEADER.unpack(head)
    return status, cid, sock.recv(length, socket.MSG_WAITALL)


def _hello(sock: socket.socket, token: str) -> None:
    sock.sendall(P.frame(P.HELLO, 0, P.VERSION, 0, token.encode()))
    reply = _read_reply(sock)
    assert reply is not None and reply[0] == P.OK


def test_garbage_truncated_frames_and_vanishing_clients_do_not_hurt_the_worker(
    supervisor: ExecutorSupervisor,
) -> None:
    lease_id, token, address = start(supervisor)
    # random bytes before any HELLO
    for junk in (os.urandom(5000), b"\xff" * 16, b"GET / HTTP/1.1\r\n\r\n"):
        with _raw(address) as s:
            s.sendall(junk)
            reply = _read_reply(s)
            assert reply is None or reply[0] in (P.MALFORMED, P.UNAUTHORIZED)
    # a call without HELLO
    with _raw(address) as s:
        s.sendall(P.frame(P.CALL, P.RAW, 0, 7, b"x"))
        assert _read_reply(s) == (P.UNAUTHORIZED, 7, b"send HELLO with a lease token first")
    # a HELLO announcing 4 GiB
    with _raw(address) as s:
        s.sendall(P.HEADER.pack(2**32 - 1, P.HELLO, 0, P.VERSION, 0))
        reply = _read_reply(s)
        assert reply is not None and reply[0] == P.MALFORMED
    # authenticated: call of an undefined function, bad pickle, unknown kind
    with _raw(address) as s:
        _hello(s, token)
        s.sendall(P.frame(P.CALL, P.RAW, 3, 1, b"x"))
        assert _read_reply(s)[:2] == (P.MALFORMED, 1)  # type: ignore[index]
        s.sendall(P.frame(P.DEFINE, P.PICKLED, 0, 0, b"not a pickle"))
        s.sendall(P.frame(P.CALL, P.RAW, 0, 2, b"x"))
        status, cid, body = _read_reply(s)  # type: ignore[misc]
        assert (status, cid) == (P.MALFORMED, 2) and b"cannot be loaded" in body
        s.sendall(P.frame(P.DEFINE, P.REFERENCE, 1, 0, b"operator:add"))
        s.sendall(P.frame(P.CALL, P.PICKLED, 1, 3, b"\x80\x05garbage"))
        assert _read_reply(s)[:2] == (P.MALFORMED, 3)  # type: ignore[index]
        s.sendall(P.frame(99, 0, 0, 4, b""))
        assert _read_reply(s)[:2] == (P.MALFORMED, 4)  # type: ignore[index]
        assert _read_reply(s) is None  # and the stream is closed
    # an oversized call is refused and the connection stays usable
    with _raw(address) as s:
        _hello(s, token)
        s.sendall(P.frame(P.DEFINE, P.REFERENCE, 0, 0, b"builtins:len"))
        s.sendall(P.frame(P.CALL, P.RAW, 0, 5, b"y" * (LIMIT + 10)))
        status, cid, body = _read_reply(s)  # type: ignore[misc]
        assert (status, cid) == (P.TOO_LARGE, 5)
        assert struct.unpack("<QQ", body) == (LIMIT + 10, LIMIT)
        s.sendall(P.frame(P.CALL, P.RAW, 0, 6, b"abc"))
        status, cid, body = _read_reply(s)  # type: ignore[misc]
        assert (status, cid) == (P.OK, 6) and P.decode_result(P.PICKLED, body) == 3
    # truncated frame, then the client vanishes; a client that vanishes mid-call
    with _raw(address) as s:
        _hello(s, token)
        s.sendall(P.HEADER.pack(1000, P.CALL, P.RAW, 0, 9) + b"short")
    with _raw(address) as s:
        _hello(s, token)
        s.sendall(P.frame(P.DEFINE, P.REFERENCE, 0, 0, b"time:sleep"))
        s.sendall(P.frame(P.CALL, P.PICKLED, 0, 1, P.encode_args((0.2,), {})[1]))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
    # after all that, a real client still gets answers from the same worker
    handle = supervisor.handles()[-1]
    pid = 1 if handle.sandboxed else handle.pids[0]  # pid 1 of the lease's own namespace
    with LeaseExecutor(address, token, lease_id=lease_id, workers=1) as ex:
        assert [ex.invoke(add, i, 1) for i in range(10)] == list(range(1, 11))
        assert ex.invoke(os.getpid) == pid
    supervisor.evict(lease_id)


# -- memory ---------------------------------------------------------------------------------
def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.root
def test_memory_limit_kills_a_function_that_takes_more_than_the_lease(
    supervisor: ExecutorSupervisor,
) -> None:
    require(supervisor.confinement.mode in ("v1", "v2"), "needs writable cgroups (root)")
    lease_id, ex = executor(supervisor, memory=64 << 20)
    handle = supervisor.handles()[-1]
    assert ex.invoke(hog, 16 << 20) == 16 << 20  # within the lease
    with pytest.raises((ExecutorLost, MemoryError)):
        ex.invoke(hog, 512 << 20)
    assert supervisor.evict(lease_id) < 1.0
    assert not any(_alive(p) for p in handle.pids)
    assert not any(Path(d).exists() for d in _lease_cgroups(lease_id))


def _lease_cgroups(lease_id: str) -> list[str]:
    return [str(p) for p in Path("/sys/fs/cgroup").glob(f"*/colocate/{NODE}/{lease_id}")]


def test_rlimit_fallback_limits_memory_without_cgroups(tmp_path: Path) -> None:
    with ExecutorSupervisor(
        ExecutorConfig(), SECRET, node=NODE + "r", cgroup_root="", state_dir=str(tmp_path)
    ) as sup:
        assert sup.confinement.mode == "rlimit"
        lease_id, token, address = start(sup, memory=128 << 20)
        with LeaseExecutor(address, token, lease_id=lease_id, workers=1) as ex:
            assert ex.invoke(hog, 16 << 20) == 16 << 20
            with pytest.raises((MemoryError, ExecutorLost)):
                ex.invoke(hog, 1 << 30)


def hog_and_hold(nbytes: int) -> int:
    block = bytearray(nbytes)
    for i in range(0, nbytes, 4096):
        block[i] = 1
    time.sleep(5)
    return len(block)


def test_rlimit_fallback_watchdog_bounds_the_whole_lease(tmp_path: Path) -> None:
    cores = sorted(os.sched_getaffinity(0))
    require(len(cores) >= 2, "needs two cores")
    memory = 96 << 20
    node = NODE + "w"
    with ExecutorSupervisor(
        ExecutorConfig(), SECRET, node=node, cgroup_root="", state_dir=str(tmp_path)
    ) as sup:
        expires = time.time() + 60
        handle = sup.start(LeaseValue.of("wd", cores[:2], memory, time.time(), expires))
        token = sign_lease(SECRET, LeaseClaims("wd", node, tuple(cores[:2]), memory, expires))
        with LeaseExecutor(handle.address, token, lease_id="wd", workers=2) as ex:
            # each worker stays under its own RLIMIT_AS; together they exceed the lease
            futures = [ex.submit(hog_and_hold, 60 << 20) for _ in range(2)]
            assert outcomes(futures, timeout=10) == {"ExecutorLost": 2}


# -- restart and idle ------------------------------------------------------------------------
def _die_without_evicting(sup: ExecutorSupervisor) -> None:
    """What an agent SIGKILL leaves: its fork server sees end of file, its workers run on."""
    sup._fork_sock.close()
    sup._leases.clear()
    sup._verifier.close()


def test_a_restarted_agent_adopts_valid_executors_and_cleans_expired_ones(tmp_path: Path) -> None:
    state = str(tmp_path / "state")
    node = NODE + "x"
    old = ExecutorSupervisor(ExecutorConfig(), SECRET, node=node, state_dir=state)
    lease_id, token, address = start(old)
    expired = "fault-expiring"
    old.start(LeaseValue.of(expired, [CORE], 64 << 20, time.time(), time.time() + 0.5))
    pids = old.handles()[0].pids
    client = LeaseExecutor(address, token, lease_id=lease_id, workers=1)
    assert client.invoke(add, 1, 2) == 3
    _die_without_evicting(old)
    time.sleep(0.6)  # the second lease expires while no agent runs
    assert all(_alive(p) for p in pids)
    with ExecutorSupervisor(ExecutorConfig(), SECRET, node=node, state_dir=state) as new:
        assert new.adopt_or_cleanup() == [expired]
        (handle,) = new.handles()
        assert handle.lease_id == lease_id and handle.adopted and handle.pids == pids
        # the client of the old agent sees no error, and a new client gets in too
        assert client.invoke(add, 2, 3) == 5
        with LeaseExecutor(address, token, lease_id=lease_id, workers=1) as fresh:
            assert fresh.invoke(add, 3, 4) == 7
        assert not list(Path("/sys/fs/cgroup").glob(f"*/colocate/{node}/{expired}"))
        new.evict(lease_id)
        deadline = time.monotonic() + 2
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not any(_alive(p) for p in pids)
    client.shutdown(wait=False)
    old._fork_proc.wait(timeout=5)  # adopted, then released: it exits


def test_without_a_restarted_agent_executors_die_after_the_adoption_window(
    tmp_path: Path,
) -> None:
    node = NODE + "y"
    config = ExecutorConfig(adopt_window_s=0.5)
    old = ExecutorSupervisor(config, SECRET, node=node, state_dir=str(tmp_path))
    start(old)
    pids = old.handles()[0].pids
    _die_without_evicting(old)
    old._fork_proc.wait(timeout=5)
    deadline = time.monotonic() + 2
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(_alive(p) for p in pids)  # the parent-death signal
    with ExecutorSupervisor(config, SECRET, node=node, state_dir=str(tmp_path)) as new:
        assert len(new.adopt_or_cleanup()) == 1  # only the record and cgroups were left
        assert not [p for p in Path("/sys/fs/cgroup").glob(f"*/colocate/{node}/*") if p.is_dir()]


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_hot_worker_spins_then_warm_worker_sleeps(tmp_path: Path) -> None:
    config = ExecutorConfig(hot_timeout_s=0.3)
    with ExecutorSupervisor(config, SECRET, node=NODE + "h", state_dir=str(tmp_path)) as sup:
        lease_id, token, address = start(sup)
        pid = sup.handles()[0].pids[0]
        with LeaseExecutor(address, token, lease_id=lease_id, workers=1) as ex:
            ex.invoke(add, 1)
            before = _cpu_seconds(pid)
            time.sleep(0.25)
            hot = _cpu_seconds(pid) - before  # busy-polling for the next request
            time.sleep(0.3)
            before = _cpu_seconds(pid)
            time.sleep(0.5)
            warm = _cpu_seconds(pid) - before  # blocked in poll
            assert ex.invoke(add, 2) == 2
        # on a loaded machine a spinning worker still gets a good share of its core
        assert hot >= 0.04, hot
        assert warm <= 0.02, warm


def fork_sleeper(_: object = None) -> int:
    pid = os.fork()
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    return pid


@pytest.mark.parametrize("cgroup_root", [None, ""], ids=["cgroups", "rlimit"])
def test_eviction_also_kills_processes_the_functions_started(
    tmp_path: Path, cgroup_root: str | None
) -> None:
    node = NODE + "k"
    # without the sandbox (whose pid namespace dies with worker 0 anyway; see
    # test_executor_sandbox), so that the child's pid is the host's and the kill is the cgroup's
    with ExecutorSupervisor(
        ExecutorConfig(sandbox=False),
        SECRET,
        node=node,
        cgroup_root=cgroup_root,
        state_dir=str(tmp_path),
    ) as sup:
        lease_id, token, address = start(sup)
        with LeaseExecutor(address, token, lease_id=lease_id, workers=1) as ex:
            child = ex.invoke(fork_sleeper)
            assert _alive(child)
            sup.evict(lease_id)
        deadline = time.monotonic() + 2
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not _alive(child)


def test_connections_without_a_token_are_closed_after_the_hello_timeout(tmp_path: Path) -> None:
    node = NODE + "s"
    with ExecutorSupervisor(
        ExecutorConfig(), SECRET, node=node, state_dir=str(tmp_path), hello_timeout_s=0.3
    ) as sup:
        lease_id, token, address = start(sup)
        idle = [_raw(address) for _ in range(5)]
        with LeaseExecutor(address, token, lease_id=lease_id, workers=1) as ex:
            time.sleep(0.8)
            for sock in idle:
                assert sock.recv(1) == b""  # closed by the worker
                sock.close()
            assert ex.invoke(add, 1, 1) == 2  # the authenticated one stays


def test_evicting_a_worker_with_a_backlog_ends_every_call_with_lease_evicted(
    supervisor: ExecutorSupervisor,
) -> None:
    # Many calls queued client-side: writes to the departed worker fail before the notice
    # is read; the notice must still decide the error.
    for _ in range(20):
        lease_id, ex = executor(supervisor)
        ex.invoke(add, 1)
        futures = [ex.submit(time.sleep, 0.001) for _ in range(200)]
        supervisor.evict(lease_id)
        counts = outcomes(futures)
        assert set(counts) <= {"ok", "LeaseEvicted"}, counts
        ex.shutdown()
