"""A deny whose prolog never reached the agent (a flood, a restart) still holds: the agent
re-reads the hooks' job-choice files, and a running job with a lease on its cores loses it."""

from __future__ import annotations

import time
from pathlib import Path

from slurm_plugin.agent.slurm_control import SlurmControl
from slurm_plugin.hooks import JobChoice, forget_job_choice, record_job_choice
from tests.unit.test_slurm_agent import NOW, Monitored, idle_job, lease, make_agent, no_scontrol


def test_a_deny_left_in_a_choice_file_evicts_and_holds(tmp_path: Path) -> None:
    monitored, clock = Monitored(), [NOW]
    monitored.jobs = [idle_job("21", {0, 1})]
    agent, source, executors = make_agent(monitored, clock)
    agent.tick()
    assert agent.report().cpu_ids == [1]  # the job lends its idle core
    lease(agent, "l-1", [1])
    handler = SlurmControl(agent, source, no_scontrol(), tmp_path)
    assert handler.refresh_choices() == []
    # the job's prolog wrote its choice, then could not reach the agent
    record_job_choice(tmp_path, JobChoice(21, "deny", 1000, "n1", time.time()))
    assert handler.refresh_choices() == [21]
    assert handler.refresh_choices() == []  # learned once
    agent.tick()
    assert executors.evicted == [("l-1", "denied")]
    for _ in range(3):
        agent.tick()
        assert agent.report().cpu_ids == []
    forget_job_choice(tmp_path, 21, "n1")  # the epilog
    handler.refresh_choices()
    record_job_choice(tmp_path, JobChoice(21, "deny", 1000, "n1", time.time()))
    assert handler.refresh_choices() == [21]  # a job id seen again is read again


def test_the_watch_thread_wakes_the_agent_for_a_new_deny(tmp_path: Path) -> None:
    monitored, clock = Monitored(), [NOW]
    agent, source, _ = make_agent(monitored, clock)
    handler = SlurmControl(agent, source, no_scontrol(), tmp_path)
    handler.watch_choices(0.02)
    try:
        record_job_choice(tmp_path, JobChoice(22, "deny", 1000, "n1", time.time()))
        deadline = time.monotonic() + 5
        while source.monitored.colocate.get("22") is not False and time.monotonic() < deadline:
            time.sleep(0.01)
        assert source.monitored.colocate.get("22") is False
    finally:
        handler.close()
