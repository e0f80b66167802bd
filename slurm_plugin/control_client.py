"""The client half of the agent's control API: wire format and :func:`call`.

Standard library only and no logging: the prolog hook imports this on every job start
(the server half, :mod:`slurm_plugin.control`, imports it too and re-exports it). The
wire format is described in :mod:`slurm_plugin.control`.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

from colocate.errors import BackendUnavailable, BadRequest

#: Largest request or answer line, in bytes (newline included).
MAX_LINE_BYTES = 64 * 1024
#: Default socket path; the same as ``AgentConfig.control_socket`` (a unit test checks).
DEFAULT_SOCKET = "/run/colocate/agent.sock"


def encode(message: Mapping[str, Any]) -> bytes:
    """One wire line for ``message``; raises BadRequest if it is too long."""
    line = json.dumps(message, separators=(",", ":"), allow_nan=False).encode() + b"\n"
    if len(line) > MAX_LINE_BYTES:
        raise BadRequest(f"control message of {len(line)} bytes exceeds {MAX_LINE_BYTES} bytes")
    return line


def decode(line: bytes) -> dict[str, Any]:
    """The JSON object on one wire line; raises BadRequest for anything else."""
    try:
        message = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"not a JSON line ({exc})") from None
    if not isinstance(message, dict):
        raise BadRequest(f"expected a JSON object, got {type(message).__name__}")
    return message


def socket_path_for(path: str, node: str | None) -> str:
    """``path`` with ``{node}`` replaced by the node name.

    Several slurmd on one machine (the dev cluster) need one agent socket each:
    ``/run/colocate/{node}.sock``. Without a node name the placeholder becomes ``agent``.
    """
    return path.replace("{node}", node or "agent")


class ControlReply(NamedTuple):
    """An answer from the agent; ``ok`` False carries ``error``."""

    ok: bool
    body: dict[str, Any]

    @property
    def error(self) -> str:
        return str(self.body.get("error", ""))


def call(
    path: str | os.PathLike[str], message: Mapping[str, Any], timeout_s: float
) -> ControlReply:
    """Send one request to the agent at ``path`` and wait at most ``timeout_s`` seconds.

    Raises BackendUnavailable when the agent is not there (no socket, nobody listening),
    does not answer in time, or answers garbage.
    """
    deadline = time.monotonic() + timeout_s
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(max(timeout_s, 0.001))
        try:
            pause = 0.001
            while True:  # a full listen queue (a flood) is EAGAIN at once: try again
                try:
                    sock.connect(os.fspath(path))
                    break
                except BlockingIOError:
                    if time.monotonic() + pause >= deadline:
                        raise TimeoutError from None
                    time.sleep(pause)
                    pause = min(pause * 2, 0.05)
            # refused at once (busy, not allowed): its answer may be waiting unread
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(encode(message))
            chunks: list[bytes] = []
            size = 0
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                sock.settimeout(remaining)
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if chunk.endswith(b"\n") or size > MAX_LINE_BYTES:
                    break
        except FileNotFoundError:
            raise BackendUnavailable(
                f"no agent control socket at {os.fspath(path)} (is colocate agent running?)"
            ) from None
        except ConnectionRefusedError:
            raise BackendUnavailable(
                f"nobody listens on {os.fspath(path)} (stale socket; is colocate agent running?)"
            ) from None
        except TimeoutError:
            raise BackendUnavailable(
                f"the agent at {os.fspath(path)} did not answer within {timeout_s:g} s"
            ) from None
        except OSError as exc:
            raise BackendUnavailable(
                f"cannot talk to the agent at {os.fspath(path)}: {exc.strerror or exc}"
            ) from None
    finally:
        sock.close()
    raw = b"".join(chunks)
    if not raw:
        raise BackendUnavailable(f"the agent at {os.fspath(path)} hung up without an answer")
    try:
        body = decode(raw.split(b"\n", 1)[0])
    except BadRequest as exc:
        raise BackendUnavailable(
            f"the agent at {os.fspath(path)} answered garbage: {exc}"
        ) from None
    return ControlReply(ok=body.get("ok") is True, body=body)
