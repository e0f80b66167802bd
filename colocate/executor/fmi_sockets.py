"""The supervisor's half of FMI's cross-lease channels: sockets made outside the sandbox.

A rank of an FMI group asks, over its worker's verifier connection (``F`` + JSON, see
``colocate.executor.verifier``), for

- ``{"op": "listen", "ticket", "sig"}``: a TCP listening socket bound to the ticket's host on
  a free port, made here in the host's network namespace;
- ``{"op": "connect", "ticket", "sig", "to": [host, port]}``: a TCP socket connected to
  ``to``, which must be one of the ticket's peers;
- ``{"op": "shm", "ticket", "sig", "pair": [lo, lease_lo, hi, lease_hi], "bytes"}``: the
  shared-memory segment (a memfd) of the pair of ranks ``lo < hi`` of two different leases on
  this node (``colocate.fmi.rank``). Both ranks ask, in either order: the first request makes
  the zeroed memfd and keeps it, the second gets the same one and the supervisor lets go of
  it. The segment is keyed by the ticket's group and both ranks with their leases, and the
  asking lease must be one of the two (each side takes it once): a lease outside the pair can
  neither take the pair's segment nor plant one of its own for the pair to use. One not taken
  by both sides within ``SEGMENT_TTL_S`` is dropped.

The ticket must be signed with its lease's key (``colocate.fmi_ticket``), which only the
lease's owner holds, and the asking worker (the connection's SO_PEERCRED pid) must sit in
that lease's cgroup, so a ticket that leaked to another lease's worker opens nothing. The
answer is ``u32 length + JSON`` with the socket attached (SCM_RIGHTS) when ``status`` is
``ok``. A socket keeps the network namespace it was made in,
so the rank uses it from inside its sandbox while reaching nothing else. Every channel is
then authenticated between the ranks themselves with the group key (``colocate.fmi``).
"""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from colocate import protocol as P
from colocate.errors import ColocateError
from colocate.fmi_ticket import GroupTicket, check_ticket
from colocate.tokens import lease_key

CONNECT_TIMEOUT_S = 2.0  # peers are one hop away; the verifier thread must not stall long
SEGMENT_TTL_S = 60.0  # longer than a group's setup; then a half-taken segment is dropped
MAX_SEGMENT_BYTES = 64 << 20  # a pair's rings are 2 x 4 MiB at most (colocate.fmi.channels)
MAX_PENDING_PER_LEASE = 1024  # segments a lease made that its peers have not taken yet


@dataclass(slots=True)
class _Segment:
    fd: int
    nbytes: int
    made_by: str
    made_at: float
    taken: set[str] = field(default_factory=set)


class Segments:
    """The node's half-taken pair segments (one table per supervisor process)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[tuple[str, int, str, int, str], _Segment] = {}

    def take(
        self, key: tuple[str, int, str, int, str], lease_id: str, nbytes: int, now: float
    ) -> int:
        """A new fd of the pair ``key``'s segment for ``lease_id`` (the caller closes it);
        ValueError naming why when refused."""
        with self._lock:
            for old in [k for k, seg in self._open.items() if now - seg.made_at > SEGMENT_TTL_S]:
                os.close(self._open.pop(old).fd)
            seg = self._open.get(key)
            if seg is None:
                pending = sum(s.made_by == lease_id for s in self._open.values())
                if pending >= MAX_PENDING_PER_LEASE:
                    raise ValueError(f"lease {lease_id} has {pending} segments nobody took")
                fd = os.memfd_create("colocate-fmi-pair", os.MFD_CLOEXEC)
                try:
                    os.ftruncate(fd, nbytes)
                except OSError:
                    os.close(fd)
                    raise
                seg = self._open[key] = _Segment(fd, nbytes, lease_id, now)
            elif seg.nbytes != nbytes:
                raise ValueError(f"the pair's segment has {seg.nbytes} bytes, not {nbytes}")
            elif lease_id in seg.taken:
                raise ValueError(f"lease {lease_id} already took this pair's segment")
            seg.taken.add(lease_id)
            out = os.dup(seg.fd)
            if len(seg.taken) == 2:
                os.close(self._open.pop(key).fd)
            return out

    def __len__(self) -> int:
        with self._lock:
            return len(self._open)


SEGMENTS = Segments()


class _NotInPair(Exception):
    pass


class _Fd:
    """An fd to pass that is not a socket (a memfd)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _segment(ticket: GroupTicket, request: dict[str, Any], segments: Segments) -> _Fd:
    lo, lease_lo, hi, lease_hi = request["pair"]
    lo, hi, lease_lo, lease_hi = int(lo), int(hi), str(lease_lo), str(lease_hi)
    nbytes = int(request["bytes"])
    if ticket.lease_id not in (lease_lo, lease_hi) or lease_lo == lease_hi or not 0 <= lo < hi:
        raise _NotInPair(
            f"lease {ticket.lease_id} is not a side of the pair ({lo}, {lease_lo}), ({hi}, {lease_hi})"
        )
    if not 0 < nbytes <= MAX_SEGMENT_BYTES:
        raise ValueError(f"a pair's segment is 1 to {MAX_SEGMENT_BYTES} bytes, not {nbytes}")
    key = (ticket.group, lo, lease_lo, hi, lease_hi)
    return _Fd(segments.take(key, ticket.lease_id, nbytes, time.time()))


