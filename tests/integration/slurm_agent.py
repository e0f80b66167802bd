"""The Slurm-integrated agent on the dev cluster, as the integration tests start it: a broker
and ``colocate agent --config FILE --node N`` for one fake node as subprocesses on free ports
(temp state, its metrics on ``[agent] metrics_listen``), and helpers to find an idle node,
read a job's CPUs and lease the cores the agent offers.

Used by ``test_slurm_agent*.py`` and the "agent" run of ``test_prometheus.py``.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from colocate import LeaseDenied
from colocate.auth import ClientAuth
from colocate.client.lease import Client, Lease
from policies.prices import Prices
from slurm_plugin.control_client import call
from slurm_plugin.devcluster import CONTROL_SOCKET
from slurm_plugin.slurm.parse import parse_scontrol_job_detail
from tests.conftest import require
from tests.integration.conftest import SlurmCluster, slurm
from tests.integration.leasing import (
    Service,
    _launch,
    _ready,
    control_auth,
    free_port,
    wait_until,
)

MiB = 1024**2
INTERVAL_S = 0.5
MIN_HISTORY_S = 2.0
PYTHON = sys.executable

# A job that keeps its first core half busy (50 ms on, 50 ms off) and leaves the rest idle.
HALF_BUSY = (
    "import os, time\n"
    "os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
    "while True:\n"
    "    t = time.time()\n"
    "    while time.time() - t < 0.05: pass\n"
    "    time.sleep(0.05)\n"
)


def job_script(code: str) -> str:
    """A shell command running ``code`` with the test's Python (for ``sbatch --wrap``)."""
    return f"{PYTHON} -c {shlex.quote(code)}"


@dataclass
class SlurmAgent:
    """A running ``colocate agent --config`` for one dev-cluster node."""

    node: str
    service: Service
    broker: Service
    tmp: Path
    state_dir: str
    config: Path
    metrics_port: int

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def metrics(self) -> str:
        return httpx.get(self.metrics_url, timeout=5).text

    @property
    def socket(self) -> str:
        return CONTROL_SOCKET.replace("{node}", self.node)

    def status(self) -> dict[str, Any]:
        reply = call(self.socket, {"op": "status"}, 5.0)
        assert reply.ok, reply
        return dict(reply.body["status"])

    def evictions(self) -> list[dict[str, Any]]:
        reply = httpx.get(
            f"{self.service.url}/v1/evictions", auth=control_auth(self.tmp, self.node), timeout=5
        )
        reply.raise_for_status()
        return list(reply.json())

    def offer(self) -> tuple[list[int], int]:
        """The node's offer as the broker holds it: (CPU ids, memory bytes)."""
        nodes = httpx.get(f"{self.broker.url}/v1/status", timeout=5, auth=ClientAuth()).json()[
            "nodes"
        ]
        for node in nodes:
            if node["node"] == self.node:
                return list(node["cpu_ids"]), int(node["memory_bytes"])
        return [], 0


def _write_config(
    tmp: Path, metrics_port: int, prices: Prices | None, limits: Mapping[str, float] | None = None
) -> Path:
    path = tmp / "agent.toml"
    text = (
        "[agent]\n"
        f"interval_s = {INTERVAL_S}\n"
        f'control_socket = "{CONTROL_SOCKET}"\n'
        f'metrics_listen = "127.0.0.1:{metrics_port}"\n'
        'listen = "127.0.0.1:0"\n'
        "psi_groups = true\n"
        "[policy.limits]\n"
        f"min_history_s = {MIN_HISTORY_S}\n"
    ) + "".join(f"{key} = {value!r}\n" for key, value in (limits or {}).items())
    if prices is not None:
        text += "[prices]\n" + "".join(
            f"{key} = {value!r}\n".replace("'", '"') for key, value in prices.model_dump().items()
        )
    path.write_text(text)
    return path


