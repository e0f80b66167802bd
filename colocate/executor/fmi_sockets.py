"""The supervisor's half of FMI's cross-lease channels: sockets made outside the sandbox.

A rank of an FMI group asks, over its worker's verifier connection (``F`` + JSON, see
``colocate.executor.verifier``), for

- ``{"op": "listen", "ticket", "sig"}``: a TCP listening socket bound to the ticket's host on
  a free port, made here in the host's network namespace;
- ``{"op": "connect", "ticket", "sig", "to": [host, port]}``: a TCP socket connected to
  ``to``, which must be one of the ticket's peers.

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
import socket
import struct
import time
from typing import Any

from colocate import protocol as P
from colocate.errors import ColocateError
from colocate.fmi_ticket import check_ticket
from colocate.tokens import lease_key

CONNECT_TIMEOUT_S = 2.0  # peers are one hop away; the verifier thread must not stall long


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
    secret: bytes, payload: bytes, pid: int | None = None
) -> tuple[dict[str, Any], socket.socket | None]:
    """The reply to an ``F`` request and the socket to pass (None on refusal). ``pid`` is the
    requesting worker (the verifier connection's peer): it must be in the ticket's lease."""
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
