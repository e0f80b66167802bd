"""What runs on each rank of an FMI group, inside a leased worker (called by reference).

An SPMD call is two rounds of calls, one call per rank each (``colocate.client.spmd``):

1. :func:`prepare` opens this rank's listeners for the group: a Unix socket in the lease's
   private /tmp (the ranks of the same lease share it) and a TCP listener for the other
   leases. In the sandbox with ``network = "none"`` the TCP listener is made by the
   supervisor in the host's network namespace and passed in (``colocate.executor.fmi_sockets``,
   with the ticket the client signed with the lease key); otherwise the rank binds it.
2. :func:`run` connects rank i to every rank below it and accepts the ranks above it (so
   every pair has one connection), authenticates each connection both ways with an HMAC
   challenge under the group key (the acceptor's nonce first: a stranger gets nothing
   else), passes a shared-memory segment over each same-lease connection (the ``shm``
   channel; a pair of two leases on one node gets its segment from the node's supervisor,
   :func:`_node_peer`), builds the :class:`~colocate.fmi.comm.Comm`, waits in a barrier (every rank
   runs the function or none does) and calls the user's ``fn(comm, *args, **kwargs)``. Its
   value is the rank's result. While it waits for ranks to join, it probes their listeners:
   a rank whose worker died is reported at once, not at the setup timeout.

A rank whose function raises tells the others (they raise ``GroupAborted``) and raises the
exception with ``rank`` set and a note naming it; the listeners and connections close with
the call.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import select
import socket
import struct
import time
from typing import Any

from colocate import protocol as P
from colocate.errors import ColocateError, LeaseEvicted, Unauthorized
from colocate.fmi import channels as ch
from colocate.fmi.comm import Comm, GroupAborted

# A rank is pinned to one leased core: BLAS thread pools only compete with it there, and each
# thread counts against the owner's RLIMIT_NPROC (per uid, all leases); OpenBLAS exits the
# whole worker when it cannot start one. Set before the user's function brings numpy in.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

_MAGIC = b"FMI1"
_HELLO = struct.Struct("<4s32sI16s")
_prepared: dict[str, tuple[list[socket.socket], str]] = {}
# A rank waiting for others to join checks that their listeners are still there after
# PROBE_AFTER_S, then at doubling intervals: a rank that died is noticed within about the time
# it has been waited for, and a slow one is not flooded (each probe sits in its listener's
# backlog until it accepts).
PROBE_AFTER_S = 0.3
PROBE_MAX_EVERY_S = 5.0
BACKLOG = 1024


def _worker() -> Any:
    from colocate.executor import worker

    return worker.current()


def _sandboxed(w: Any) -> bool:
    return w is not None and w.verifier is not None and w.spec.sandbox and w.spec.network == "none"


def _ask_supervisor(w: Any, request: dict[str, Any]) -> socket.socket:
    """A socket the supervisor made outside the sandbox for this rank (see fmi_sockets)."""
    return socket.socket(fileno=_ask_fd(w, request))


def _ask_fd(w: Any, request: dict[str, Any]) -> int:
    """The fd the supervisor passed for ``request`` (a socket or a memfd; see fmi_sockets)."""
    body = b"F" + json.dumps(request).encode()
    sock: socket.socket = w.verifier
    P.send_message(sock, body)  # the verifier connection: protocol.py messages
    head, fds, _flags, _addr = socket.recv_fds(sock, 4, 1, socket.MSG_WAITALL)
    (length,) = P.MESSAGE_LEN.unpack(head)
    answer = json.loads(sock.recv(length, socket.MSG_WAITALL))
    if answer.get("status") != "ok" or not fds:
        for fd in fds:
            os.close(fd)
        message = str(answer.get("message", "refused"))
        if answer.get("status") == "unauthorized":
            raise Unauthorized(f"FMI: the supervisor refused: {message}")
        if isinstance(answer.get("errno"), int):  # e.g. ConnectionRefusedError
            raise OSError(answer["errno"], message)
        raise ConnectionError(message)
    for fd in fds[1:]:
        os.close(fd)
    return fds[0]


def prepare(group: str, ticket: str, sig: str, channel: str) -> dict[str, Any]:
    """Open this rank's listeners for ``group``; returns where peers reach it."""
    for other in [g for g in _prepared if g != group]:
        _drop(other)
    w = _worker()
    spec = w.spec if w is not None else None
    unix_path = f"/tmp/colocate-fmi-{group[:16]}-{os.getpid()}.sock"
    listeners: list[socket.socket] = []
    info: dict[str, Any] = {
        "lease": spec.lease_id if spec else "",
        "node": spec.node if spec else socket.gethostname(),
        "unix": unix_path,
        "tcp": None,
        "direct": True,
        # the node's supervisor can hand this rank a segment shared with another lease
        "broker": w is not None and getattr(w, "verifier", None) is not None,
    }
    with contextlib.suppress(FileNotFoundError):
        os.unlink(unix_path)
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(unix_path)
    unix.listen(BACKLOG)
    listeners.append(unix)
    if channel != "redis":
        host = json.loads(ticket)[2]
        try:
            if _sandboxed(w):
                tcp = _ask_supervisor(w, {"op": "listen", "ticket": ticket, "sig": sig})
            else:
                tcp = socket.socket(
                    socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM
                )
                tcp.bind((host, 0))
                tcp.listen(BACKLOG)
            listeners.append(tcp)
            info["tcp"] = list(tcp.getsockname()[:2])
        except (OSError, ConnectionError) as exc:
            info["direct"] = False  # no way in from other leases: the group falls back to Redis
            info["why"] = f"no TCP listener on {host}: {exc}"
    _prepared[group] = (listeners, unix_path)
    return info