def start_slurm_agent(
    tmp: Path,
    broker: Service,
    node: str,
    state_dir: str | None = None,
    *,
    prices: Prices | None = None,
    limits: Mapping[str, float] | None = None,
) -> SlurmAgent:
    """``colocate agent --config`` for ``node`` reporting to ``broker``; ``prices`` go in the
    config's ``[prices]`` (the defaults without), ``limits`` in ``[policy.limits]``."""
    state = state_dir or tempfile.mkdtemp(prefix=f"colocate-{node}-")
    metrics_port = free_port()
    config = _write_config(tmp, metrics_port, prices, limits)
    argv = [
        "agent", "--config", str(config), "--node", node, "--broker", broker.url,
        "--secret-file", str(tmp / "secret"), "--state-dir", state,
    ]  # fmt: skip
    log = tmp / f"agent-{node}-{time.monotonic_ns()}.log"
    service = _ready(f"agent {node}", _launch(argv, log), log)
    return SlurmAgent(node, service, broker, tmp, state, config, metrics_port)


def idle_node(cluster: SlurmCluster, cpus: int = 2, timeout_s: float = 120.0) -> str:
    """A node with ``cpus`` idle CPUs and no agent socket yet (others run tests too)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = slurm("sinfo", "-h", "-N", "-o", "%N %C").stdout
        # Last nodes first: standalone-agent tests elsewhere name their nodes n1 and n2, and
        # agents of one node name share the colocate/<node> cgroups.
        for line in reversed(out.splitlines()):
            name, _, counts = line.partition(" ")
            parts = counts.split("/")
            if (
                name in cluster.nodes
                and len(parts) == 4
                and int(parts[1]) >= cpus
                and not os.path.exists(CONTROL_SOCKET.replace("{node}", name))
            ):
                return name
        time.sleep(1.0)
    require(False, f"no dev-cluster node with {cpus} idle CPUs within {timeout_s:g} s")
    raise AssertionError("unreachable")


def agent_on_idle_node(
    tmp_path: Path,
    broker: Service,
    slurm_cluster: SlurmCluster,
    agent_on: dict[str, SlurmAgent],
    limits: Mapping[str, float] | None = None,
) -> SlurmAgent:
    """An agent on a node nobody else uses; other engineers' tests start agents too, so a
    node that was free a moment ago may be taken when ours starts: try another."""
    for _ in range(5):
        node = idle_node(slurm_cluster)
        try:
            agent = start_slurm_agent(tmp_path, broker, node, limits=limits)
        except AssertionError as exc:
            if "already serves this control socket" in str(exc):
                time.sleep(1.0)
                continue
            raise
        agent_on[node] = agent
        return agent
    raise AssertionError("every idle node was taken by another agent")


def job_cpus(job_id: str, node: str) -> frozenset[int]:
    """The CPU ids Slurm gave ``job_id`` on ``node`` (``scontrol -d show job``)."""
    text = slurm("scontrol", "-o", "-d", "show", "job", job_id).stdout
    for layout in parse_scontrol_job_detail(text).items:
        if layout.node == node:
            return frozenset(layout.cpu_ids)
    raise AssertionError(f"job {job_id}: no CPU_IDs on {node} in {text!r}")


def job_field(job_id: str, name: str) -> str:
    text = slurm("scontrol", "-o", "show", "job", job_id).stdout
    match = re.search(rf"\b{name}=(\S+)", text)
    return match.group(1) if match else ""


def lease_when_offered(
    broker: Service,
    agent: SlurmAgent,
    cores: int = 1,
    memory: int = 128 * MiB,
    timeout_s: float = 30.0,
) -> Lease:
    """The first lease the broker grants on ``agent``'s node once it offers ``cores``. The
    broker may still hold a report from before the last job started: the agent then denies
    and the lease is asked again after the next report."""
    wait_until(
        lambda: len(agent.offer()[0]) >= cores, timeout_s, f"{agent.node} to offer {cores} core(s)"
    )
    for _ in range(5):
        try:
            lease = Client(broker.url).lease(cores, memory, "5m")
            break
        except LeaseDenied:
            time.sleep(2 * INTERVAL_S)
    else:
        raise AssertionError(
            f"{agent.node} kept denying a lease of {cores} core(s), {memory} bytes"
        )
    assert lease.node == agent.node
    return lease
