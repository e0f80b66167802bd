"""One worker process: pinned to one leased core, serving clients over the wire protocol.

A worker is forked by the fork server (worker 0 of a lease as pid 1 of a new pid namespace, the
others inside it), joins the lease's cgroups, pins itself, connects to the supervisor's token
verifier, enters the lease's sandbox (:func:`enter_sandbox`: its own mount, IPC and network
namespaces with private /tmp, /dev/shm and /proc), takes its limits (RLIMIT_NPROC, RLIMIT_FSIZE,
no core dumps), becomes the lease's owner (uid, gid and groups) or a pool uid, arms its
parent-death signal and its own deadline (lease expiry plus grace), and only then serves.
It is single-threaded: a poll loop over its listeners and connections. After each batch it
busy-polls for ``hot_timeout_s`` (a hot worker) before it blocks in ``poll`` (a warm one).

Never outliving the lease: the worker ends itself at its deadline (it first re-reads
``expires_at`` in the lease directory, which the supervisor rewrites on renewal), dies with the
fork server (PR_SET_PDEATHSIG), and when worker 0 (pid 1) exits the kernel kills everything
else in the lease's pid namespace.

Connections that have not presented a valid token get a small buffer, at most
``hello_timeout_s`` seconds, and at most ``max_pending`` of them at once (the oldest is dropped
for a new one), so a flood of idle connections neither locks the holder out nor grows the worker.

Robustness: a malformed frame gets a MALFORMED reply and, when the stream cannot be trusted
any more, the connection is closed; a vanished client only closes its connection. Nothing a
client sends ends the worker.

Eviction (signals in ``EVICTION_SIGNALS``): the worker sends a notice (evicted or expired) on
every connection, then either exits at once (no grace) or finishes the call it is running
(the supervisor kills it after the grace period); it runs nothing more. A plain SIGTERM is an
eviction with grace.

Invocation counts and durations (``InvocationTally``) go to the supervisor over the verifier
connection at most ``TALLY_INTERVAL_S`` after a call, and once more on eviction.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import pwd
import resource
import select
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from time import perf_counter
from types import FrameType
from typing import Any, NoReturn

from colocate import protocol as P
from colocate.executor.confinement import LeaseCgroups, join
from colocate.metrics.events import InvocationTally

_SNDTIMEO_S = 10  # a client that stops reading loses its connection, not the worker
_PENDING_BUF = 4096  # a connection without a token yet: enough for a HELLO, grown as needed
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_PDEATHSIG = 1
_CLONE_NEWNS = 0x00020000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWNET = 0x40000000
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 2, 4, 8
_MS_REC, _MS_PRIVATE = 0x4000, 1 << 18

_MAX_CONNECTIONS = 1024
_NOTICE_SEND_S = 0.05  # per connection, for the eviction notice
TALLY_INTERVAL_S = 1.0  # invocation counts reach the supervisor at most this late

IDLE, IO, RUNNING = 0, 1, 2

# signal -> (notice status, exit without finishing the running call)
EVICTION_SIGNALS: dict[int, tuple[int, bool]] = {
    signal.SIGTERM: (P.EVICTED, False),
    signal.SIGRTMIN: (P.EVICTED, False),
    signal.SIGRTMIN + 1: (P.EXPIRED, False),
    signal.SIGRTMIN + 2: (P.EVICTED, True),
    signal.SIGRTMIN + 3: (P.EXPIRED, True),
}


def eviction_signal(expired: bool, now: bool) -> int:
    """The signal that evicts a worker (``now``: without finishing its running call)."""
    return int(signal.SIGRTMIN) + int(expired) + 2 * int(now)


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """Everything a worker needs to know; built by the supervisor, passed through the fork server."""

    lease_id: str
    node: str
    index: int
    cpu: int
    cpu_ids: tuple[int, ...]
    memory_bytes: int
    cgroups: LeaseCgroups
    run_as_user: str
    hot_timeout_s: float
    max_payload_bytes: int
    verifier_path: str
    tcp: tuple[tuple[str, int], ...]  # every worker of the lease, by index
    unix: tuple[str, ...]
    uid: int | None = None  # the lease's own uid (lease_uid_range), else run_as_user's
    hello_timeout_s: float = 10.0  # a connection without a valid HELLO by then is closed
    # (uid, gid, groups, user name, home) to run as; None: run_as_user / uid as before
    identity: tuple[int, int, tuple[int, ...], str, str] | None = None
    sandbox: bool = False
    network: str = "none"  # "none": a network namespace of its own; "outbound": the host's
    leader_pid: int = 0  # host pid of worker 0, whose namespaces the other workers join
    tmp_bytes: int = 0  # size of the private /tmp and /dev/shm (0: the lease's memory)
    nproc: int = 0  # RLIMIT_NPROC (0: unchanged)
    fsize: int = 0  # RLIMIT_FSIZE in bytes (0: unchanged)
    deadline: float = 0.0  # epoch seconds: the worker ends itself then (0: never)
    expiry_grace_s: float = 0.0
    lease_dir: str = ""  # holds ``expires_at`` (renewals move the deadline)
    max_pending: int = 1024  # connections without a token yet
    net_cgroup: str = ""  # a unified-hierarchy group whose BPF programs keep it off this host


class _LoadError:
    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


class _Conn(P.FrameBuffer):
    """A client's connection: its socket, its receive buffer of frames, what it defined."""

    __slots__ = ("authed", "fns", "sock")

    def __init__(self, sock: socket.socket, size: int = P.RECV_BUFFER_BYTES) -> None:
        super().__init__(size)
        self.sock = sock
        self.authed = False
        self.fns: list[Any] = []


