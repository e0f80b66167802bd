"""The fork server: a pre-imported Python process that forks workers on demand.

Started once per supervisor (``main([FD, *preload])`` in a fresh interpreter), it imports what a
worker needs (cloudpickle, the protocol, the worker loop) so that a lease's cold start costs a
``fork`` and a few cgroup writes, not a fresh interpreter. It holds no secret (workers inherit
its memory and run user code) and it never runs user code itself.

Control messages on the socket ``FD`` from the supervisor are pickles in ``protocol.message``
frames (a local socketpair between two root processes of the same agent):

- ``("spawn", WorkerSpec template, host, lease_dir)`` -> ``("ok", pids, tcp, unix)`` or
  ``("error", message)``; workers are listening and confined when the answer comes.
- ``("adoption", path, window_s)``: where and how long to wait for a restarted agent; no answer.
- end of file: the supervisor is gone. With live workers, the fork server listens on ``path``
  (root only) for ``window_s`` seconds: a restarted agent's supervisor that connects gets
  ``("ready", pid, "adopted")`` and becomes its supervisor (it adopts the workers). Otherwise,
  or without workers, the fork server exits, and its workers die with it (PR_SET_PDEATHSIG).

Sandboxed leases: worker 0 is forked into a new pid namespace (the fork server unshares
CLONE_NEWPID for its next child, then returns to its own with setns), the lease's other workers
into that one; they stay the fork server's children, so their parent-death signal works.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import importlib
import os
import pickle
import select
import signal
import socket
import sys
import time
from typing import Any

from colocate import protocol  # also pre-imported for workers
from colocate.executor import worker

READY_TIMEOUT_S = 10.0
# Standard modules user functions often import. Workers run as an unprivileged user who may
# not be allowed to read the Python installation; what is imported here they already have.
STDLIB_PRELOAD = (
    "base64",
    "bisect",
    "collections",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "enum",
    "fractions",
    "functools",
    "gzip",
    "hashlib",
    "heapq",
    "io",
    "itertools",
    "json",
    "math",
    "operator",
    "pathlib",
    "pickle",
    "random",
    "re",
    "statistics",
    "string",
    "struct",
    "textwrap",
    "time",
    "traceback",
    "typing",
    "uuid",
    "zlib",
)


def send_msg(sock: socket.socket, obj: Any) -> None:
    """One control message: a pickle in a ``protocol.message``."""
    protocol.send_message(sock, pickle.dumps(obj, protocol=5))


def recv_msg(sock: socket.socket) -> Any:
    """The next control message, or None at end of file. ``protocol.FrameError`` (an
    ``OSError``) when the stream ends inside one or it is over ``protocol.MAX_MESSAGE_BYTES``."""
    data = protocol.recv_message(sock, protocol.MAX_MESSAGE_BYTES)
    return None if data is None else pickle.loads(data)


_CLONE_NEWPID = 0x20000000
_libc = ctypes.CDLL(None, use_errno=True)
_own_pidns = -1  # this process's pid namespace, to come back to after forking into another


def _pidns_for_next_child(leader: int) -> None:
    """The next fork lands in a new pid namespace (``leader`` 0) or in ``leader``'s."""
    global _own_pidns
    if _own_pidns < 0:
        _own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY)
    if leader == 0:
        result = _libc.unshare(_CLONE_NEWPID)
    else:
        fd = os.open(f"/proc/{leader}/ns/pid", os.O_RDONLY)
        try:
            result = _libc.setns(fd, _CLONE_NEWPID)
        finally:
            os.close(fd)
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"pid namespace: {os.strerror(err)}")


def _own_pidns_for_next_child() -> None:
    if _own_pidns >= 0 and _libc.setns(_own_pidns, _CLONE_NEWPID) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"back to the fork server's pid namespace: {os.strerror(err)}")


def _has_children() -> bool:
    try:
        while True:
            pid, _ = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                return True
    except ChildProcessError:
        return False


