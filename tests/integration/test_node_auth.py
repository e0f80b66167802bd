"""Agents authenticate per node (issue 12): an agent holding only its node's key file serves
leases; the same file on another node cannot register it; a captured report cannot be
replayed; the per-account totals of the ledger reach /metrics."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pytest

from colocate import Client
from colocate.auth.node import node_key_file, sign
from colocate.broker.secret import load_or_create_secret
from tests.integration.leasing import (
    node_registered,
    services,
    start_agent,
    start_broker,
    wait_until,
)

pytestmark = [pytest.mark.root]


def key_file_dir(tmp: Path, name: str, text: str) -> Path:
    where = tmp / name
    where.mkdir()
    fd = os.open(where / "secret", os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    return where


def test_an_agent_with_only_its_node_key_serves_and_another_node_cannot_use_it(
    tmp_path: Path,
) -> None:
    broker = start_broker(tmp_path)
    secret = load_or_create_secret(tmp_path / "secret")
    keyed = key_file_dir(tmp_path, "keyed", node_key_file(secret, "keyed"))
    thief = key_file_dir(
        tmp_path, "thief", node_key_file(secret, "keyed")
    )  # keyed's file, on another node
    agent = start_agent(keyed, broker.url, node="keyed", cores=1, memory="1GiB")
    impostor = start_agent(thief, broker.url, node="other", cores=1, memory="1GiB")
    with services(broker, agent, impostor):
        wait_until(lambda: node_registered(broker.url, "keyed"), what="agent registration")
        with (
            Client(broker.url) as client,
            client.lease(cores=1, memory="256MiB", duration="1m", account="acct1") as lease,
        ):
            assert lease.node == "keyed"
            assert lease.executor().invoke("math:factorial", 5) == 120
        time.sleep(1.0)  # several report intervals
        assert not node_registered(broker.url, "other")
        assert (
            "401" in impostor.logs()
            or "Unauthorized" in impostor.logs()
            or "does not match" in impostor.logs()
        )
        metrics = httpx.get(f"{broker.url}/metrics/").text
        assert 'colocate_account_core_seconds_total{account="acct1"}' in metrics


def test_a_captured_agent_report_cannot_be_replayed(tmp_path: Path) -> None:
    broker = start_broker(tmp_path)
    secret = load_or_create_secret(tmp_path / "secret")
    with services(broker):
        body = (
            b'{"url": "http://127.0.0.1:9", "cpu_ids": [0], "memory_bytes": 1024, "generation": 0}'
        )
        from colocate.auth.node import node_key

        headers = {
            **sign(node_key(secret, "n9"), "n9", "PUT", "/v1/nodes/n9", body),
            "content-type": "application/json",
        }
        first = httpx.put(f"{broker.url}/v1/nodes/n9", content=body, headers=headers)
        assert first.status_code == 200, first.text
        again = httpx.put(f"{broker.url}/v1/nodes/n9", content=body, headers=headers)
        assert again.status_code == 401 and "replayed" in again.json()["message"]
        other = httpx.put(
            f"{broker.url}/v1/nodes/n8", content=body, headers=headers
        )  # n9's signature for n8
        assert other.status_code == 401 and "not by n8" in other.json()["message"]
