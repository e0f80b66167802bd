"""The executor supervisor: starts, evicts and cleans up one executor per lease on this node.

Used by the node agent. It owns a fork server (pre-imported, forks workers in milliseconds), a
token verifier (workers ask it whether a client's lease token is good; the cluster secret never
enters a process that runs user code), the lease cgroups, and an RSS watchdog where cgroups
are not available.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from colocate.config import ExecutorConfig
from colocate.errors import BackendUnavailable, BadRequest, ConfigError
from colocate.executor.confinement import Confinement, LeaseCgroups, check_name, remove_dirs
from colocate.executor.forkserver import recv_msg, send_msg, short_path
from colocate.executor.verifier import TokenVerifier
from colocate.executor.worker import WorkerSpec, eviction_signal
from colocate.lease_value import LeaseValue
from colocate.owner import Owner

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
    uid: int | None = None  # the workers' uid (None: not root, so they run as the agent)
    sandboxed: bool = False
    adopted: bool = False  # started by a previous agent on this node and adopted at its restart


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
        hello_timeout_s: float | None = None,
    ) -> None:
        self.config = config
        self.node = check_name(node, "node")
        self.host = host
        self.hello_timeout_s = (
            config.hello_timeout_s if hello_timeout_s is None else hello_timeout_s
        )
        self.root = os.geteuid() == 0
        self.sandbox = config.sandbox and self.root
        if config.sandbox and not self.root:
            log.warning("executors are not sandboxed: the agent does not run as root")
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
        if config.run_as == "pool" and self._uids is None:
            raise ConfigError(
                'run_as = "pool" needs executor.lease_uid_range = [first, last]',
                key="executor.run_as",
            )
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
        self._net_cgroup = ""
        if self.sandbox and config.network == "outbound":
            self._net_cgroup = self._guard_host(cgroup_root or "/sys/fs/cgroup")
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
        self._adopted_forkservers: list[socket.socket] = []
        self._detached = False
        self._lease_verifiers: dict[str, TokenVerifier] = {}
        self._secret = secret
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

    def _guard_host(self, cgroup_root: str) -> str:
        """Keep workers that share the host's network off the host itself (see
        :mod:`colocate.executor.netguard`); the group they join ("" on v2: the lease groups
        are already below it)."""
        from colocate.executor import netguard

        unified = netguard.unified_root(cgroup_root)
        if unified is None:
            raise ConfigError(
                f'"outbound" needs the unified cgroup hierarchy (none under {cgroup_root}); '
                'use "none"',
                key="executor.network",
            )
        group = os.path.join(unified, "colocate", self.node)
        try:
            os.makedirs(group, exist_ok=True)
            netguard.guard(group)
        except OSError as exc:
            raise ConfigError(
                f'"outbound" needs cgroup BPF to keep functions off this host ({exc}); use "none"',
                key="executor.network",
            ) from None
        log.info("network outbound: functions reach the network but not this host (%s)", group)
        return "" if self.confinement.mode == "v2" else group

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
        try:
            hello = recv_msg(self._fork_sock)
        except OSError:  # cut short or garbled: it died while starting
            hello = None
        if not hello or hello[0] != "ready":
            raise BackendUnavailable("executor fork server did not start; see the agent's stderr")
        path = os.path.join(self.state_dir, f"forkserver-{hello[1]}.sock")
        send_msg(self._fork_sock, ("adoption", path, self.config.adopt_window_s))

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
    def start(self, lease: LeaseValue) -> ExecutorHandle:
        """Start the executor of ``lease`` (the agent's one internal lease value): one
        confined, pinned, sandboxed worker per core of ``lease.cpu_ids``. Milliseconds.

        Workers run as ``lease.owner`` (uid, gid and the groups initgroups gives) with
        ``run_as = "owner"``; as a uid of ``lease_uid_range`` of their own with ``"pool"``, for a
        lease without an owner, or for one owned by root; else as ``run_as_user``.

        Raises BadRequest for a bad or duplicate lease id, unknown cores or no memory, and
        BackendUnavailable when workers cannot be started.
        """
        lease_id, memory_bytes, expires_at, owner = (
            lease.lease_id,
            lease.memory_bytes,
            lease.expires_at,
            lease.owner,
        )
        check_name(lease_id, "lease id")
        cpus = tuple(int(c) for c in lease.cpu_ids)
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
            identity = self._owner_identity(owner)
            if identity is None:
                uid = self._free_uid(lease_id)
            return self._start(lease_id, cpus, int(memory_bytes), float(expires_at), uid, identity)
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
        identity: tuple[int, int, tuple[int, ...], str, str] | None = None,
    ) -> ExecutorHandle:
        cfg = self.config
        cgroups = self.confinement.create(lease_id, cpus, memory_bytes, cfg.pids_max)
        lease_dir = os.path.join(self._socket_dir, lease_id)
        os.makedirs(lease_dir, exist_ok=True)
        os.chmod(lease_dir, 0o711)
        _write_expiry(lease_dir, expires_at)
        # RLIMIT_NPROC counts every process of the uid on the node: exact for a pool uid (only
        # this lease's); for an owner, whose batch job may run thousands of threads, the pids
        # cgroup is the bound, and the rlimit only a backstop where there is no cgroup.
        dedicated = identity is None and uid is not None
        if dedicated:
            nproc = cfg.pids_max
        elif cgroups.pids_max and cgroups.mode != "rlimit":
            nproc = 0
        else:
            nproc = cfg.pids_max * 16
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
            identity=identity,
            sandbox=self.sandbox,
            network=cfg.network,
            tmp_bytes=cfg.tmp_max_bytes or 0,
            nproc=nproc if self.root else 0,
            fsize=cfg.fsize_max_bytes,
            deadline=float(expires_at) + cfg.expiry_grace_s,
            expiry_grace_s=cfg.expiry_grace_s,
            lease_dir=lease_dir,
            max_pending=cfg.max_pending_connections,
            net_cgroup=self._net_cgroup,
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
            uid=(identity[0] if identity else uid if uid is not None else self._run_as_uid()),
            sandboxed=self.sandbox,
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

    def _run_as_uid(self) -> int | None:
        if not self.root:
            return None
        return pwd.getpwnam(self.config.run_as_user).pw_uid

    def _owner_identity(
        self, owner: Owner | None
    ) -> tuple[int, int, tuple[int, ...], str, str] | None:
        """(uid, gid, groups, name, home) for ``owner`` in owner mode; None: pool or fallback
        (no owner, or root's own lease: functions never run as root)."""
        if owner is None or owner.uid == 0 or self.config.run_as != "owner":
            return None
        try:
            pw = pwd.getpwuid(owner.uid)
            name, home = pw.pw_name, pw.pw_dir
            groups = tuple(os.getgrouplist(name, owner.gid))
        except KeyError:  # a uid only the cluster's directory knows: its own group only
            name, home, groups = owner.user or str(owner.uid), "/", (owner.gid,)
        if 0 in groups or owner.gid == 0:
            groups = tuple(g for g in groups if g != 0)  # root's group gives root's files
        gid = owner.gid if owner.gid != 0 else (groups[0] if groups else 65534)
        return owner.uid, gid, groups, name, home

    def renew(self, lease_id: str, expires_at: float) -> None:
        """The lease now ends at ``expires_at``: workers move their own deadline at theirs."""
        with self._lock:
            lease = self._leases.get(lease_id)
            if lease is None:
                return
            lease.handle = dataclasses.replace(lease.handle, expires_at=float(expires_at))
            verifiers = [self._verifier, self._lease_verifiers.get(lease_id)]
        for verifier in verifiers:  # tokens of the old expiry are refused from now on
            if verifier is not None:
                verifier.renewed(lease_id, float(expires_at))
        _write_expiry(lease.lease_dir, expires_at)
        self._write_state(lease)

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
        h = lease.handle
        record = {
            "lease_id": h.lease_id,
            "node": self.node,
            "pids": {str(p): _create_time(p) for p in h.pids},
            "cgroups": list(lease.cgroups.dirs),
            "cgroup_mode": lease.cgroups.mode,
            "lease_dir": lease.lease_dir,
            "address": h.address,
            "unix_address": h.unix_address,
            "worker_addresses": list(h.worker_addresses),
            "cpu_ids": list(h.cpu_ids),
            "memory_bytes": h.memory_bytes,
            "expires_at": h.expires_at,
            "uid": h.uid,
            "pool_uid": lease.uid,
            "sandboxed": h.sandboxed,
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
        verifier = self._lease_verifiers.pop(lease_id, None)
        if verifier is not None:
            verifier.close()
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
    def adopt_or_cleanup(self, keep: Callable[[ExecutorHandle], bool] | None = None) -> list[str]:
        """Adopt the executors a previous agent on this node left running, clean up the rest.

        A previous agent's fork server waits ``adopt_window_s`` for its successor; this
        supervisor connects to it and adopts every lease whose workers still run (pid and start
        time match its record), whose lease has not expired, and that ``keep`` accepts (the
        agent refuses leases on cores a job holds now). Adopted executors appear in
        :meth:`handles` with ``adopted=True``; their clients see no error, and their workers
        reconnect to a token verifier of this supervisor for new connections. Everything else
        (records, pids, ``colocate/<node>/*`` cgroups) is killed and removed. Returns the lease
        ids cleaned.
        """
        self._reach_previous_forkservers()
        with self._lock:
            mine = set(self._leases)
        cleaned: set[str] = set()
        now = time.time()
        for path in Path(self.state_dir).glob("*.json"):
            try:
                record = json.loads(path.read_text())
                lease_id = check_name(str(record["lease_id"]), "lease id")
            except (OSError, ValueError, KeyError, TypeError, BadRequest):
                log.warning("ignoring unreadable executor record %s", path)
                continue
            if lease_id in mine:
                continue
            if self._adopt(lease_id, record, now, keep):
                mine.add(lease_id)
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

    def _reach_previous_forkservers(self) -> None:
        """Connect to fork servers of previous agents that wait for adoption (their workers
        die with them, so this supervisor keeps them alive until it closes)."""
        own = os.path.join(self.state_dir, f"forkserver-{self._fork_proc.pid}.sock")
        dir_fd = os.open(self.state_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            self._reach_forkservers_in(dir_fd, own)
        finally:
            os.close(dir_fd)

    def _reach_forkservers_in(self, dir_fd: int, own: str) -> None:
        for path in Path(self.state_dir).glob("forkserver-*.sock"):
            if str(path) == own:
                continue
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(2.0)
            try:
                sock.connect(short_path(dir_fd, path.name))  # deep state dirs too
                hello = recv_msg(sock)
            except OSError:
                hello = None
            if not hello or hello[0] != "ready":
                sock.close()
                path.unlink(missing_ok=True)
                continue
            sock.settimeout(None)
            log.info("adopted the fork server %s of a previous agent", hello[1])
            self._adopted_forkservers.append(sock)

    def _adopt(
        self,
        lease_id: str,
        record: dict[str, Any],
        now: float,
        keep: Callable[[ExecutorHandle], bool] | None,
    ) -> bool:
        try:
            pids = {int(p): c for p, c in dict(record["pids"]).items()}
            expires_at = float(record["expires_at"])
            cpus = tuple(int(c) for c in record["cpu_ids"])
            handle = ExecutorHandle(
                lease_id=lease_id,
                address=str(record["address"]),
                cpu_ids=cpus,
                memory_bytes=int(record["memory_bytes"]),
                pids=tuple(sorted(pids)),
                unix_address=record.get("unix_address"),
                worker_addresses=tuple(record.get("worker_addresses", ())),
                expires_at=expires_at,
                confinement=str(record.get("cgroup_mode", self.confinement.mode)),
                uid=record.get("uid"),
                sandboxed=bool(record.get("sandboxed")),
                adopted=True,
            )
        except (KeyError, TypeError, ValueError):
            return False  # a record of an older agent: cleaned up
        if not self._adopted_forkservers or expires_at <= now or not set(cpus) <= self._usable_cpus:
            return False
        if any(c is None or _create_time(p) != c for p, c in pids.items()):
            return False
        if keep is not None and not keep(handle):
            return False
        dirs = tuple(str(d) for d in record.get("cgroups", ()))
        mode = handle.confinement if handle.confinement in ("v1", "v2", "rlimit") else "rlimit"
        cgroups = LeaseCgroups(mode, dirs, handle.memory_bytes)  # type: ignore[arg-type]
        lease = _Lease(handle, cgroups, str(record["lease_dir"]), uid=record.get("pool_uid"))
        for pid in pids:
            with contextlib.suppress(OSError):
                lease.pidfds[pid] = os.pidfd_open(pid)
        path = os.path.join(lease.lease_dir, "verifier.sock")
        if len(path) < 100 and os.path.isdir(lease.lease_dir):
            try:
                verifier = TokenVerifier(path, self._secret, self._on_tally)
                if handle.uid is not None:
                    os.chown(path, handle.uid, -1)
                self._lease_verifiers[lease_id] = verifier
            except OSError as exc:
                log.warning("lease %s: adopted without a token verifier: %s", lease_id, exc)
        else:  # its connected clients keep working; new ones are refused
            log.warning("lease %s: adopted without a token verifier (path %s)", lease_id, path)
        with self._lock:
            self._leases[lease_id] = lease
        log.warning(
            "lease %s: adopted the executor a previous agent started (cores %s, pids %s)",
            lease_id,
            list(cpus),
            list(pids),
        )
        return True

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

    @property
    def detached(self) -> bool:
        """True after :meth:`detach`: the executors are left to the next agent."""
        return self._detached

    def detach(self) -> None:
        """Leave the executors running for the next agent on this node (an upgrade, a restart):
        :meth:`close` then neither evicts them nor removes their files; their fork servers wait
        ``adopt_window_s`` for the successor, which adopts them."""
        self._detached = True

    def close(self) -> None:
        """Evict every executor, stop the fork server and the verifier (after :meth:`detach`:
        leave the executors to the next agent instead)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            leases = list(self._leases)
        if self._detached:
            self._fork_sock.close()  # it waits for the successor: its workers live on
            for sock in self._adopted_forkservers:
                sock.close()
            for verifier in (self._verifier, *self._lease_verifiers.values()):
                verifier.close()
            for fd in (fd for lease in self._leases.values() for fd in lease.pidfds.values()):
                os.close(fd)
            log.warning("left %d executor(s) to the next agent: %s", len(leases), sorted(leases))
            return
        for lease_id in leases:
            self.evict(lease_id)
        self._fork_sock.close()
        for sock in self._adopted_forkservers:  # no workers left: they exit
            sock.close()
        try:
            self._fork_proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._fork_proc.kill()
            self._fork_proc.wait()
        self._verifier.close()
        if self._net_cgroup:  # empty now; a restarted agent makes it again
            with contextlib.suppress(OSError):
                os.rmdir(self._net_cgroup)
        if self._own_state_dir:
            shutil.rmtree(self._base_dir, ignore_errors=True)
        if self._socket_dir != self.state_dir:
            shutil.rmtree(self._socket_dir, ignore_errors=True)

    def __enter__(self) -> ExecutorSupervisor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _write_expiry(lease_dir: str, expires_at: float) -> None:
    tmp = os.path.join(lease_dir, ".expires_at")
    with open(tmp, "w") as fh:
        fh.write(repr(float(expires_at)))
    os.chmod(tmp, 0o644)
    os.replace(tmp, os.path.join(lease_dir, "expires_at"))


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