def _malformed(call_id: int, message: str) -> bytes:
    return P.frame(P.REPLY, 0, P.MALFORMED, call_id, message.encode())


def _prctl(option: int, arg: int) -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(option, arg, 0, 0, 0)


def drop_privileges(user: str, uid: int | None = None) -> None:
    """Become ``user`` (no supplementary groups, its gid, its uid or ``uid``) when running as
    root; no-op otherwise."""
    if os.getuid() != 0 and os.geteuid() != 0:
        return
    pw = pwd.getpwnam(user)
    os.setgroups([])
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid if uid is None else uid)
    if os.getuid() == 0 or os.geteuid() == 0:
        raise PermissionError(f"still root after dropping to {user!r}")
    home = pw.pw_dir if uid is None else "/"
    os.environ.update(HOME=home, USER=pw.pw_name, LOGNAME=pw.pw_name)


def become(identity: tuple[int, int, tuple[int, ...], str, str]) -> None:
    """Become ``identity`` (uid, gid, supplementary groups as initgroups gives them, name,
    home), the way slurmstepd starts a job step. Never uid 0."""
    uid, gid, groups, name, home = identity
    if uid == 0:
        raise PermissionError("functions never run as root")
    if os.getuid() != 0 and os.geteuid() != 0:
        return
    os.setgroups(list(groups))
    os.setgid(gid)
    os.setuid(uid)
    if os.getuid() == 0 or os.geteuid() == 0:
        raise PermissionError(f"still root after dropping to {name!r}")
    os.environ.update(HOME=home, USER=name, LOGNAME=name)
    _use_owner_site(home)


def _use_owner_site(home: str) -> None:
    """Functions import the owner's own packages (``pip install --user``), as in a job step:
    the owner's user site-packages goes before the installation's, the agent's (root's) goes."""
    import site

    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    owner_site = os.path.join(home, ".local", "lib", version, "site-packages")
    with contextlib.suppress(ValueError):
        sys.path.remove(site.getusersitepackages())
    if os.path.isdir(owner_site) and owner_site not in sys.path:
        first = next(
            (i for i, p in enumerate(sys.path) if p.endswith(("site-packages", "dist-packages"))),
            len(sys.path),
        )
        sys.path.insert(first, owner_site)


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(
    libc: ctypes.CDLL,
    source: str | None,
    target: str,
    fstype: str | None,
    flags: int,
    data: str | None,
) -> None:
    def enc(value: str | None) -> bytes | None:
        return value.encode() if value is not None else None

    _check(
        libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
        f"mount {target}",
    )