def _drop(group: str) -> None:
    listeners, path = _prepared.pop(group, ([], ""))
    for sock in listeners:
        sock.close()
    if path:
        with contextlib.suppress(OSError):
            os.unlink(path)


def _mac(key: bytes, side: bytes, group: bytes, src: int, dst: int, nc: bytes, na: bytes) -> bytes:
    return hmac.new(
        key, side + group + struct.pack("<II", src, dst) + nc + na, hashlib.sha256
    ).digest()


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = sock.recv(n, socket.MSG_WAITALL)
    if len(data) != n:
        raise ConnectionError("peer closed during the FMI handshake")
    return data


def _connect_peer(
    sock: socket.socket, key: bytes, group: bytes, me: int, dst: int, timeout_s: float
) -> None:
    """The connecting side: answer the acceptor's challenge, then check its proof."""
    sock.settimeout(timeout_s)
    na = _recv_exact(sock, 16)
    nc = os.urandom(16)
    sock.sendall(_HELLO.pack(_MAGIC, group, me, nc) + _mac(key, b"c", group, me, dst, nc, na))
    if not hmac.compare_digest(_recv_exact(sock, 32), _mac(key, b"a", group, me, dst, nc, na)):
        raise Unauthorized(f"FMI: rank {dst}'s listener does not hold the group key")


def _accept_peer(
    sock: socket.socket, key: bytes, group: bytes, me: int, expected: set[int]
) -> int | None:
    """The accepting side: a challenge first (a stranger learns nothing but a random nonce),
    then the connecting rank when it proves the group key, else None."""
    try:
        sock.settimeout(5.0)
        na = os.urandom(16)
        sock.sendall(na)
        magic, their_group, src, nc = _HELLO.unpack(_recv_exact(sock, _HELLO.size))
        proof = _recv_exact(sock, 32)
        if magic != _MAGIC or their_group != group or src not in expected:
            return None
        if not hmac.compare_digest(proof, _mac(key, b"c", group, src, me, nc, na)):
            return None
        sock.sendall(_mac(key, b"a", group, src, me, nc, na))
        return int(src)
    except (OSError, ConnectionError, struct.error):
        return None


