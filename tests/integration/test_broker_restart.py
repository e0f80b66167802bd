"""Soft state: a broker killed and restarted learns the live leases again from the agents'
reports; invocations never needed it; renew and release work on the re-learned leases."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import cloudpickle
import pytest

from colocate import BackendUnavailable, Client, LeaseDenied
from tests.integration.leasing import (
    node_registered,
    services,
    start_agent,
    start_broker,
    wait_until,
)

pytestmark = pytest.mark.slow
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers run as nobody


def double(x: int) -> int:
    return 2 * x


def test_restarted_broker_knows_live_leases_and_invocations_continue(tmp_path: Path) -> None:
    broker = start_broker(tmp_path)
    agent = start_agent(tmp_path, broker.url, node="n1", cores=2, memory="2GiB")
    with services(agent):
        wait_until(lambda: node_registered(broker.url, "n1"), what="agent registration")
        client = Client(broker.url)
        lease = client.lease(cores=1, memory="256MiB", duration="1m")
        ex = lease.executor()
        assert ex.invoke(double, 21) == 42

        broker.stop(signal.SIGKILL)  # no goodbye: all its state is lost
        assert ex.invoke(double, 1) == 2  # the invocation path never touches the broker
        with pytest.raises(BackendUnavailable, match=broker.url):
            client.lease(cores=1, memory="256MiB", duration="1m")

        port = broker.url.rsplit(":", 1)[1]
        restarted = start_broker(tmp_path, listen=f"127.0.0.1:{port}")
        with services(restarted):

            def relearned() -> bool:
                return [le.lease_id for le in client.status().leases] == [lease.lease_id]

            wait_until(relearned, timeout_s=10, what="the agent to re-report its lease")
            known = client.status().leases[0]
            assert (known.cpu_ids, known.address) == (list(lease.cpu_ids), lease.address)
            assert known.expires_at == pytest.approx(lease.expires_at, abs=0.01)

            # The re-learned lease still holds its core: only the other one is free.
            with client.lease(cores=1, memory="256MiB", duration="1m") as other:
                assert set(other.cpu_ids).isdisjoint(lease.cpu_ids)
                with pytest.raises(LeaseDenied):
                    client.lease(cores=1, memory="256MiB", duration="1m")

            assert [ex.submit(double, i).result(timeout=10) for i in range(3)] == [0, 2, 4]
            lease.renew(duration=120)
            assert lease.remaining_s > 100
            lease.release()
            assert client.status().leases == []
            node = client.status().nodes[0]
            assert len(node.free_cpu_ids) == 2
        assert "Traceback" not in restarted.logs(), restarted.logs()
    assert "Traceback" not in agent.logs(), agent.logs()
