"""The Slurm-integrated agent without Slurm: the node source's prolog/epilog overlay and the
control handler's answers, over the real Agent and headroom policy (executors and the
monitor's sampler are in-memory stand-ins)."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field

from colocate.broker.api import StartRequest
from colocate.lease_value import LeaseValue
from policies import get_policy
from policies.limits import Limits
from policies.model import JobView, NodeView, UsageSample
from slurm_plugin.agent.agent import Agent
from slurm_plugin.agent.slurm_control import SlurmControl
from slurm_plugin.agent.slurm_node import SlurmNode
from slurm_plugin.control import EpilogRequest, PrologRequest
from slurm_plugin.slurm.cli import CliSlurm

GiB = 1024**3
NOW = 1_800_000_000.0


@dataclass
class Handle:
    lease_id: str
    address: str = "tcp://127.0.0.1:1"
    pids: tuple[int, ...] = (1,)
    cpu_ids: tuple[int, ...] = ()
    memory_bytes: int = 0
    expires_at: float = 0.0
    adopted: bool = False


@dataclass
class Executors:
    """Executors that start and stop at once; records what was evicted and why."""

    running: dict[str, Handle] = field(default_factory=dict)
    evicted: list[tuple[str, str]] = field(default_factory=list)

    detached = False

    def start(self, lease: LeaseValue) -> Handle:
        self.running[lease.lease_id] = Handle(
            lease.lease_id, cpu_ids=lease.cpu_ids, expires_at=lease.expires_at
        )
        return self.running[lease.lease_id]

    def renew(self, lease_id: str, expires_at: float) -> None:
        pass

    def drain_invocations(self) -> list[dict[str, object]]:
        return []

    def evict(self, lease_id: str, grace_s: float = 0.0, reason: str = "evicted") -> float:
        self.running.pop(lease_id, None)
        self.evicted.append((lease_id, reason))
        return 0.001

    def handles(self) -> list[Handle]:
        return list(self.running.values())

    def exited(self) -> dict[str, tuple[int, ...]]:
        return {}

    def adopt_or_cleanup(self) -> list[str]:
        return []

    def close(self) -> None:
        pass


class Sampler:
    def close(self) -> None:
        pass


class Monitored:
    """What the monitor would report: two cores, 4 GiB, the jobs the test puts in ``jobs``."""

    def __init__(self) -> None:
        self.node = "n1"
        self.colocate: dict[str, bool] = {}
        self.default_colocate = True
        self.last_snapshot = None
        self.sampler = Sampler()
        self.jobs: list[JobView] = []

    def view(self, now: float | None = None) -> NodeView:
        jobs = tuple(
            JobView(
                j.job_id,
                j.cpu_ids,
                j.memory_allocated_bytes,
                j.memory_peak_bytes,
                j.history,
                self.colocate.get(j.job_id, self.default_colocate),
                j.start_time,
            )
            for j in self.jobs
        )
        return NodeView("n1", frozenset({0, 1}), 4 * GiB, jobs)


def idle_job(job_id: str, cpus: set[int], now: float = NOW) -> JobView:
    history = tuple(UsageSample(now - 60 + i, 0.1, 100 * 1024**2) for i in range(60))
    return JobView(job_id, frozenset(cpus), GiB, 100 * 1024**2, history, True, now - 120)


def scontrol(job_id: str, cpus: str, mem_mb: int) -> CliSlurm:
    def runner(argv: Sequence[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
        text = f"JobId={job_id} JobName=x Nodes=n1 CPU_IDs={cpus} Mem={mem_mb} GRES=\n"
        return subprocess.CompletedProcess(list(argv), 0, text, "")

    return CliSlurm(runner=runner)


def no_scontrol() -> CliSlurm:
    def runner(argv: Sequence[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(
            list(argv), 1, "", "slurm_load_jobs error: Unable to contact slurm controller"
        )

    return CliSlurm(runner=runner)


def make_agent(monitored: Monitored, clock: list[float]) -> tuple[Agent, SlurmNode, Executors]:
    source = SlurmNode(monitored)  # type: ignore[arg-type]
    executors = Executors()
    agent = Agent(
        source,
        get_policy("headroom"),
        executors,
        secret=b"s" * 32,
        url="http://a",
        broker_url="http://b",
        limits=Limits(min_history_s=10.0),
        clock=lambda: clock[0],
    )
    return agent, source, executors


def lease(agent: Agent, lease_id: str, cpus: list[int], memory: int = 256 * 1024**2) -> None:
    agent.start_lease(
        StartRequest(
            lease_id=lease_id,
            cpu_ids=cpus,
            memory_bytes=memory,
            granted_at=NOW,
            expires_at=NOW + 600,
        )
    )


def test_a_job_idle_core_is_offered_and_a_starting_job_takes_the_unallocated_one_back() -> None:
    monitored, clock = Monitored(), [NOW]
    monitored.jobs = [idle_job("10", {0})]
    agent, source, executors = make_agent(monitored, clock)
    agent.tick()
    assert agent.report().cpu_ids == [
        1
    ]  # core 0 is the job's (it keeps one core), core 1 unallocated
    lease(agent, "l-1", [1])
    handler = SlurmControl(agent, source, scontrol("11", "1", 512))
    result = handler.on_prolog(PrologRequest(job_id=11, node="n1"), deadline=1e18)
    assert result.evicted == ("l-1",) and result.complete
    assert executors.evicted == [("l-1", "job_start")]
    assert agent.report().cpu_ids == []
    assert agent.recent_evictions()[-1]["reason"] == "job_start"


def test_the_starting_job_lends_nothing_until_sampled_after_its_prolog() -> None:
    monitored, clock = Monitored(), [NOW]
    agent, source, _ = make_agent(monitored, clock)
    handler = SlurmControl(agent, source, scontrol("12", "0-1", 1024))
    handler.on_prolog(PrologRequest(job_id=12, node="n1"), deadline=1e18)
    assert agent.report().cpu_ids == []
    # The monitor now lists the job, with history only from before the prolog (a requeue):
    monitored.jobs = [idle_job("12", {0, 1}, now=NOW - 1000)]
    agent.tick()
    assert agent.report().cpu_ids == []
    # Sampled since: it is an ordinary job that keeps one core and lends the other.
    clock[0] = NOW + 100
    monitored.jobs = [idle_job("12", {0, 1}, now=NOW + 100)]
    agent.tick()
    assert agent.report().cpu_ids == [1]


def test_without_slurms_answer_the_prolog_evicts_every_lease() -> None:
    monitored, clock = Monitored(), [NOW]
    agent, source, executors = make_agent(monitored, clock)
    agent.tick()
    lease(agent, "l-a", [0])
    lease(agent, "l-b", [1])
    result = SlurmControl(agent, source, no_scontrol()).on_prolog(
        PrologRequest(job_id=13, node="n1"), 1e18
    )
    assert sorted(result.evicted) == ["l-a", "l-b"]
    assert sorted(executors.evicted) == [("l-a", "job_start"), ("l-b", "job_start")]
    assert agent.report().cpu_ids == []


def test_deny_from_the_prolog_keeps_the_job_to_itself() -> None:
    monitored, clock = Monitored(), [NOW]
    agent, source, _ = make_agent(monitored, clock)
    SlurmControl(agent, source, scontrol("14", "0-1", 1024)).on_prolog(
        PrologRequest(job_id=14, colocate="deny", node="n1"), 1e18
    )
    clock[0] = NOW + 100
    monitored.jobs = [idle_job("14", {0, 1}, now=NOW + 100)]
    for _ in range(3):
        agent.tick()
        assert agent.report().cpu_ids == []


def test_the_epilog_offers_the_ended_jobs_cores_at_once() -> None:
    monitored, clock = Monitored(), [NOW]
    monitored.jobs = [
        JobView("15", frozenset({0, 1}), 2 * GiB, start_time=NOW)
    ]  # no history: lends nothing
    agent, source, _ = make_agent(monitored, clock)
    agent.tick()
    assert agent.report().cpu_ids == []
    answer = SlurmControl(agent, source, scontrol("15", "0-1", 2048)).on_epilog(
        EpilogRequest(job_id=15, node="n1")
    )
    # Slurm still lists the job (COMPLETING): the epilog's word wins.
    assert answer.offered_cores == 2
    assert agent.report().cpu_ids == [0, 1]
    monitored.jobs = []
    agent.tick()
    assert source.ended_jobs() == frozenset()


def test_a_hook_for_another_node_changes_nothing() -> None:
    monitored, clock = Monitored(), [NOW]
    agent, source, executors = make_agent(monitored, clock)
    agent.tick()
    lease(agent, "l-c", [1])
    result = SlurmControl(agent, source, scontrol("16", "1", 512)).on_prolog(
        PrologRequest(job_id=16, node="n2"), 1e18
    )
    assert result.evicted == () and executors.evicted == []