def _open_to(
    w: Any, member: dict[str, Any], same_lease: bool, ticket: str, sig: str
) -> socket.socket:
    if same_lease:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(member["unix"])
        return sock
    host, port = member["tcp"]
    if _sandboxed(w):
        return _ask_supervisor(
            w, {"op": "connect", "ticket": ticket, "sig": sig, "to": [host, port]}
        )
    return socket.create_connection((host, port), timeout=5.0)


def _connect_redis(
    w: Any, address: list[Any], ticket: str, sig: str, group: str, rank: int, key: bytes
) -> ch.RedisInbox:
    try:
        import redis
        from redis.connection import Connection
    except ImportError:
        raise ColocateError(
            "the Redis channel needs the redis package: pip install 'slurm-colocate[redis]'"
        ) from None
    host, port = str(address[0]), int(address[1])

    def opened() -> socket.socket:
        if _sandboxed(w):
            return _ask_supervisor(
                w, {"op": "connect", "ticket": ticket, "sig": sig, "to": [host, port]}
            )
        return socket.create_connection((host, port), timeout=5.0)

    class _Handed(Connection):  # the socket comes from the supervisor, not from getaddrinfo
        def _connect(self) -> socket.socket:
            sock = opened()
            sock.settimeout(None)
            return sock

    pool = redis.ConnectionPool(connection_class=_Handed, host=host, port=port, max_connections=1)
    return ch.RedisInbox(redis.Redis(connection_pool=pool), group, rank, key)


def run(
    fn_bytes: bytes,
    group: str,
    rank: int,
    members: list[dict[str, Any]],
    key_hex: str,
    channel: str,
    redis_address: list[Any] | None,
    ticket: str,
    sig: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    setup_timeout_s: float = 10.0,
) -> Any:
    """Connect this rank to the group, then return ``fn(comm, *args, **kwargs)``."""
    import cloudpickle

    w = _worker()
    key = bytes.fromhex(key_hex)
    gid = group.encode()[:32].ljust(32, b"\0")
    size = len(members)

    def describe(r: int) -> str:
        return f"lease {members[r]['lease']} on {members[r]['node']}"

    evicting = (lambda: bool(w.evicting)) if w is not None else (lambda: False)
    comm: Comm | None = None
    try:
        fn = cloudpickle.loads(fn_bytes)
        direct = all(m["direct"] for m in members)
        use_redis = size > 1 and any(
            _kind(members, rank, i, direct, channel) == "redis" for i in range(size) if i != rank
        )
        if use_redis:
            if redis_address is None:
                raise ColocateError(
                    "FMI: direct connections are impossible in this group and no Redis was given; pass redis='host:port'"
                )
            comm = Comm(
                rank,
                size,
                {},
                _connect_redis(w, redis_address, ticket, sig, group, rank, key),
                evicting,
                describe,
            )
        else:
            comm = _setup(
                rank,
                size,
                _mesh(
                    w,
                    group,
                    gid,
                    key,
                    rank,
                    members,
                    channel,
                    ticket,
                    sig,
                    setup_timeout_s,
                    evicting,
                ),
                evicting,
                describe,
            )
        try:
            result = fn(comm, *args, **kwargs)
            comm.finish()
            return result
        except GroupAborted as exc:
            comm.abort("raised", exc.reason, exc.rank)
            raise
        except LeaseEvicted as exc:
            failed = getattr(exc, "fmi_rank", rank)
            comm.abort("evicted", str(exc), failed)
            raise
        except BaseException as exc:
            comm.abort("raised", f"{type(exc).__name__}: {exc}", rank)
            with contextlib.suppress(Exception):
                exc.rank = rank  # type: ignore[attr-defined]
                exc.add_note(f"raised on rank {rank} of {size} ({describe(rank)})")
            raise
    finally:
        if comm is not None:
            comm.close()
        _drop(group)