def enter_sandbox(spec: WorkerSpec) -> None:
    """Put this process (as root) into the lease's sandbox.

    Worker 0 (already pid 1 of the lease's pid namespace, made by the fork server) unshares
    mount, IPC and (``network == "none"``) network namespaces, and mounts fresh tmpfs on /tmp
    and /dev/shm (sized ``tmp_bytes``; their pages count against the lease's memory cgroup and
    vanish with the namespace) and the namespace's own /proc. The other workers join worker
    0's namespaces. The listening sockets were made before, in the host's network namespace:
    clients still reach them, the functions reach neither the host's loopback nor the network.
    """
    libc = _libc()
    if spec.leader_pid:
        kinds = ["ipc", "mnt"] + (["net"] if spec.network == "none" else [])
        fds = [os.open(f"/proc/{spec.leader_pid}/ns/{kind}", os.O_RDONLY) for kind in kinds]
        try:
            for kind, fd in zip(kinds, fds, strict=True):
                _check(libc.setns(fd, 0), f"setns {kind}")
        finally:
            for fd in fds:
                os.close(fd)
        return
    flags = _CLONE_NEWNS | _CLONE_NEWIPC | (_CLONE_NEWNET if spec.network == "none" else 0)
    _check(libc.unshare(flags), "unshare")
    _mount(libc, None, "/", None, _MS_REC | _MS_PRIVATE, None)
    size = spec.tmp_bytes or spec.memory_bytes
    for target, mode in (("/tmp", "1777"), ("/dev/shm", "1777")):
        if os.path.isdir(target):
            _mount(
                libc, "tmpfs", target, "tmpfs", _MS_NOSUID | _MS_NODEV, f"size={size},mode={mode}"
            )
    _mount(libc, "proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, None)


def _set_limits(spec: WorkerSpec) -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if spec.nproc:
        resource.setrlimit(resource.RLIMIT_NPROC, (spec.nproc, spec.nproc))
    if spec.fsize:
        resource.setrlimit(resource.RLIMIT_FSIZE, (spec.fsize, spec.fsize))


def read_expiry(dir_fd: int) -> float | None:
    """The lease's current expiry (epoch seconds) from ``expires_at`` in the lease directory."""
    try:
        fd = os.open("expires_at", os.O_RDONLY, dir_fd=dir_fd)
        try:
            return float(os.read(fd, 64).decode())
        finally:
            os.close(fd)
    except (OSError, ValueError):
        return None


def _verify_hello(verifier: socket.socket | None, token: bytes) -> dict[str, Any]:
    """Ask the supervisor whether ``token`` is valid; its answer as a dict."""
    if verifier is None:
        return {"status": "unauthorized", "message": "executor lost its token verifier"}
    try:
        P.send_message(verifier, b"V" + token)
        body = P.recv_message(verifier)
        if body is None:
            raise ConnectionError("the verifier closed the connection")
        answer: dict[str, Any] = json.loads(body)
        return answer
    except (OSError, ValueError):  # FrameError is an OSError
        return {"status": "unauthorized", "message": "executor cannot reach its token verifier"}


class Worker:
    """The serving loop. Built after privileges are dropped."""

    def __init__(
        self,
        spec: WorkerSpec,
        listeners: list[socket.socket],
        verifier: socket.socket | None,
    ) -> None:
        self.spec = spec
        self.listeners = {s.fileno(): s for s in listeners}
        self.verifier = verifier
        self.verifier_fd = -1
        self.reconnect_due = 0.0  # monotonic time to look for a restarted agent's verifier
        self.conns: dict[int, _Conn] = {}
        self.unauthed: dict[int, float] = {}  # fd -> monotonic deadline for its HELLO
        self.poller = select.poll()
        for fd in self.listeners:
            self.poller.register(fd, select.POLLIN)
        self.phase = IDLE
        self.evicting = 0  # status code of the notice once evicted or expired
        self.noticed = False
        self.limit = spec.max_payload_bytes
        self.tally = InvocationTally()
        self.tally_due = 0.0  # monotonic time of the next report when calls were counted
        self.sweep_ms = max(10, min(1000, int(spec.hello_timeout_s * 500)))
        self.lease_dir_fd = -1
        self.deadline = spec.deadline
        if verifier is not None:  # its end of file means the agent is gone (maybe restarting)
            self.verifier_fd = verifier.fileno()
            self.poller.register(self.verifier_fd, select.POLLIN)
        welcome = {
            "lease_id": spec.lease_id,
            "worker": spec.index,
            "pid": os.getpid(),
            "cpu": spec.cpu,
            "tcp": [list(a) for a in spec.tcp],
            "unix": list(spec.unix),
            "max_payload_bytes": spec.max_payload_bytes,
        }
        self.welcome = P.frame(P.REPLY, 0, P.OK, 0, json.dumps(welcome).encode())
        self.welcome_fields = welcome  # + "proof" when the client sent a HELLO nonce (issue 12)

    # -- eviction -------------------------------------------------------------------------
    def on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.evicting, now = EVICTION_SIGNALS.get(signum, (P.EVICTED, False))
        if self.phase != IO:  # no frame is half written: safe to write the notices now
            self._send_notices()
            if self.phase == IDLE or now:
                self._exit()
        # in the middle of I/O: the loop sends the notices and exits once the write is done

    def arm_deadline(self) -> None:
        """SIGALRM at the deadline (it also interrupts a function that runs past it)."""
        if self.deadline:
            signal.setitimer(signal.ITIMER_REAL, max(0.001, self.deadline - time.time()))

    def on_deadline(self, _signum: int, _frame: FrameType | None) -> None:
        expiry = read_expiry(self.lease_dir_fd) if self.lease_dir_fd >= 0 else None
        if expiry is not None and expiry + self.spec.expiry_grace_s > time.time() + 0.001:
            self.deadline = expiry + self.spec.expiry_grace_s  # renewed
            self.arm_deadline()
            return
        self.on_signal(eviction_signal(expired=True, now=True), None)

    def _verifier_lost(self) -> None:
        if self.verifier_fd >= 0:
            with contextlib.suppress(KeyError, ValueError):
                self.poller.unregister(self.verifier_fd)
            self.verifier_fd = -1
        if self.verifier is not None:
            self.verifier.close()
            self.verifier = None
        if self.lease_dir_fd >= 0:
            self.reconnect_due = time.monotonic() + 0.2

    def _reconnect_verifier(self) -> None:
        """A restarted agent that adopted this lease serves a verifier in the lease directory."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(f"/proc/self/fd/{self.lease_dir_fd}/verifier.sock")
        except OSError:
            sock.close()
            self.reconnect_due = time.monotonic() + 0.5
            return
        self.reconnect_due = 0.0
        self.verifier = sock
        self.verifier_fd = sock.fileno()
        self.poller.register(self.verifier_fd, select.POLLIN)

    def _report_tally(self) -> None:
        """Send the invocation counts since the last report to the supervisor (best effort)."""
        self.tally_due = 0.0
        data = self.tally.drain()
        if self.verifier is None or not data.get("count"):
            return
        data["lease_id"] = self.spec.lease_id
        body = b"T" + json.dumps(data).encode()
        try:
            P.send_message(self.verifier, body)
        except OSError:
            self._verifier_lost()  # the supervisor is gone: tokens cannot be checked either

    def _count(self, result: str, seconds: float) -> None:
        self.tally.record(result, seconds)
        if not self.tally_due:
            self.tally_due = time.monotonic() + TALLY_INTERVAL_S

    def _send_notices(self) -> None:
        if self.noticed:
            return
        self.noticed = True
        what = "expired" if self.evicting == P.EXPIRED else "evicted"
        note = P.frame(P.REPLY, 0, self.evicting, 0, f"lease {self.spec.lease_id} {what}".encode())
        for conn in list(self.conns.values()):
            # Whole frame or nothing, and never stuck behind a client that stopped reading.
            with contextlib.suppress(OSError):
                conn.sock.settimeout(_NOTICE_SEND_S)
                conn.sock.sendall(note)
            with contextlib.suppress(OSError):
                conn.sock.settimeout(None)

    def _exit(self) -> NoReturn:
        """Leave after an eviction: notices out, counts reported, streams closed in order
        (a FIN after the notice, before the kernel may reset connections with unread data)."""
        self._send_notices()
        run_exit_hooks()
        self._report_tally()
        for conn in list(self.conns.values()):
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_WR)
        if self.spec.sandbox and len(self.spec.cpu_ids) > 1 and os.getpid() == 1:
            _wait_siblings(0.1)
        os._exit(0)

    # -- loop ------------------------------------------------------------------------------
    def serve(self) -> NoReturn:
        poll = self.poller.poll
        monotonic = time.monotonic
        hot = self.spec.hot_timeout_s
        hot_until = 0.0
        while True:
            self.phase = IDLE
            if self.evicting:
                self._exit()
            events = poll(0)
            if not events:
                if monotonic() < hot_until:
                    continue
                events = poll(self._block_ms(monotonic()))
            self.phase = IO
            if self.tally_due and monotonic() >= self.tally_due:
                self._report_tally()
            if self.unauthed:
                self._sweep_unauthenticated(monotonic())
            if self.reconnect_due and monotonic() >= self.reconnect_due:
                self._reconnect_verifier()
            for fd, ev in events:
                conn = self.conns.get(fd)
                if conn is not None:
                    self._on_readable(conn, ev)
                elif fd in self.listeners:
                    self._accept(self.listeners[fd])
                elif fd == self.verifier_fd:
                    self._verifier_lost()
            if events:  # a timer wake-up (sweep, tally) does not make the worker hot again
                hot_until = monotonic() + hot

    def _block_ms(self, now: float) -> int | None:
        """How long poll may block: until the next sweep or tally report, else forever."""
        waits = []
        if self.unauthed:
            waits.append(self.sweep_ms)
        if self.tally_due:
            waits.append(max(0, int((self.tally_due - now) * 1000) + 1))
        if self.reconnect_due:
            waits.append(max(0, int((self.reconnect_due - now) * 1000) + 1))
        return min(waits) if waits else None

    def _accept(self, listener: socket.socket) -> None:
        try:
            sock, _ = listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError:  # EMFILE and the like: the client retries; the worker lives on
            return
        sock.setblocking(True)
        with contextlib.suppress(OSError):
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", _SNDTIMEO_S, 0)
            )
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            P.keepalive(sock)
        if len(self.conns) >= _MAX_CONNECTIONS:
            sock.close()
            return
        if len(self.unauthed) >= self.spec.max_pending:  # the oldest one without a token goes
            oldest = min(self.unauthed, key=self.unauthed.__getitem__)
            if oldest in self.conns:
                self._close(self.conns[oldest])
            else:
                self.unauthed.pop(oldest, None)
        if self.verifier is None and self.reconnect_due:  # a new client: look for one now
            self._reconnect_verifier()
        conn = _Conn(sock, _PENDING_BUF)
        self.conns[sock.fileno()] = conn
        self.unauthed[sock.fileno()] = time.monotonic() + self.spec.hello_timeout_s
        self.poller.register(sock.fileno(), select.POLLIN)
        if self.evicting:
            with contextlib.suppress(OSError):
                sock.send(
                    P.frame(P.REPLY, 0, self.evicting, 0, b"lease taken back"), socket.MSG_DONTWAIT
                )

    def _close(self, conn: _Conn) -> None:
        fd = conn.sock.fileno()
        if self.conns.pop(fd, None) is not None:
            self.poller.unregister(fd)
        self.unauthed.pop(fd, None)
        conn.sock.close()

    def _sweep_unauthenticated(self, now: float) -> None:
        """Close connections that did not present a valid token in time (they hold fds)."""
        for fd, deadline in list(self.unauthed.items()):
            if now > deadline and fd in self.conns:
                self._close(self.conns[fd])

    def _send(self, conn: _Conn, data: bytes) -> bool:
        try:
            conn.sock.sendall(data)
            return True
        except OSError:  # vanished or stuck client
            self._close(conn)
            return False

    def _on_readable(self, conn: _Conn, ev: int) -> None:
        try:
            n = conn.fill(conn.sock)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            n = 0
        if n == 0:
            self._close(conn)
            return
        out: list[bytes] = []
        keep = self._parse(conn, out)
        if out and not self._send(conn, b"".join(out)):
            return
        if not keep:
            self._close(conn)

    def _parse(self, conn: _Conn, out: list[bytes]) -> bool:
        """Handle every complete frame in the buffer; False when the connection must close."""
        limit = self.limit
        while (head := conn.header()) is not None:
            length, kind, flags, code, call_id = head
            if kind == P.CALL or kind == P.DEFINE:
                if not conn.authed:
                    out.append(
                        P.frame(
                            P.REPLY,
                            0,
                            P.UNAUTHORIZED,
                            call_id,
                            b"send HELLO with a lease token first",
                        )
                    )
                    return False
                if length > limit:  # answer now, discard the body as it arrives
                    out.append(
                        P.frame(
                            P.REPLY, 0, P.TOO_LARGE, call_id, P.TOO_LARGE_BODY.pack(length, limit)
                        )
                    )
                    conn.drop(length)
                    continue
            elif kind == P.HELLO:
                if length > P.MAX_HELLO_BYTES:
                    out.append(_malformed(0, f"HELLO of {length} bytes is too large"))
                    return False
            else:
                out.append(_malformed(call_id, f"unknown frame kind {kind}"))
                return False
            body = conn.body(length)
            if body is None:
                break
            if kind == P.CALL:
                out.append(self._call(conn, flags, code, call_id, body))
                if self.evicting:  # run nothing more; the notice covers the rest
                    break
            elif kind == P.DEFINE:
                self._define(conn, flags, code, body)
            elif not self._hello(conn, code, body, out):
                return False
        return True

    def _hello(self, conn: _Conn, version: int, body: memoryview, out: list[bytes]) -> bool:
        if version != P.VERSION:
            out.append(
                _malformed(0, f"protocol version {version} not supported (want {P.VERSION})")
            )
            return False
        answer = _verify_hello(self.verifier, bytes(body))
        status = answer.get("status")
        spec = self.spec
        if status == "ok":
            if answer.get("lease_id") != spec.lease_id or answer.get("node") != spec.node:
                status, answer["message"] = (
                    "unauthorized",
                    f"token is for another lease than {spec.lease_id}",
                )
            elif sorted(answer.get("cpu_ids", ())) != sorted(spec.cpu_ids):
                status, answer["message"] = "unauthorized", "token cores do not match this executor"
        if status == "ok":
            conn.authed = True
            self.unauthed.pop(conn.sock.fileno(), None)
            if len(conn.buf) < P.RECV_BUFFER_BYTES:  # a holder's: the full buffer from now on
                conn.make_room(P.RECV_BUFFER_BYTES)
            proof = answer.get("proof")  # the verifier's answer to the client's nonce
            out.append(
                self.welcome
                if proof is None
                else P.frame(
                    P.REPLY,
                    0,
                    P.OK,
                    0,
                    json.dumps({**self.welcome_fields, "proof": proof}).encode(),
                )
            )
            return True
        code = P.EXPIRED if status == "expired" else P.UNAUTHORIZED
        out.append(P.frame(P.REPLY, 0, code, 0, str(answer.get("message", status)).encode()))
        return False

    def _define(self, conn: _Conn, flags: int, index: int, body: memoryview) -> None:
        fn: Any
        try:
            if flags == P.REFERENCE:
                import importlib

                module, _, name = bytes(body).decode().partition(":")
                fn = importlib.import_module(module)
                for part in name.split("."):
                    fn = getattr(fn, part)
            else:
                import cloudpickle

                fn = cloudpickle.loads(body)
            if not callable(fn):
                raise TypeError(f"{fn!r} is not callable")
        except BaseException as exc:
            fn = _LoadError(f"function {index} cannot be loaded on the executor: {exc!r}")
        fns = conn.fns
        while len(fns) <= index:
            fns.append(None)
        fns[index] = fn

    def _call(self, conn: _Conn, flags: int, index: int, call_id: int, body: memoryview) -> bytes:
        if self.evicting:
            self._count("evicted", 0.0)
            return P.frame(P.REPLY, 0, self.evicting, call_id, b"lease taken back")
        fns = conn.fns
        fn = fns[index] if index < len(fns) else None
        if fn is None or type(fn) is _LoadError:
            msg = fn.message if fn is not None else f"function index {index} was never defined"
            self._count("rejected", 0.0)
            return _malformed(call_id, msg)
        if flags == P.RAW:
            args: tuple[Any, ...] = (bytes(body),)
            kwargs: dict[str, Any] = {}
        else:
            try:
                args, kwargs = P.decode_args(flags, body)
            except ValueError as exc:
                self._count("rejected", 0.0)
                return _malformed(call_id, str(exc))
        self.phase = RUNNING
        t0 = perf_counter()
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            self.phase = IO
            self._count("error", perf_counter() - t0)
            return P.frame(P.REPLY, 0, P.RAISED, call_id, P.encode_failure(exc))
        self.phase = IO
        self._count("ok", perf_counter() - t0)
        if type(result) is bytes:
            rflags, data = P.RAW, result
        else:
            try:
                rflags, data = P.encode_result(result)
            except Exception as exc:
                return P.frame(P.REPLY, 0, P.RAISED, call_id, P.encode_failure(exc))
        if len(data) > self.limit:
            return P.frame(
                P.REPLY, 0, P.TOO_LARGE, call_id, P.TOO_LARGE_BODY.pack(len(data), self.limit)
            )
        return P.frame(P.REPLY, rflags, P.OK, call_id, data)


_current: Worker | None = None  # the worker serving in this process (FMI ranks ask it)

# Run by Worker._exit after the eviction notices, before the worker leaves (within the grace
# the supervisor gives): colocate.process swaps its processes' state out here.
exit_hooks: list[Callable[[], None]] = []


def run_exit_hooks() -> None:
    """Each exit hook once, in order; a failing hook never stops the worker from leaving."""
    hooks, exit_hooks[:] = list(exit_hooks), []
    for hook in hooks:
        with contextlib.suppress(BaseException):
            hook()


def current() -> Worker | None:
    """The serving worker of this process, None outside a worker. Functions use it through
    ``colocate.fmi``: its ``verifier`` connection, its ``spec``, its ``evicting`` status."""
    return _current


def _wait_siblings(timeout_s: float) -> None:
    """Worker 0 is pid 1 of the lease: its exit kills the other workers at once. Let them send
    their own eviction notices first (at most ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        try:
            others = [n for n in os.listdir("/proc") if n.isdigit() and n != "1"]
        except OSError:
            return
        if not others:
            return
        time.sleep(0.002)


def _close_other_fds(keep: set[int]) -> None:
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def run(spec: WorkerSpec, listeners: list[socket.socket], ready_fd: int) -> NoReturn:
    """Body of a freshly forked worker: confine, pin, drop privileges, report ready, serve."""
    verifier: socket.socket | None = None
    try:
        for sig in (signal.SIGCHLD, signal.SIGHUP, *EVICTION_SIGNALS):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # a write past RLIMIT_FSIZE fails with EFBIG in the function, not the worker's death
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        _close_other_fds({ready_fd, *(s.fileno() for s in listeners)})
        os.setsid()
        join(spec.cgroups, os.getpid())
        if spec.net_cgroup:  # network = "outbound": the host's network, not the host
            with open(os.path.join(spec.net_cgroup, "cgroup.procs"), "w") as procs:
                procs.write(str(os.getpid()))
        os.sched_setaffinity(0, {spec.cpu})
        if spec.cgroups.mode == "rlimit":
            with open("/proc/self/statm") as statm:
                vsize = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            resource.setrlimit(resource.RLIMIT_AS, (vsize + spec.memory_bytes,) * 2)
        verifier = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        verifier.connect(spec.verifier_path)  # as root: the verifier socket is root-only
        lease_dir_fd = (
            os.open(spec.lease_dir, os.O_RDONLY | os.O_DIRECTORY) if spec.lease_dir else -1
        )
        if spec.sandbox:
            enter_sandbox(spec)
        _set_limits(spec)
        if spec.identity is not None:
            become(spec.identity)
        else:
            drop_privileges(spec.run_as_user, spec.uid)
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # after the uid change, which clears it
        _prctl(_PR_SET_NO_NEW_PRIVS, 1)
        os.chdir("/tmp" if spec.sandbox else "/")
        worker = Worker(spec, listeners, verifier)
        worker.lease_dir_fd = lease_dir_fd
        global _current
        _current = worker
        for sig in EVICTION_SIGNALS:
            signal.signal(sig, worker.on_signal)
        signal.signal(signal.SIGALRM, worker.on_deadline)
        worker.arm_deadline()
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.write(ready_fd, f"worker {spec.index} setup failed: {exc!r}".encode())
        os._exit(1)
    os.write(ready_fd, b"ok")
    os.close(ready_fd)
    try:
        worker.serve()
    except BaseException as exc:  # a bug in the loop: say so where the agent logs go
        with contextlib.suppress(Exception):
            print(f"colocate worker {spec.lease_id}/{spec.index} failed: {exc!r}", file=sys.stderr)
        os._exit(70)
