"""The Client's automatic retry against a real broker that sheds load (503 + Retry-After)."""

from __future__ import annotations

import threading
from pathlib import Path

from colocate import LeaseDenied
from colocate.client.lease import Client
from tests.integration.leasing import services, start_agent, start_broker, wait_until


def test_a_burst_past_max_in_flight_is_served_by_retries_without_errors(tmp_path: Path) -> None:
    config = tmp_path / "broker.toml"
    config.write_text("[broker]\nmax_in_flight = 2\n")  # two requests at once, more get 503
    broker = start_broker(tmp_path, config=config)
    agent = start_agent(tmp_path, broker.url, node="retry1", cores=2, memory="1GiB")
    with services(broker, agent):
        clients = [Client(broker.url) for _ in range(4)]
        wait_until(lambda: clients[0].status().nodes, what="agent registration")
        errors: list[BaseException] = []
        go = threading.Barrier(len(clients))

        def call(client: Client) -> None:
            go.wait()
            try:  # a lease request awaits the agent's start: requests overlap
                with client.lease(cores=1, memory="32MiB", duration="30s"):
                    pass
            except LeaseDenied:
                pass  # an answer (two cores for four clients), not an error
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=call, args=(c,)) for c in clients]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        retried = sum(c.retried for c in clients)
        for client in clients:
            client.close()
        assert errors == []  # every call answered in the end
        assert retried >= 1  # ... and some only after the broker said "retry after 1 s"
        assert all(c.retried <= 2 * 3 for c in clients)  # bounded: 3 retries a call at most