# cgroup directories of each lease this fork server started -> (its workers still running, its
# lease directory, its expiry grace); while no agent runs, the fork server removes a lease's
# cgroups once its workers are gone, and kills it at its expiry plus grace (a function that
# took SIGALRM for itself does not keep its lease alive).
_leases: dict[tuple[str, ...], tuple[set[int], str, float]] = {}
_exited: set[int] = set()


def _reap(_signum: int, _frame: Any) -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _exited.add(pid)


def _clean_ended_leases(kill_all: bool = False) -> None:
    """Without an agent: remove the cgroups of leases whose workers all ended (their own
    deadline); with ``kill_all``, kill and remove every lease's first."""
    from colocate.executor.cgroupkill import remove_dirs

    now = time.time()
    for dirs, (pids, lease_dir, grace) in list(_leases.items()):
        pids -= _exited
        if kill_all or not pids or _expiry(lease_dir) + grace < now:
            remove_dirs(dirs, timeout_s=1.0)
            del _leases[dirs]


def _expiry(lease_dir: str) -> float:
    try:
        with open(os.path.join(lease_dir, "expires_at")) as fh:
            return float(fh.read())
    except (OSError, ValueError):
        return float("inf")  # no record: the worker's own deadline and the next agent decide


def _listeners(
    host: str, lease_dir: str, count: int
) -> tuple[list[socket.socket], list[socket.socket | None]]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    tcp: list[socket.socket] = []
    unix: list[socket.socket | None] = []
    for i in range(count):
        t = socket.socket(family, socket.SOCK_STREAM)
        t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        t.bind((host, 0))
        t.listen(128)
        t.setblocking(False)
        tcp.append(t)
        path = os.path.join(lease_dir, f"w{i}.sock")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        u = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            u.bind(path)
        except OSError as exc:  # e.g. a path over the 107-byte limit: TCP only, then
            print(f"colocate fork server: no Unix socket at {path}: {exc}", file=sys.stderr)
            u.close()
            unix.append(None)
            continue
        os.chmod(path, 0o666)  # any local user may connect; the lease token is the lock
        u.listen(128)
        u.setblocking(False)
        unix.append(u)
    return tcp, unix


def spawn(template: worker.WorkerSpec, host: str, lease_dir: str) -> tuple[Any, ...]:
    cpus = template.cpu_ids
    tcp, unix = _listeners(host, lease_dir, len(cpus))
    tcp_addrs = tuple((host, int(t.getsockname()[1])) for t in tcp)
    unix_paths = tuple(str(u.getsockname()) if u is not None else "" for u in unix)
    pids: list[int] = []
    pipes: list[int] = []
    errors: list[str] = []
    try:
        for i, cpu in enumerate(cpus):
            leader = pids[0] if pids and template.sandbox else 0
            spec = dataclasses.replace(
                template, index=i, cpu=cpu, tcp=tcp_addrs, unix=unix_paths, leader_pid=leader
            )
            r, w = os.pipe()
            if template.sandbox:
                _pidns_for_next_child(leader)
            try:
                pid = os.fork()
            except OSError:
                if template.sandbox:
                    _own_pidns_for_next_child()
                raise
            if pid == 0:  # the worker; never returns
                os.close(r)
                worker.run(spec, [s for s in (tcp[i], unix[i]) if s is not None], w)
            if template.sandbox:
                _own_pidns_for_next_child()
            os.close(w)
            pids.append(pid)
            if template.sandbox and i == 0 and len(cpus) > 1:
                # the others join worker 0's namespaces once it has made them
                errors = _wait_ready([r])
                if errors:
                    break
            else:
                pipes.append(r)
    finally:
        for sock in (*tcp, *unix):
            if sock is not None:
                sock.close()
    errors += _wait_ready(pipes)
    if errors:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return ("error", "; ".join(errors))
    for dirs, (alive, _, _) in list(_leases.items()):  # ended: the supervisor cleaned them
        alive -= _exited
        if not alive:
            del _leases[dirs]
    _exited.clear()
    if template.cgroups.dirs:
        _leases[template.cgroups.dirs] = (set(pids), lease_dir, template.expiry_grace_s)
    return ("ok", tuple(pids), tcp_addrs, unix_paths)


