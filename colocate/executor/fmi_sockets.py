"""The supervisor's half of FMI's cross-lease channels: sockets made outside the sandbox.

A rank of an FMI group asks, over its worker's verifier connection (``F`` + JSON, see
``colocate.executor.verifier``), for

- ``{"op": "listen", "ticket", "sig"}``: a TCP listening socket bound to the ticket's host on
  a free port, made here in the host's network namespace;
- ``{"op": "connect", "ticket", "sig", "to": [host, port]}``: a TCP socket connected to
  ``to``, which must be one of the ticket's peers.

The ticket must be signed with its lease's key (``colocate.fmi_ticket``), which only the
lease's owner holds; the answer is ``u32 length + JSON`` with the socket attached
(SCM_RIGHTS) when ``status`` is ``ok``. A socket keeps the network namespace it was made in,
so the rank uses it from inside its sandbox while reaching nothing else. Every channel is
then authenticated between the ranks themselves with the group key (``colocate.fmi``).
"""

from __future__ import annotations

import json
import socket
import struct
import time
from typing import Any

from colocate.errors import ColocateError
from colocate.fmi_ticket import check_ticket
from colocate.tokens import lease_key

_LEN = struct.Struct("<I")
CONNECT_TIMEOUT_S = 2.0  # peers are one hop away; the verifier thread must not stall long


def answer_fmi(secret: bytes, payload: bytes) -> tuple[dict[str, Any], socket.socket | None]:
    """The reply to an ``F`` request and the socket to pass (None on refusal)."""
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
    try:
        if op == "listen":
            family = socket.AF_INET6 if ":" in ticket.host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.bind((ticket.host, 0))
            sock.listen(64)
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
        return {"status": "unreachable", "message": f"FMI {op}: {exc.strerror or exc}"}, None
    return {"status": "unauthorized", "message": f"unknown FMI op {op!r}"}, None


def serve_fmi(conn: socket.socket, secret: bytes, payload: bytes) -> None:
    """Answer one ``F`` request on the worker's verifier connection ``conn``."""
    reply, sock = answer_fmi(secret, payload)
    body = json.dumps(reply).encode()
    try:
        if sock is None:
            conn.sendall(_LEN.pack(len(body)) + body)
        else:
            socket.send_fds(conn, [_LEN.pack(len(body)) + body], [sock.fileno()])
    finally:
        if sock is not None:
            sock.close()
