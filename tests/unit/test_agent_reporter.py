"""Reports only on change plus heartbeats (issue 13): a real Agent and its Reporter talking to
a real broker app in-process (Starlette's TestClient is the HTTP client; executors are the
in-memory stand-ins of test_slurm_agent)."""

from __future__ import annotations

import time

from fastapi.testclient import TestClient

from colocate.auth.node import NodeAuth, node_key
from colocate.broker import Broker
from colocate.broker.app import create_app
from colocate.config import BrokerConfig
from policies import get_policy
from slurm_plugin.agent.agent import Agent
from slurm_plugin.agent.node_source import StandaloneNode
from tests.unit.test_slurm_agent import Executors, lease

SECRET = b"k" * 32
GiB = 1024**3
INTERVAL_S = 0.01  # heartbeats every 4 intervals: 40 ms


def setup(broker: Broker) -> tuple[Agent, StandaloneNode, TestClient, list[str]]:
    source = StandaloneNode("n1", frozenset({0, 1}), 4 * GiB)
    agent = Agent(
        source, get_policy("unallocated"), Executors(), secret=node_key(SECRET, "n1"),
        url="http://127.0.0.1:9", broker_url="http://testserver", interval_s=INTERVAL_S,
    )  # fmt: skip
    http = TestClient(create_app(broker))
    http.auth = NodeAuth(node_key(SECRET, "n1"), "n1")
    paths: list[str] = []
    http.event_hooks = {"request": [lambda request: paths.append(request.url.path)]}
    return agent, source, http, paths


def steps(agent: Agent, http: TestClient, n: int) -> None:
    for _ in range(n):
        agent.tick()
        agent.reporter.step(http, False)
        time.sleep(INTERVAL_S * 1.5)


def test_an_unchanged_node_sends_heartbeats_and_a_change_goes_in_full_at_once() -> None:
    broker = Broker(BrokerConfig(), SECRET)
    agent, source, http, paths = setup(broker)
    with http:
        steps(agent, http, 12)
        full, alive = "/v1/nodes/n1", "/v1/nodes/n1/alive"
        assert paths[0] == full and paths.count(full) == 1, paths  # nothing changed since
        assert paths.count(alive) >= 2, paths  # ... but the broker still hears from the node
        seen = broker.book.node("n1")
        assert seen is not None and seen.cpu_ids == {0, 1}
        before = seen.reported_at
        steps(agent, http, 6)
        after = broker.book.node("n1")
        assert after is not None and after.reported_at > before  # heartbeats keep it alive

        source.cpu_ids = frozenset({0})  # the node took a core back
        paths.clear()
        steps(agent, http, 1)
        assert paths == [full]
        changed = broker.book.node("n1")
        assert changed is not None and changed.cpu_ids == {0}


def test_a_restarted_broker_gets_the_full_report_at_the_next_heartbeat() -> None:
    agent, _, http, _ = setup(Broker(BrokerConfig(), SECRET))
    with http:
        steps(agent, http, 2)
    fresh = Broker(BrokerConfig(), SECRET)  # same URL, empty book
    http2 = TestClient(create_app(fresh))
    http2.auth = http.auth
    with http2:
        steps(agent, http2, 8)
    assert fresh.book.node("n1") is not None  # heartbeat answered unknown -> full report


def test_a_release_the_agent_missed_reaches_it_through_the_next_heartbeat() -> None:
    """The broker released a lease but could not reach the agent: the node's next heartbeat
    is answered unknown, and the full report's reply tells the agent to stop the lease."""
    broker = Broker(BrokerConfig(agent_timeout_s=0.5), SECRET)
    agent, _, http, _ = setup(broker)
    with http:
        agent.tick()
        lease(agent, "l-missed", [1])
        steps(agent, http, 2)
        assert broker.book.lease("l-missed") is not None
        released = http.portal.call(broker.release, "l-missed")  # the agent URL is dead
        assert released.released and agent.report().leases  # the agent still runs it
        steps(agent, http, 8)
        assert agent.report().leases == []


def test_heartbeats_take_the_fast_path_and_bad_ones_get_the_usual_errors() -> None:
    broker = Broker(BrokerConfig(), SECRET)
    agent, _, http, _ = setup(broker)
    with http:
        steps(agent, http, 1)  # registered
        ok = http.put("/v1/nodes/n1/alive", json={"instance": agent.instance, "generation": 0})
        assert ok.status_code == 200 and ok.json() == {"known": True}
        stranger = http.put("/v1/nodes/n1/alive", json={"instance": "other", "generation": 0})
        assert stranger.json() == {"known": False}  # another agent run: send the full report
        unsigned = TestClient(create_app(broker)).put(
            "/v1/nodes/n1/alive", json={"instance": agent.instance, "generation": 0}
        )
        assert unsigned.status_code == 401 and unsigned.json()["error"] == "Unauthorized"
        bad = http.put("/v1/nodes/n1/alive", json={"instance": agent.instance})
        assert bad.status_code == 400 and "generation" in bad.json()["message"]
        other = http.put("/v1/nodes/n2/alive", json={"instance": "", "generation": 0})
        assert other.status_code == 401  # signed by n1: a node speaks only for itself


def test_a_hung_broker_slows_neither_the_loop_nor_the_other_broker() -> None:
    """Two brokers: one a real listening socket that never answers (the kernel accepts the
    connection, nobody reads it), the other a real broker app served over HTTP. The agent's
    steps return at once, the live broker gets the report and then a change within an
    interval or two, and the hung one is marked down after its request timed out."""
    import socket
    import threading

    import uvicorn

    from colocate.broker.service import bind, url_of

    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(16)
    broker = Broker(BrokerConfig(), SECRET)
    sock = bind("127.0.0.1:0", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(broker), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    source = StandaloneNode("n1", frozenset({0, 1}), 4 * GiB)
    interval = 0.05
    agent = Agent(
        source, get_policy("unallocated"), Executors(), secret=node_key(SECRET, "n1"),
        url="http://127.0.0.1:9",
        broker_url=f"http://127.0.0.1:{hung.getsockname()[1]},{url_of(sock)}",
        interval_s=interval,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        slowest = 0.0
        with agent.reporter.client(timeout_s=2.0) as http:  # the hung broker holds 2 s a try

            def run(seconds: float) -> None:
                nonlocal slowest
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    agent.tick()
                    began = time.monotonic()
                    agent.reporter.step(http, False)
                    slowest = max(slowest, time.monotonic() - began)
                    time.sleep(interval)

            run(1.0)
            seen = broker.book.node("n1")
            assert seen is not None and seen.cpu_ids == {0, 1}  # the live broker has it
            source.cpu_ids = frozenset({0})  # a change, while the hung request is pending
            run(1.0)
            changed = broker.book.node("n1")
            assert changed is not None and changed.cpu_ids == {0}
            run(2.0)
            hung_broker, live_broker = agent.reporter.brokers
            assert hung_broker.down_since is not None  # timed out: marked down
            assert live_broker.down_since is None
        assert slowest < 0.5, slowest  # a step never waits for the hung broker's 2 s
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
        hung.close()