def _setup(
    rank: int,
    size: int,
    peers: dict[int, ch.StreamPeer],
    evicting: Any,
    describe: Any,
) -> Comm:
    """The communicator over a complete mesh, once every rank has one: a barrier before the
    user's function, so that either every rank runs it or none does (a group whose setup
    failed anywhere can be run again, e.g. through Redis, without running anything twice)."""
    comm = Comm(rank, size, peers, None, evicting, describe)
    try:
        comm.barrier()
    except LeaseEvicted as exc:
        comm.close()
        exc.fmi_setup = True  # type: ignore[attr-defined]
        raise
    except BaseException:
        comm.close()
        raise
    return comm


def _kind(members: list[dict[str, Any]], a: int, b: int, direct: bool, channel: str) -> str:
    """The channel between ranks ``a`` and ``b``, the same seen from either end."""
    ma, mb = members[a], members[b]
    same_node = ma["node"] == mb["node"] and bool(ma.get("broker")) and bool(mb.get("broker"))
    return ch.route(ma["lease"] == mb["lease"], direct, channel, same_node)


def _rings(members: list[dict[str, Any]], channel: str) -> list[int]:
    """Each rank's ring size: from its number of shm peers (its lease's and its node's).
    A pair takes the smaller of its two ranks' sizes, which both ends compute alike."""
    size = len(members)
    return [
        ch.ring_bytes(
            sum(_kind(members, r, o, True, channel) == "shm" for o in range(size) if o != r)
        )
        for r in range(size)
    ]


def _mesh(
    w: Any,
    group: str,
    gid: bytes,
    key: bytes,
    rank: int,
    members: list[dict[str, Any]],
    channel: str,
    ticket: str,
    sig: str,
    timeout_s: float,
    evicting: Any,
) -> dict[int, ch.StreamPeer]:
    """One authenticated connection to every other rank (rank i dials ranks below it)."""
    me = members[rank]
    peers: dict[int, ch.StreamPeer] = {}
    rings = _rings(members, channel)
    try:
        for r in range(rank):
            kind = _kind(members, rank, r, True, channel)
            same_lease = members[r]["lease"] == me["lease"]
            try:
                sock = _open_to(w, members[r], same_lease and kind in ("shm", "local"), ticket, sig)
                _connect_peer(sock, key, gid, rank, r, timeout_s)
                ring = min(rings[r], rings[rank])
                if kind == "shm" and not same_lease:
                    peers[r] = _node_peer(w, r, sock, ring, group, rank, members, ticket, sig)
                else:
                    peers[r] = _peer(r, sock, kind, ring, dialer=True, low=False)
            except (OSError, ConnectionError) as exc:
                failed = _left(r, members, f"cannot reach it: {exc}")
                # refused: its listener is gone (the rank failed); anything else (a timeout,
                # no route): the network between them, which Redis may get around
                if not isinstance(exc, (ConnectionRefusedError, FileNotFoundError)):
                    failed.fmi_unreachable = True  # type: ignore[attr-defined]
                raise failed from None
        expected = set(range(rank + 1, len(members)))
        listeners, _path = _prepared.get(group, ([], ""))
        deadline = time.monotonic() + timeout_s
        probe_every = PROBE_AFTER_S
        next_probe = time.monotonic() + probe_every
        while expected:
            if evicting():
                raise LeaseEvicted(
                    f"rank {rank}: the node took the lease back during the group's setup"
                )
            now = time.monotonic()
            left = deadline - now
            if left <= 0:
                first = min(expected)
                raise _left(first, members, f"it did not join within {timeout_s:.0f} s")
            if now >= next_probe:
                _probe(w, members, expected, ticket, sig, me["lease"])
                probe_every = min(2 * probe_every, PROBE_MAX_EVERY_S)
                next_probe = now + probe_every
            ready, _, _ = select.select(listeners, [], [], min(left, 0.05))
            for listener in ready:
                with contextlib.suppress(BlockingIOError, InterruptedError):
                    sock, _addr = listener.accept()
                    src = _accept_peer(sock, key, gid, rank, expected)
                    if src is None:  # not a member of the group: dropped, never heard
                        sock.close()
                        continue
                    kind = _kind(members, rank, src, True, channel)
                    ring = min(rings[src], rings[rank])
                    try:
                        if kind == "shm" and members[src]["lease"] != me["lease"]:
                            peers[src] = _node_peer(
                                w, src, sock, ring, group, rank, members, ticket, sig
                            )
                        else:
                            peers[src] = _peer(src, sock, kind, ring, dialer=False, low=True)
                    except (OSError, ConnectionError) as exc:
                        sock.close()
                        raise _left(src, members, f"its shared memory failed: {exc}") from None
                    expected.discard(src)
    except BaseException:
        for peer in peers.values():
            peer.close()
        raise
    return peers


