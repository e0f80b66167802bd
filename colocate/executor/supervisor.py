"""The executor supervisor: starts, evicts and cleans up one executor per lease on this node.

Used by the node agent. It owns a fork server (pre-imported, forks workers in milliseconds), a
token verifier (workers ask it whether a client's lease token is good; the cluster secret never
enters a process that runs user code), the lease cgroups, and an RSS watchdog where cgroups
are not available.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pwd
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from colocate.config import ExecutorConfig
from colocate.errors import BackendUnavailable, BadRequest, ConfigError
from colocate.executor.confinement import Confinement, LeaseCgroups, check_name, remove_dirs
from colocate.executor.forkserver import recv_msg, send_msg
from colocate.executor.verifier import TokenVerifier
from colocate.executor.worker import WorkerSpec, eviction_signal

log = logging.getLogger(__name__)

WATCHDOG_INTERVAL_S = 0.1
_MAX_TALLIES = 10_000
_SOCKET_DIR_MAX = 60  # leaves room for "/<lease id>/w<i>.sock" under 107 bytes
_FORKSERVER_MAIN = (
    "import sys; from colocate.executor.forkserver import main; sys.exit(main(sys.argv[1:]))"
)


@dataclass(frozen=True)
class ExecutorHandle:
    """A running executor: where clients connect and what it holds.

    ``address`` is worker 0's TCP endpoint (``tcp://host:port``); a client learns the other
    workers' endpoints from the handshake. ``unix_address`` is the same worker on a Unix socket
    (clients on this node). ``memory_bytes`` is the limit shared by all workers of the lease.
    """

    lease_id: str
    address: str
    cpu_ids: tuple[int, ...]
    memory_bytes: int
    pids: tuple[int, ...]
    unix_address: str | None = None
    worker_addresses: tuple[str, ...] = ()
    expires_at: float = 0.0
    confinement: str = "rlimit"  # "v1", "v2" (cgroups) or "rlimit" (rlimit + RSS watchdog)


@dataclass
class _Lease:
    handle: ExecutorHandle
    cgroups: LeaseCgroups
    lease_dir: str
    pidfds: dict[int, int] = field(default_factory=dict)
    uid: int | None = None
    baseline_rss: int = 0  # bytes the workers held right after start (shared with the fork server)


def _tcp_url(host: str, port: int) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def _create_time(pid: int) -> float | None:
    try:
        import psutil

        return float(psutil.Process(pid).create_time())
    except Exception:
        return None


class ExecutorSupervisor:
    """Starts and evicts executors (one per lease, one worker per leased core) on this node.

    ``secret`` is the cluster secret the broker signs lease tokens with; ``node`` the name
    tokens carry; ``host`` the address workers listen on. ``cgroup_root`` is the cgroup mount
    (default ``/sys/fs/cgroup``; leases go under ``colocate/<node>/<lease>``); pass ``""`` to
    force rlimits. ``state_dir/executors-<node>/`` holds Unix sockets and pid files; keep it across
    agent restarts so that ``adopt_or_cleanup`` can find a previous agent's executors (a private
    temporary directory when None). ``preload`` adds to ``config.preload_modules``: modules
    the fork server imports once, so workers have them without reading the installation.
    Workers close connections that present no valid token within ``hello_timeout_s``.
    """

    def __init__(
        self,
        config: ExecutorConfig,
        secret: bytes,
        *,
        node: str,
        host: str = "127.0.0.1",
        cgroup_root: str | None = None,
        state_dir: str | None = None,
        preload: Sequence[str] = (),
        hello_timeout_s: float = 10.0,
    ) -> None:
        self.config = config
        self.node = check_name(node, "node")
        self.host = host
        self.hello_timeout_s = hello_timeout_s
        self._usable_cpus = frozenset(os.sched_getaffinity(0))  # before anyone pins this process
        if os.geteuid() == 0:
            try:
                user = pwd.getpwnam(config.run_as_user)
            except KeyError:
                raise ConfigError(
                    f"no user {config.run_as_user!r} on this node; name an unprivileged user",
                    key="executor.run_as_user",
                ) from None
            if user.pw_uid == 0:
                raise ConfigError(
                    "functions never run as root; name an unprivileged user",
                    key="executor.run_as_user",
                )
        self._uids: range | None = None
        if config.lease_uid_range is not None:
            first, last = config.lease_uid_range
            if not 0 < first <= last:
                raise ConfigError(
                    f"must be [first, last] with 0 < first <= last, got {[first, last]}",
                    key="executor.lease_uid_range",
                )
            self._uids = range(first, last + 1)
        self._starting_uids: set[int | None] = set()
        self._starting_ids: set[str] = set()
        self._own_state_dir = state_dir is None
        base = state_dir or tempfile.mkdtemp(prefix="colocate-")
        self._base_dir = base
        # The agent keeps its own files in ``base``; agents of several nodes may share it.
        self.state_dir = os.path.join(base, f"executors-{self.node}")
        os.makedirs(self.state_dir, exist_ok=True)
        for d in (base, self.state_dir):  # clients of any user may reach the Unix sockets
            os.chmod(d, os.stat(d).st_mode | 0o011)
        self.confinement = Confinement(
            node, "/sys/fs/cgroup" if cgroup_root is None else cgroup_root or None
        )
        self._leases: dict[str, _Lease] = {}
        self._lock = threading.RLock()
        self._fork_lock = threading.Lock()
        # Unix socket paths are limited to 107 bytes: sockets go to a short private directory
        # when the state directory is deep (pid files stay in the state directory).
        self._socket_dir = self.state_dir
        if len(self.state_dir) > _SOCKET_DIR_MAX:
            self._socket_dir = tempfile.mkdtemp(prefix="colocate-sock-")
            os.chmod(self._socket_dir, 0o711)
        self._tallies: list[dict[str, Any]] = []
        self._verifier = TokenVerifier(
            os.path.join(self._socket_dir, "verifier.sock"), secret, self._on_tally
        )
        self._closed = False
        self._preload = (*config.preload_modules, *preload)
        try:
            self._spawn_fork_server()
        except BackendUnavailable:
            self._verifier.close()
            raise
        self._watchdog: threading.Thread | None = None
        if self.confinement.mode == "rlimit":
            self._watchdog = threading.Thread(
                target=self._watch_rss, name="colocate-rss-watchdog", daemon=True
            )
            self._watchdog.start()

    def _spawn_fork_server(self) -> None:
        self._fork_sock, child = socket.socketpair()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH")) if p
        )
        self._fork_proc = subprocess.Popen(
            [sys.executable, "-c", _FORKSERVER_MAIN, str(child.fileno()), *self._preload],
            pass_fds=(child.fileno(),),
            stdin=subprocess.DEVNULL,
            env=env,
        )
        child.close()
        hello = recv_msg(self._fork_sock)
        if not hello or hello[0] != "ready":
            raise BackendUnavailable("executor fork server did not start; see the agent's stderr")

    def _ask_fork_server(self, request: tuple[Any, ...]) -> tuple[Any, ...]:
        """Send a request, restarting the fork server once if it died."""
        with self._fork_lock:
            for _attempt in range(2):
                if self._fork_proc.poll() is not None:
                    log.warning(
                        "executor fork server exited (%s); starting a new one",
                        self._fork_proc.returncode,
                    )
                    self._fork_sock.close()
                    self._spawn_fork_server()
                try:
                    send_msg(self._fork_sock, request)
                    answer = recv_msg(self._fork_sock)
                except OSError:
                    answer = None
                if answer is not None:
                    return tuple(answer)
                try:  # it closed the socket: it is exiting
                    self._fork_proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self._fork_proc.kill()
                    self._fork_proc.wait()
        return ("error", "fork server keeps exiting; see the agent's stderr")

    # -- start -------------------------------------------------------------------------------
    def start(
        self, lease_id: str, cpu_ids: Sequence[int], memory_bytes: int, expires_at: float
    ) -> ExecutorHandle:
        """Start the lease's executor: one confined, pinned worker per core. Milliseconds.

        Raises BadRequest for a bad or duplicate lease id, unknown cores or no memory, and
        BackendUnavailable when workers cannot be started.
        """
        check_name(lease_id, "lease id")
        cpus = tuple(int(c) for c in cpu_ids)
        usable = self._usable_cpus
        if not cpus or len(set(cpus)) != len(cpus) or not set(cpus) <= usable:
            raise BadRequest(
                f"lease {lease_id}: cores {list(cpus)} must be distinct cores of {sorted(usable)}"
            )
        if memory_bytes <= 0:
            raise BadRequest(f"lease {lease_id}: memory_bytes must be positive, got {memory_bytes}")
        with self._lock:
            if self._closed:
                raise BackendUnavailable("executor supervisor is closed")
            if lease_id in self._leases or lease_id in self._starting_ids:
                raise BadRequest(f"lease {lease_id} already has an executor on {self.node}")
            self._starting_ids.add(lease_id)
        uid: int | None = None
        try:
            uid = self._free_uid(lease_id)
            return self._start(lease_id, cpus, int(memory_bytes), float(expires_at), uid)
        finally:
            with self._lock:
                self._starting_uids.discard(uid)
                self._starting_ids.discard(lease_id)

    def _start(
        self,
        lease_id: str,
        cpus: tuple[int, ...],
        memory_bytes: int,
        expires_at: float,
        uid: int | None,
    ) -> ExecutorHandle:
        cgroups = self.confinement.create(lease_id, cpus, memory_bytes)
        lease_dir = os.path.join(self._socket_dir, lease_id)
        os.makedirs(lease_dir, exist_ok=True)
        os.chmod(lease_dir, 0o711)
        template = WorkerSpec(
            lease_id=lease_id,
            node=self.node,
            index=0,
            cpu=cpus[0],
            cpu_ids=cpus,
            memory_bytes=int(memory_bytes),
            cgroups=cgroups,
            run_as_user=self.config.run_as_user,
            hot_timeout_s=self.config.hot_timeout_s,
            max_payload_bytes=self.config.max_payload_bytes,
            verifier_path=self._verifier.path,
            tcp=(),
            unix=(),
            uid=uid,
            hello_timeout_s=self.hello_timeout_s,
        )
        try:
            answer = self._ask_fork_server(("spawn", template, self.host, lease_dir))
        except BackendUnavailable as exc:
            answer = ("error", str(exc))
        if answer[0] != "ok":
            remove_dirs(cgroups.dirs)
            shutil.rmtree(lease_dir, ignore_errors=True)
            why = answer[1]
            raise BackendUnavailable(f"lease {lease_id}: executor did not start: {why}")
        _, pids, tcp, unix = answer
        urls = tuple(_tcp_url(h, p) for h, p in tcp)
        handle = ExecutorHandle(
            lease_id=lease_id,
            address=urls[0],
            cpu_ids=cpus,
            memory_bytes=int(memory_bytes),
            pids=tuple(pids),
            unix_address=f"unix://{unix[0]}" if unix[0] else None,
            worker_addresses=urls,
            expires_at=float(expires_at),
            confinement=cgroups.mode,
        )
        lease = _Lease(handle, cgroups, lease_dir, uid=uid)
        for pid in pids:
            with contextlib.suppress(OSError):
                lease.pidfds[pid] = os.pidfd_open(pid)
        if cgroups.mode == "rlimit":
            lease.baseline_rss = _lease_rss(lease.handle.pids)
        self._write_state(lease)
        with self._lock:
            self._leases[lease_id] = lease
        log.info(
            "lease %s: executor on cores %s, %d bytes, pids %s",
            lease_id,
            list(cpus),
            memory_bytes,
            list(pids),
        )
        return handle

    def _free_uid(self, lease_id: str) -> int | None:
        if self._uids is None:
            return None
        with self._lock:
            used = {lease.uid for lease in self._leases.values()} | self._starting_uids
            for uid in self._uids:
                if uid not in used:
                    self._starting_uids.add(uid)  # until the lease is registered or fails
                    return uid
        raise BackendUnavailable(
            f"lease {lease_id}: all {len(self._uids)} uids of executor.lease_uid_range are in use"
        )

    def _state_file(self, lease_id: str) -> Path:
        return Path(self.state_dir) / f"{lease_id}.json"

    def _write_state(self, lease: _Lease) -> None:
        record = {
            "lease_id": lease.handle.lease_id,
            "node": self.node,
            "pids": {str(p): _create_time(p) for p in lease.handle.pids},
            "cgroups": list(lease.cgroups.dirs),
            "lease_dir": lease.lease_dir,
        }
        path = self._state_file(lease.handle.lease_id)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(path)

    # -- evict -------------------------------------------------------------------------------
    def evict(self, lease_id: str, grace_s: float = 0.0, reason: str = "evicted") -> float:
        """Take the lease's executor back; seconds until its processes are gone and memory freed.

        Workers get a notice at once (their clients' unanswered calls end with LeaseEvicted,
        or LeaseExpired when ``reason == "expired"``), may finish the running call within
        ``grace_s``, then are killed. With no grace they exit right after the notice; a worker
        that is not scheduled within ``config.eviction_notice_s`` is killed without one (its
        clients then see ExecutorLost). Unknown lease: 0.0.
        """
        t0 = time.monotonic()
        with self._lock:
            lease = self._leases.pop(lease_id, None)
        if lease is None:
            return 0.0
        # Without cgroups, processes the functions started are found through the workers.
        offspring = (
            set(_with_children(lease.handle.pids)) if lease.cgroups.mode == "rlimit" else set()
        )
        sig = eviction_signal(expired=reason == "expired", now=grace_s <= 0)
        for pidfd in lease.pidfds.values():
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, sig)
        alive = _wait_exit(lease.pidfds, max(grace_s, self.config.eviction_notice_s))
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(lease.pidfds[pid], signal.SIGKILL)
        if alive and _wait_exit({p: lease.pidfds[p] for p in alive}, 5.0):
            log.error("lease %s: workers %s survived SIGKILL", lease_id, alive)
        for fd in lease.pidfds.values():
            os.close(fd)
        for pid in offspring - set(lease.handle.pids):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        remove_dirs(lease.cgroups.dirs)
        shutil.rmtree(lease.lease_dir, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            self._state_file(lease_id).unlink()
        elapsed = time.monotonic() - t0
        log.info("lease %s %s: executor gone in %.1f ms", lease_id, reason, elapsed * 1e3)
        return elapsed

    def handles(self) -> list[ExecutorHandle]:
        """Executors running now (a worker that died on its own still counts until evicted)."""
        with self._lock:
            return [lease.handle for lease in self._leases.values()]

    def _on_tally(self, data: dict[str, Any]) -> None:
        with self._lock:
            if len(self._tallies) >= _MAX_TALLIES:  # nobody drains: keep the newest
                del self._tallies[: len(self._tallies) // 2]
            self._tallies.append(data)

    def drain_invocations(self) -> list[dict[str, Any]]:
        """Invocation counts the workers reported since the last call (each at most
        ``TALLY_INTERVAL_S`` late, and once more when a worker is evicted): dicts as
        ``colocate.metrics.events.InvocationTally.drain()`` makes them, plus ``lease_id``.
        Feed each to ``NodeEvents.add_invocations(*InvocationTally.from_json(d))``."""
        with self._lock:
            out, self._tallies = self._tallies, []
        return out

    def exited(self) -> dict[str, tuple[int, ...]]:
        """Leases with workers that ended on their own (crash, OOM kill): lease id -> pids.

        Their clients got ExecutorLost; the agent may evict the lease and free its cores.
        """
        with self._lock:
            leases = list(self._leases.values())
        out: dict[str, tuple[int, ...]] = {}
        for lease in leases:
            alive = _wait_exit(lease.pidfds, 0.0)
            gone = tuple(sorted(set(lease.pidfds) - set(alive)))
            if gone:
                out[lease.handle.lease_id] = gone
        return out

    # -- restart cleanup ---------------------------------------------------------------------
    def adopt_or_cleanup(self) -> list[str]:
        """Kill and remove executors a previous agent on this node left behind.

        Nothing is adopted: a previous agent's workers cannot reach this agent's token
        verifier, so they could not admit new connections. Looks at the pid files in ``state_dir`` (a pid is only killed if its start time
        matches, so a recycled pid is safe) and at ``colocate/<node>/*`` cgroups. Returns
        the lease ids cleaned.
        """
        with self._lock:
            mine = set(self._leases)
        cleaned: set[str] = set()
        for path in Path(self.state_dir).glob("*.json"):
            try:
                record = json.loads(path.read_text())
                lease_id = check_name(str(record["lease_id"]), "lease id")
            except (OSError, ValueError, KeyError, TypeError, BadRequest):
                log.warning("ignoring unreadable executor record %s", path)
                continue
            if lease_id in mine:
                continue
            for pid_text, created in dict(record.get("pids", {})).items():
                pid = int(pid_text)
                if created is not None and _create_time(pid) == created:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)
            remove_dirs(tuple(record.get("cgroups", ())))
            lease_dir = str(record.get("lease_dir", ""))
            if os.path.basename(lease_dir) == lease_id:  # never remove anything else
                shutil.rmtree(lease_dir, ignore_errors=True)
            path.unlink(missing_ok=True)
            cleaned.add(lease_id)
        for lease_id, dirs in self.confinement.lease_dirs().items():
            if lease_id not in mine:
                remove_dirs(tuple(dirs))
                cleaned.add(lease_id)
        if cleaned:
            log.warning("cleaned executors left by a previous agent: %s", sorted(cleaned))
        return sorted(cleaned)

    # -- watchdog ----------------------------------------------------------------------------
    def _watch_rss(self) -> None:
        """Without cgroups, RLIMIT_AS bounds each worker; this bounds the lease as a whole:
        the RSS its workers and their children added since start, every 0.1 s."""
        while not self._closed:
            time.sleep(WATCHDOG_INTERVAL_S)
            with self._lock:
                leases = list(self._leases.values())
            for lease in leases:
                added = _lease_rss(lease.handle.pids) - lease.baseline_rss
                if added > lease.handle.memory_bytes:
                    log.warning(
                        "lease %s: workers grew by %d bytes, over its %d; killing them",
                        lease.handle.lease_id,
                        added,
                        lease.handle.memory_bytes,
                    )
                    for pid in _with_children(lease.handle.pids):
                        with contextlib.suppress(ProcessLookupError, PermissionError):
                            os.kill(pid, signal.SIGKILL)

    def close(self) -> None:
        """Evict every executor, stop the fork server and the verifier."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            leases = list(self._leases)
        for lease_id in leases:
            self.evict(lease_id)
        self._fork_sock.close()
        try:
            self._fork_proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._fork_proc.kill()
            self._fork_proc.wait()
        self._verifier.close()
        if self._own_state_dir:
            shutil.rmtree(self._base_dir, ignore_errors=True)
        if self._socket_dir != self.state_dir:
            shutil.rmtree(self._socket_dir, ignore_errors=True)

    def __enter__(self) -> ExecutorSupervisor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _with_children(pids: Sequence[int]) -> list[int]:
    import psutil

    out: list[int] = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            out.extend([pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))])
    return out


def _lease_rss(pids: Sequence[int]) -> int:
    import psutil

    total = 0
    for pid in _with_children(pids):
        with contextlib.suppress(psutil.Error):
            total += int(psutil.Process(pid).memory_info().rss)
    return total


def _wait_exit(pidfds: dict[int, int], timeout_s: float) -> list[int]:
    """Wait until the processes exit or ``timeout_s`` passes (0: just look); the pids still
    alive. A pidfd is readable once its process has exited."""
    deadline = time.monotonic() + timeout_s
    alive = dict(pidfds)
    poller = select.poll()
    by_fd = {fd: pid for pid, fd in alive.items()}
    for fd in by_fd:
        poller.register(fd, select.POLLIN)
    while alive:
        left = max(0.0, deadline - time.monotonic())
        for fd, _ in poller.poll(left * 1000):
            alive.pop(by_fd[fd], None)
            poller.unregister(fd)
        if time.monotonic() >= deadline:
            break
    return sorted(alive)
