"""The agent takes the sample that confirms a job's growth a quarter interval after the one
that suggested it (issue 15: a job that starts using its lent core gets it back within 2 s),
over the real Agent and headroom policy (executors and monitor are in-memory stand-ins)."""

from __future__ import annotations

from policies.model import JobView, UsageSample
from tests.unit.test_slurm_agent import NOW, GiB, Monitored, lease, make_agent

BUSY_ONE = ((0, 0.98), (1, 0.0))


def _job(history: tuple[UsageSample, ...]) -> JobView:
    return JobView("7", frozenset({0, 1}), GiB, 100 * 1024**2, history, True, NOW - 120)


def _sample(t: float, wanted: float) -> UsageSample:
    return UsageSample(t, wanted, 100 * 1024**2, None, None, ((0, 1.0), (1, wanted - 1.0)))


def test_suspected_growth_brings_the_next_sample_forward_and_confirms_it() -> None:
    monitored = Monitored()
    steady = tuple(
        UsageSample(NOW - 60 + i, 0.98, 100 * 1024**2, None, None, BUSY_ONE) for i in range(61)
    )
    monitored.jobs = [_job(steady)]
    clock = [NOW]
    agent, _, executors = make_agent(monitored, clock)
    agent.tick()
    assert agent.report().cpu_ids == [1]
    lease(agent, "L", [1])
    agent.tick()
    assert agent._next_wait(1.0) == 1.0  # a steady job: the whole interval

    clock[0] = NOW + 1.0  # the job turned its second core on: one sample over the margin
    monitored.jobs = [_job((*steady, _sample(NOW + 1.0, 1.6)))]
    assert agent.tick() == []  # not confirmed by one sample: the lease stays
    assert agent._next_wait(1.0) == 0.25  # ... but the confirming sample comes sooner

    clock[0] = NOW + 1.25
    monitored.jobs = [_job((*steady, _sample(NOW + 1.0, 1.6), _sample(NOW + 1.25, 1.7)))]
    assert agent.tick() == ["L"]
    assert executors.evicted == [("L", "cpu_growth")]
    assert agent._next_wait(1.0) == 1.0  # nothing left to suspect


def test_a_noisy_reading_not_repeated_goes_back_to_the_whole_interval() -> None:
    monitored = Monitored()
    steady = tuple(
        UsageSample(NOW - 60 + i, 0.98, 100 * 1024**2, None, None, BUSY_ONE) for i in range(61)
    )
    monitored.jobs = [_job(steady)]
    clock = [NOW]
    agent, _, executors = make_agent(monitored, clock)
    agent.tick()
    lease(agent, "L", [1])
    clock[0] = NOW + 1.0  # one reading over the margin (1.4 > 1 kept + 0.3)
    monitored.jobs = [_job((*steady, _sample(NOW + 1.0, 1.4)))]
    agent.tick()
    assert agent._next_wait(1.0) == 0.25
    clock[0] = NOW + 1.25
    monitored.jobs = [_job((*steady, _sample(NOW + 1.0, 1.4), _sample(NOW + 1.25, 1.1)))]
    assert agent.tick() == [] and executors.evicted == []
    assert agent._next_wait(1.0) == 1.0