def outside_lease(cgroup_text: str, lease_id: str) -> str | None:
    """Why a process whose ``/proc/<pid>/cgroup`` reads ``cgroup_text`` may not use a ticket
    of ``lease_id`` (None: it may). Lease cgroups are ``.../colocate/<node>/<lease id>``; a
    process in another lease's cgroup is refused; one in no lease cgroup at all (a node
    confined by rlimits alone, no cgroups) is let through: there is nothing to check."""
    leases = set()
    for line in cgroup_text.splitlines():
        path = line.split(":", 2)[-1]
        parts = path.strip("/").split("/")
        if "colocate" in parts and len(parts) >= parts.index("colocate") + 3:
            leases.add(parts[parts.index("colocate") + 2])
    if leases and leases != {lease_id}:
        return f"the requesting worker is in lease {', '.join(sorted(leases))}, not {lease_id}"
    return None


def _peer_pid(conn: socket.socket) -> int | None:
    try:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid = int(struct.unpack("3i", creds)[0])
    return pid or None


def answer_fmi(
    secret: bytes, payload: bytes, pid: int | None = None, segments: Segments = SEGMENTS
) -> tuple[dict[str, Any], socket.socket | _Fd | None]:
    """The reply to an ``F`` request and the socket (or memfd) to pass (None on refusal).
    ``pid`` is the requesting worker (the verifier connection's peer): it must be in the
    ticket's lease."""
    try:
        request = json.loads(payload)
        op = request["op"]
        data = str(request["ticket"]).encode()
        lease_id = json.loads(data)[1]
        ticket = check_ticket(
            lease_key(secret, str(lease_id)), data, str(request["sig"]), time.time()
        )
    except ColocateError as exc:
        return {"status": "unauthorized", "message": str(exc)}, None
    except (ValueError, KeyError, TypeError, IndexError):
        return {"status": "unauthorized", "message": "malformed FMI request"}, None
    if pid is not None:
        try:
            with open(f"/proc/{pid}/cgroup") as f:
                why = outside_lease(f.read(), ticket.lease_id)
        except OSError:
            why = f"the requesting worker (pid {pid}) is gone"
        if why is not None:
            return {"status": "unauthorized", "message": f"FMI ticket refused: {why}"}, None
    try:
        if op == "listen":
            family = socket.AF_INET6 if ":" in ticket.host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.bind((ticket.host, 0))
            sock.listen(1024)  # every rank of a group may dial (and probe) it at once
            return {"status": "ok", "address": list(sock.getsockname()[:2])}, sock
        if op == "connect":
            host, port = request["to"]
            if (str(host), int(port)) not in ticket.peers:
                return {
                    "status": "unauthorized",
                    "message": f"{host}:{port} is not in group {ticket.group}",
                }, None
            sock = socket.create_connection((str(host), int(port)), timeout=CONNECT_TIMEOUT_S)
            return {"status": "ok"}, sock
        if op == "shm":
            try:
                return {"status": "ok"}, _segment(ticket, request, segments)
            except _NotInPair as exc:
                return {"status": "unauthorized", "message": f"FMI shm refused: {exc}"}, None
            except (ValueError, TypeError, KeyError) as exc:
                return {"status": "refused", "message": f"FMI shm: {exc}"}, None
    except OSError as exc:
        return {
            "status": "unreachable",
            "message": f"FMI {op}: {exc.strerror or exc}",
            "errno": exc.errno,
        }, None
    return {"status": "unauthorized", "message": f"unknown FMI op {op!r}"}, None


def serve_fmi(conn: socket.socket, secret: bytes, payload: bytes) -> None:
    """Answer one ``F`` request on the worker's verifier connection ``conn``."""
    reply, sock = answer_fmi(secret, payload, _peer_pid(conn))
    body = json.dumps(reply).encode()
    try:
        if sock is None:
            conn.sendall(P.message(body))
        else:
            socket.send_fds(conn, [P.message(body)], [sock.fileno()])
    finally:
        if sock is not None:
            sock.close()
