"""The accounting ledger survives a broker SIGKILL (issue 12): every closed lease is still in
``colocate usage`` afterwards, open ones with their use up to within one report interval of
the kill, and the restarted broker knows their owners again (from the ledger)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from colocate import Client
from tests.integration.leasing import free_port, services, start_agent, start_broker, wait_until

pytestmark = [pytest.mark.root, pytest.mark.slow]
ROOT = str(Path(__file__).resolve().parents[2])
INTERVAL_S = 0.2


def usage(url: str) -> list[dict[str, object]]:
    done = subprocess.run(
        [sys.executable, "-m", "colocate", "usage", "--broker", url, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    return list(json.loads(done.stdout)["records"])


def test_broker_sigkill_in_the_middle_of_20_leases_loses_no_closed_lease(tmp_path: Path) -> None:
    port = free_port()
    broker = start_broker(tmp_path, listen=f"127.0.0.1:{port}")
    agent = start_agent(
        tmp_path, broker.url, node="ledger1", cores=2, memory="2GiB", interval_s=INTERVAL_S
    )
    with services(agent):
        closed: list[str] = []
        with Client(broker.url) as client:
            wait_until(lambda: client.status().nodes, what="agent registration")
            for _ in range(18):
                lease = client.lease(cores=1, memory="128MiB", duration="1m")
                lease.release()
                closed.append(lease.lease_id)
            still_open = [
                client.lease(cores=1, memory="128MiB", duration="2m").lease_id for _ in range(2)
            ]
        time.sleep(3 * INTERVAL_S)  # the agent reports them running a few times
        broker.stop(signal.SIGKILL)
        killed_at = time.time()

        broker = start_broker(tmp_path, listen=f"127.0.0.1:{port}")
        with services(broker):
            records = {r["lease_id"]: r for r in usage(broker.url)}
            assert set(closed) | set(still_open) <= set(records)
            for lease_id in closed:
                row = records[lease_id]
                assert row["end_reason"] == "released" and row["end"] is not None
                assert row["cores"] == 1 and float(row["core_seconds"]) > 0  # type: ignore[arg-type]
            for lease_id in still_open:
                row = records[lease_id]
                assert row["end"] is None
                # used until within one report interval (plus scheduling slack) of the kill
                assert float(row["last_seen"]) >= killed_at - INTERVAL_S - 1.0  # type: ignore[arg-type]
            with Client(broker.url) as client:
                wait_until(
                    lambda: {le.lease_id for le in client.leases()} == set(still_open),
                    what="leases relearned",
                )
                owners = {le.lease_id: le.user for le in client.leases()}
                assert set(owners.values()) == {"root"}  # the owner came back from the ledger
                for lease_id in still_open:
                    assert client.release(lease_id) is True
            after = {r["lease_id"]: r for r in usage(broker.url)}
            assert all(after[i]["end_reason"] == "released" for i in still_open)
        assert "Traceback" not in broker.logs(), broker.logs()