def _peer(
    r: int, sock: socket.socket, kind: str, ring: int, dialer: bool, low: bool
) -> ch.StreamPeer:
    """The peer over an authenticated connection; for ``shm`` the dialer makes the pair's
    segment and passes it over the connection (the only way anything can map it)."""
    if kind != "shm":
        return ch.StreamPeer(r, sock, kind)
    if dialer:
        fd, mm = ch.new_segment(ring)
        try:
            socket.send_fds(sock, [b"S"], [fd])
        finally:
            os.close(fd)
    else:
        _msg, fds, _flags, _addr = socket.recv_fds(sock, 1, 1)
        if not fds:
            raise ConnectionError("no shared-memory segment came with the connection")
        mm = ch.map_segment(fds[0], ring)
    return ch.ShmPeer(r, sock, mm, low)


def _node_peer(
    w: Any,
    r: int,
    sock: socket.socket,
    ring: int,
    group: str,
    rank: int,
    members: list[dict[str, Any]],
    ticket: str,
    sig: str,
) -> ch.StreamPeer:
    """The peer of another lease on this node over shared memory: both ranks ask the node's
    supervisor for the pair's segment (after authenticating each other over the TCP
    connection, which stays as doorbell and end-of-stream). The supervisor gives it only to
    the two leases the pair names, each once (``colocate.executor.fmi_sockets``)."""
    lo, hi = min(r, rank), max(r, rank)
    request = {
        "op": "shm",
        "ticket": ticket,
        "sig": sig,
        "pair": [lo, members[lo]["lease"], hi, members[hi]["lease"]],
        "bytes": ch.segment_bytes(ring),
    }
    mm = ch.map_segment(_ask_fd(w, request), ring)
    return ch.ShmPeer(r, sock, mm, low=rank < r)


def _probe(
    w: Any, members: list[dict[str, Any]], expected: set[int], ticket: str, sig: str, lease: str
) -> None:
    """Ranks still expected whose listener is gone died before joining (their worker exited
    and its sockets closed): say so now rather than at the setup timeout."""
    for r in sorted(expected):
        m = members[r]
        try:
            if m["lease"] == lease:
                probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    probe.connect(m["unix"])
                finally:
                    probe.close()
            elif m["tcp"]:
                _open_to(w, m, False, ticket, sig).close()
        except (ConnectionRefusedError, FileNotFoundError):
            raise _left(
                r,
                members,
                "its listener closed before it joined (its worker died or its setup failed)",
            ) from None
        except (OSError, ConnectionError):
            continue  # slow or unreachable: the setup timeout still applies


def _left(r: int, members: list[dict[str, Any]], why: str) -> LeaseEvicted:
    exc = LeaseEvicted(
        f"rank {r} (lease {members[r]['lease']} on {members[r]['node']}) left the group: {why}"
    )
    exc.fmi_rank = r  # type: ignore[attr-defined]
    exc.fmi_setup = True  # type: ignore[attr-defined]
    return exc
