"""AgentMetrics as an agent uses it: served over HTTP, fed from a policy view and real executors."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from colocate.errors import ConfigError
from colocate.metrics import AgentMetrics
from policies.model import LeaseView, Offer
from policies.prices import Prices
from slurm_plugin.agent.node_source import StandaloneNode

MIB = 1024**2


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(url, timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_an_agent_cycle_shows_up_on_the_metrics_port() -> None:
    node = StandaloneNode.from_machine("standalone-1", cores=1, memory_bytes=512 * MIB)
    metrics = AgentMetrics(node.node, Prices(), listen="127.0.0.1:0")
    workers = [
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(2)
    ]
    try:
        assert metrics.server is not None
        now = time.time()
        leases = [
            LeaseView("L1", frozenset(node.cpu_ids), 128 * MIB, now, now + 60),
            LeaseView("L2", frozenset(), 64 * MIB, now, now + 60),
        ]
        executors = [("L1", (workers[0].pid,)), ("L2", (workers[1].pid,))]
        offer = Offer(frozenset(node.cpu_ids), 256 * MIB)
        metrics.observe(
            node.view(now), offer, leases, executors=executors, evicting={"L2"}, now=now
        )
        metrics.observe(
            node.view(now + 1), offer, leases, executors=executors, evicting={"L2"}, now=now + 1
        )
        metrics.evicted("pressure", 0.004)
        metrics.cold_start(0.03)
        metrics.invocation("ok", 0.0002)
        s = scrape(metrics.server.url)
        lab = (("node", "standalone-1"),)
        assert s[("colocate_node_cores", (*lab, ("state", "offered")))] == 1
        assert s[("colocate_node_memory_bytes", (*lab, ("state", "leased")))] == 192 * MIB
        assert s[("colocate_leases", (*lab, ("state", "evicting")))] == 1
        assert s[("colocate_executors", (*lab, ("state", "stopping")))] == 1
        assert s[("colocate_node_memory_bytes", (*lab, ("state", "used_by_functions")))] > 0
        assert s[("colocate_evictions_total", (*lab, ("reason", "pressure")))] == 1
        assert s[("colocate_cold_starts_total", lab)] == 1
        # One second of the whole (unallocated) standalone core and memory, and the lease.
        assert s[("colocate_recovered_core_seconds_total", lab)] == pytest.approx(1.0)
        assert s[
            ("colocate_wasted_core_seconds_total", (*lab, ("state", "unallocated")))
        ] == pytest.approx(1.0)
        # Odd input never takes the agent down; the last good state stays exported.
        metrics.observe(None, offer, leases, now=now + 2)  # type: ignore[arg-type]
        assert (
            scrape(metrics.server.url)[("colocate_node_cores", (*lab, ("state", "offered")))] == 1
        )
    finally:
        metrics.close()
        for w in workers:
            w.kill()
            w.wait()


def test_a_bad_or_taken_listen_address_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="metrics_listen"):
        AgentMetrics("n", Prices(), listen="nonsense")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match="choose a free port"):
            AgentMetrics("n", Prices(), listen=f"127.0.0.1:{port}")
