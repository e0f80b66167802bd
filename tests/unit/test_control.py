"""The control API's request handling, without sockets: what the agent's handler receives
and what a caller gets back for good and bad requests."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping
from typing import Any

import pytest

from colocate.config import AgentConfig
from colocate.errors import ConfigError, LeaseError
from slurm_plugin.control import (
    DEFAULT_SOCKET,
    MAX_PROLOG_TIMEOUT_S,
    ControlServer,
    EpilogRequest,
    EpilogResult,
    Peer,
    PrologRequest,
    PrologResult,
    resolve_uids,
    socket_path_for,
)

ROOT = Peer(pid=1, uid=0, gid=0)


class RecordingHandler:
    """A ControlHandler that records calls; evicts the leases it is told to, after ``delay_s``."""

    def __init__(
        self, evict: tuple[str, ...] = (), delay_s: float = 0.0, fail: Exception | None = None
    ) -> None:
        self.evict = evict
        self.delay_s = delay_s
        self.fail = fail
        self.prologs: list[tuple[PrologRequest, float]] = []
        self.epilogs: list[EpilogRequest] = []
        self.seen = threading.Event()
        self.status_value: Mapping[str, Any] = {"leases": 0}

    def on_prolog(self, request: PrologRequest, deadline: float) -> PrologResult:
        self.prologs.append((request, deadline))
        self.seen.set()
        if self.fail is not None:
            raise self.fail
        time.sleep(self.delay_s)
        return PrologResult(
            evicted=self.evict, waited_s=self.delay_s, complete=time.monotonic() <= deadline
        )

    def on_epilog(self, request: EpilogRequest) -> EpilogResult:
        self.epilogs.append(request)
        self.seen.set()
        return EpilogResult(offered_cores=2, offered_memory_bytes=1 << 30)

    def status(self) -> Mapping[str, Any]:
        return self.status_value


def ask(server: ControlServer, message: Any, peer: Peer = ROOT) -> dict[str, Any]:
    line = message if isinstance(message, bytes) else json.dumps(message).encode() + b"\n"
    answer = server.answer(line, peer)
    json.dumps(answer)  # every answer must go on the wire
    return answer


@pytest.fixture
def handler() -> RecordingHandler:
    return RecordingHandler(evict=("lease-1",))


@pytest.fixture
def server(handler: RecordingHandler) -> ControlServer:
    return ControlServer("/nonexistent/agent.sock", handler)


def test_prolog_reaches_the_handler_with_the_job_and_a_deadline(
    server: ControlServer, handler: RecordingHandler
) -> None:
    before = time.monotonic()
    answer = ask(
        server,
        {
            "op": "prolog",
            "job_id": 42,
            "colocate": "deny",
            "uid": 1000,
            "cpus_per_node": "2(x3)",
            "node": "n1",
            "timeout_s": 3,
        },
    )
    assert answer == {
        "ok": True,
        "op": "prolog",
        "job_id": 42,
        "evicted": ["lease-1"],
        "waited_s": 0.0,
        "complete": True,
    }
    request, deadline = handler.prologs[0]
    assert request == PrologRequest(
        job_id=42, colocate="deny", uid=1000, cpus_per_node="2(x3)", node="n1"
    )
    assert before + 3 <= deadline <= time.monotonic() + 3


def test_prolog_without_options_leaves_the_choice_to_the_site(
    server: ControlServer, handler: RecordingHandler
) -> None:
    assert ask(server, {"op": "prolog", "job_id": "7"})["ok"] is True
    request, _ = handler.prologs[0]
    assert request == PrologRequest(job_id=7)


def test_a_prolog_cannot_hold_the_agent_longer_than_the_cap(
    server: ControlServer, handler: RecordingHandler
) -> None:
    ask(server, {"op": "prolog", "job_id": 1, "timeout_s": 1e9})
    _, deadline = handler.prologs[0]
    assert deadline <= time.monotonic() + MAX_PROLOG_TIMEOUT_S


def test_epilog_and_status(server: ControlServer, handler: RecordingHandler) -> None:
    assert ask(server, {"op": "epilog", "job_id": 9, "node": "n2"}) == {
        "ok": True,
        "op": "epilog",
        "job_id": 9,
        "offered_cores": 2,
        "offered_memory_bytes": 1 << 30,
    }
    assert handler.epilogs == [EpilogRequest(job_id=9, node="n2")]
    assert ask(server, {"op": "status"}) == {"ok": True, "op": "status", "status": {"leases": 0}}


@pytest.mark.parametrize(
    ("line", "complaint"),
    [
        (b"not json\n", "not a JSON line"),
        (b"\xff\xfe\x00garbage\n", "not a JSON line"),
        (b"[1, 2]\n", "expected a JSON object"),
        (b"{}\n", "unknown op None"),
        (b'{"op": "reboot"}\n', "unknown op 'reboot'"),
        (b'{"op": "prolog"}\n', "job_id must be a positive integer"),
        (b'{"op": "prolog", "job_id": "abc"}\n', "job_id must be a positive integer"),
        (b'{"op": "prolog", "job_id": -3}\n', "job_id must be a positive integer"),
        (b'{"op": "prolog", "job_id": true}\n', "job_id must be a positive integer"),
        (b'{"op": "prolog", "job_id": 1.5}\n', "job_id must be a positive integer"),
        (
            b'{"op": "prolog", "job_id": 1, "colocate": "maybe"}\n',
            "colocate must be 'allow', 'deny' or null",
        ),
        (b'{"op": "prolog", "job_id": 1, "timeout_s": -1}\n', "timeout_s must be a number"),
        (b'{"op": "prolog", "job_id": 1, "timeout_s": "5"}\n', "timeout_s must be a number"),
        (b'{"op": "prolog", "job_id": 1, "uid": "root"}\n', "uid must be an integer or null"),
        (b'{"op": "epilog", "job_id": 0}\n', "job_id must be a positive integer"),
    ],
)
def test_bad_requests_get_a_clear_answer_and_never_reach_the_agent(
    server: ControlServer, handler: RecordingHandler, line: bytes, complaint: str
) -> None:
    answer = ask(server, line)
    assert answer["ok"] is False
    assert answer["error"].startswith("bad request: ")
    assert complaint in answer["error"]
    assert handler.prologs == [] and handler.epilogs == []


def test_an_agent_failure_is_an_answer_not_a_crash(handler: RecordingHandler) -> None:
    handler.fail = LeaseError("executor did not stop", lease_id="l-9")
    server = ControlServer("/nonexistent/agent.sock", handler)
    answer = ask(server, {"op": "prolog", "job_id": 5})
    assert answer["ok"] is False
    assert "LeaseError" in answer["error"] and "l-9" in answer["error"]
    handler.fail = RuntimeError("bug")
    assert (
        "internal error: RuntimeError: bug" in ask(server, {"op": "prolog", "job_id": 5})["error"]
    )


def test_a_status_that_is_not_json_is_refused(
    server: ControlServer, handler: RecordingHandler
) -> None:
    handler.status_value = {"when": object()}
    answer = ask(server, {"op": "status"})
    assert answer["ok"] is False and "TypeError" in answer["error"]


def test_default_socket_matches_the_agent_config() -> None:
    assert AgentConfig().control_socket == DEFAULT_SOCKET


def test_socket_path_per_node() -> None:
    assert socket_path_for("/run/colocate/{node}.sock", "n2") == "/run/colocate/n2.sock"
    assert socket_path_for("/run/colocate/{node}.sock", None) == "/run/colocate/agent.sock"
    assert socket_path_for("/run/colocate/agent.sock", "n2") == "/run/colocate/agent.sock"


def test_resolve_uids_by_name_and_number() -> None:
    assert resolve_uids(["root", "12", 34]) == frozenset({0, 12, 34})
    with pytest.raises(ConfigError, match="does not exist on this node"):
        resolve_uids(["no-such-user-colocate"])


def test_an_unknown_eviction_time_still_goes_on_the_wire() -> None:
    class NanHandler(RecordingHandler):
        def on_prolog(self, request: PrologRequest, deadline: float) -> PrologResult:
            return PrologResult(evicted=("l-1",), waited_s=float("nan"))

    answer = ask(
        ControlServer("/nonexistent/agent.sock", NanHandler()), {"op": "prolog", "job_id": 3}
    )
    assert answer["ok"] is True and answer["waited_s"] is None and answer["evicted"] == ["l-1"]
