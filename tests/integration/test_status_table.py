"""``colocate status`` as an operator reads it: counts under CORES/FREE, CPU ids under CPU IDS."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from colocate.client.lease import Client
from tests.integration.leasing import Service, services, start_cluster

pytestmark = pytest.mark.slow


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Service]:
    broker, (agent,) = start_cluster(tmp_path, {"st1": (2, "1GiB")})
    with services(broker, agent):
        yield broker


def _status_rows(url: str) -> list[list[str]]:
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-m", "colocate", "status", "--broker", url],
        capture_output=True, text=True, timeout=60, cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return [line.split() for line in done.stdout.splitlines() if line.strip()]


def test_status_counts_cores_and_lists_cpu_ids_under_their_own_headers(broker: Service) -> None:
    with Client(broker.url).lease(cores=1, memory="64MiB", duration="2m") as lease:
        (leased,) = lease.cpu_ids
        rows = _status_rows(broker.url)
    node_header = next(r for r in rows if r[0] == "NODE")
    lease_header = next(r for r in rows if r[0] == "LEASE")
    node_row = next(r for r in rows if r[0] == "st1")
    lease_row = next(r for r in rows if r[0] == lease.lease_id)
    assert node_header[:6] == ["NODE", "STATE", "CORES", "FREE", "FREE", "CPU"]
    # 2 cores offered, 1 free: the one not leased, by its kernel id.
    assert node_row[1:5] == ["up", "2", "1", str(({0, 1} - {leased}).pop())]
    assert lease_header[:5] == ["LEASE", "NODE", "CORES", "CPU", "IDS"]
    assert lease_row[1:4] == ["st1", "1", str(leased)]
