"""The agent's seams (issue 16 item 4): sampling happens outside the lock the prolog needs,
and the monitor's snapshot (what the metrics show) carries each job's ``--colocate`` choice.

Real Agent, SlurmNode, SlurmControl and headroom policy; the first test's monitor is the
in-memory stand-in of test_slurm_agent (made slow), the second a real Sampler over the
committed cgroup v1 fixture tree with an in-memory Slurm.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

from colocate.metrics import AgentMetrics, render
from monitors.cgroup_v1 import CgroupV1Source
from monitors.sampler import Sampler
from monitors.view import MonitoredNode
from policies import get_policy
from policies.limits import Limits
from policies.model import NodeView
from policies.prices import Prices
from slurm_plugin.agent.agent import Agent
from slurm_plugin.agent.slurm_control import SlurmControl
from slurm_plugin.agent.slurm_node import SlurmNode
from slurm_plugin.control import PrologRequest
from slurm_plugin.hooks import JobChoice, record_job_choice
from slurm_plugin.slurm import JobOnNode, JobState, NodeInfo, NodeState, StaticSlurm
from tests.unit.test_slurm_agent import (
    NOW,
    Executors,
    Monitored,
    idle_job,
    lease,
    make_agent,
    scontrol,
)

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "cgroup"
GIB = 1024**3
SLOW_SAMPLE_S = 2.0


class SlowMonitored(Monitored):
    """A monitor whose sample takes ``delay`` seconds (a slow cgroup tree, a slow Slurm)."""

    def __init__(self) -> None:
        super().__init__()
        self.delay = 0.0
        self.sampling = threading.Event()

    def view(self, now: float | None = None) -> NodeView:
        if self.delay:
            self.sampling.set()
            time.sleep(self.delay)
        return super().view(now)


def test_a_prolog_during_a_slow_sample_is_answered_without_waiting_for_it() -> None:
    monitored, clock = SlowMonitored(), [NOW]
    monitored.jobs = [idle_job("10", {0})]
    agent, source, executors = make_agent(monitored, clock)
    agent.tick()
    assert agent.report().cpu_ids == [1]
    lease(agent, "l-1", [1])
    handler = SlurmControl(agent, source, scontrol("11", "1", 512))

    monitored.delay = SLOW_SAMPLE_S
    loop = threading.Thread(target=agent.tick)  # the agent loop's sampling decision
    loop.start()
    assert monitored.sampling.wait(5.0)
    started = time.monotonic()
    result = handler.on_prolog(PrologRequest(job_id=11, node="n1"), deadline=1e18)
    answered_s = time.monotonic() - started
    assert loop.is_alive()  # the sample was still running when the prolog got its answer
    loop.join()

    assert answered_s < 0.5, f"the prolog waited {answered_s:.2f} s for the sample"
    assert result.evicted == ("l-1",) and executors.evicted == [("l-1", "job_start")]
    # The loop's decision, made after its (older) sample, still knows job 11 holds core 1.
    assert agent.report().cpu_ids == []


class _Node:
    """Node n1 with Slurm job 10 (2 cores, 1 GiB) and a copy of its cgroup v1 tree."""

    def __init__(self, tmp: Path) -> None:
        root = tmp / "cg"
        shutil.copytree(FIX / "v1", root)
        job = JobOnNode(
            "10", "root", 0, "n1", JobState.RUNNING, 2, (0, 1), GIB, 900.0, nodes=("n1",)
        )
        slurm = StaticSlurm(
            nodes=[NodeInfo("n1", NodeState.MIXED, cpus=2, real_memory_bytes=4 * GIB)],
            jobs=[job],
        )
        self.sampler = Sampler(
            "n1", slurm, CgroupV1Source(root, proc=FIX / "proc"), proc=FIX / "proc"
        )


def test_the_snapshot_and_metrics_carry_the_deny_read_from_the_choice_file(
    tmp_path: Path,
) -> None:
    node = _Node(tmp_path)
    source = SlurmNode(MonitoredNode(node.sampler))
    metrics = AgentMetrics("n1", Prices())
    agent = Agent(
        source,
        get_policy("headroom"),
        Executors(),
        secret=b"s" * 32,
        url="http://a",
        broker_url="http://b",
        limits=Limits(min_history_s=10.0),
        metrics=metrics,
    )
    choices = tmp_path / "jobs"
    choices.mkdir()
    handler = SlurmControl(agent, source, scontrol("10", "0-1", 1024), choices)
    try:
        agent.tick()
        job = source.last_snapshot.jobs[0] if source.last_snapshot else None
        assert job is not None and job.job_id == "10" and job.colocate  # the site default
        assert (
            'colocate_job_info{colocate="allow",job_id="10",node="n1"'
            in render(metrics.registry).decode()
        )

        # The job said --colocate=deny; its prolog only left the choice file.
        record_job_choice(choices, JobChoice(10, "deny", 0, "n1", time.time()))
        assert handler.refresh_choices() == [10]
        agent.tick()
        job = source.last_snapshot.jobs[0] if source.last_snapshot else None
        assert job is not None and not job.colocate
        assert job.to_json()["colocate"] is False  # `colocate monitor --json` says so too
        scraped = render(metrics.registry).decode()
        assert 'colocate_job_info{colocate="deny",job_id="10",node="n1"' in scraped
        assert 'colocate="allow",job_id="10"' not in scraped
    finally:
        handler.close()
        source.close()
        metrics.close()