def _wait_ready(pipes: list[int]) -> list[str]:
    errors: list[str] = []
    deadline = time.monotonic() + READY_TIMEOUT_S
    left = list(pipes)
    while left:
        timeout = deadline - time.monotonic()
        ready = select.select(left, [], [], max(timeout, 0))[0] if timeout > 0 else []
        if not ready:
            errors.append(f"{len(left)} worker(s) not ready after {READY_TIMEOUT_S:.0f} s")
            break
        for fd in ready:
            data = os.read(fd, 4096)
            if data != b"ok":
                errors.append(data.decode(errors="replace") or "worker exited during setup")
            left.remove(fd)
    for fd in pipes:
        os.close(fd)
    return errors


def short_path(directory_fd: int, name: str) -> str:
    """A path to ``name`` in an open directory that fits a Unix socket address (107 bytes)
    however deep the directory is."""
    return f"/proc/self/fd/{directory_fd}/{name}"


def _await_adopter(path: str, window_s: float) -> socket.socket | None:
    """Wait up to ``window_s`` for a restarted supervisor on ``path`` while workers live."""
    try:
        dir_fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        print(f"colocate fork server: cannot wait for adoption at {path}: {exc}", file=sys.stderr)
        return None
    name = os.path.basename(path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dir_fd)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        listener.bind(short_path(dir_fd, name))
    except OSError as exc:
        print(f"colocate fork server: cannot wait for adoption at {path}: {exc}", file=sys.stderr)
        os.close(dir_fd)
        return None
    finally:
        os.umask(old)
    listener.listen(4)
    deadline = time.monotonic() + window_s
    try:
        while time.monotonic() < deadline and _has_children():
            _clean_ended_leases()
            ready = select.select(
                [listener], [], [], min(0.2, max(0.0, deadline - time.monotonic()))
            )[0]
            if ready:
                conn, _ = listener.accept()
                send_msg(conn, ("ready", os.getpid(), "adopted"))
                return conn
        return None
    finally:
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dir_fd)
        os.close(dir_fd)


def serve(control: socket.socket) -> None:
    signal.signal(signal.SIGCHLD, _reap)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    adoption: tuple[str, float] | None = None
    while True:
        try:
            msg = recv_msg(control)
        except OSError as exc:  # cut short: the supervisor died mid-write; as its end of file
            print(f"colocate fork server: control stream: {exc}", file=sys.stderr)
            msg = None
        if msg is None:
            control.close()
            if adoption is None or not _has_children():
                _clean_ended_leases()
                return
            adopter = _await_adopter(*adoption)
            if adopter is None:
                _clean_ended_leases(kill_all=True)  # what the workers started goes too
                return  # the workers die with us (parent-death signal)
            control = adopter
            continue
        if msg[0] == "adoption":
            adoption = (str(msg[1]), float(msg[2]))
            continue
        try:
            if msg[0] == "spawn":
                answer = spawn(*msg[1:])
            else:
                answer = ("error", f"unknown command {msg[0]!r}")
        except Exception as exc:
            answer = ("error", f"fork server: {exc!r}")
        send_msg(control, answer)


def main(argv: list[str]) -> int:
    control = socket.socket(fileno=int(argv[0]))
    for name in (*STDLIB_PRELOAD, *argv[1:]):  # imported once here, shared by every worker
        try:
            importlib.import_module(name)
        except ImportError as exc:
            print(f"colocate fork server: cannot preload {name}: {exc}", file=sys.stderr)
    import cloudpickle  # noqa: F401

    # Objects that exist now are never collected: workers then do not touch (and copy) their
    # pages when their garbage collector runs.
    gc.freeze()
    send_msg(control, ("ready", os.getpid()))
    serve(control)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
