"""The Slurm-integrated agent's fate does not reach the node's jobs (issues 14 and 15).

On the dev cluster (real slurmctld/slurmd, the prolog wrappers, cgroups): after ``kill -9`` of
the agent, a job started on the leased cores gets them (its prolog frees them itself); a
restarted agent adopts a still-valid executor, whose client sees no error; and a flood of
the control socket by an unprivileged user neither loses a prolog's eviction nor a ``deny``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import httpx
import pytest

from colocate.auth import ClientAuth
from tests.integration.conftest import JobSubmitter, SlurmCluster
from tests.integration.leasing import Service, unix_users, wait_until
from tests.integration.slurm_agent import (
    SlurmAgent,
    agent_on_idle_node,
    job_cpus,
    job_script,
    lease_when_offered,
    start_slurm_agent,
)

pytestmark = [pytest.mark.slurm, pytest.mark.root, pytest.mark.slow]
cloudpickle.register_pickle_by_value(sys.modules[__name__])

SLEEP = "import time\ntime.sleep(600)\n"


def add(a: int, b: int) -> int:
    return a + b


def lease_processes(node: str, lease_id: str) -> tuple[list[Path], list[int]]:
    """The lease's cgroup directories and the host pids in them."""
    dirs = [d for d in Path("/sys/fs/cgroup").glob(f"*/colocate/{node}/{lease_id}") if d.is_dir()]
    pids: set[int] = set()
    for d in dirs:
        try:
            pids.update(int(p) for p in (d / "cgroup.procs").read_text().split())
        except OSError:
            continue
    return dirs, sorted(pids)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_after_kill_9_a_new_job_gets_its_cores_and_a_restart_adopts_the_rest(
    tmp_path: Path,
    broker: Service,
    agent_on: dict[str, SlurmAgent],
    jobs: JobSubmitter,
    slurm_cluster: SlurmCluster,
) -> None:
    agent = agent_on_idle_node(tmp_path, broker, slurm_cluster, agent_on)
    node = agent.node
    wait_until(lambda: len(agent.offer()[0]) == 2, 30, "both idle cores offered")
    doomed = lease_when_offered(broker, agent)  # a job will want its core
    kept = lease_when_offered(broker, agent)  # nothing will want this one
    doomed_dirs, doomed_pids = lease_processes(node, doomed.lease_id)
    kept_dirs, kept_pids = lease_processes(node, kept.lease_id)
    assert doomed_pids and kept_pids, agent.service.logs()[
        -2000:
    ]  # evicted by a job of another test?
    client = kept.executor()
    assert client.invoke(add, 1, 2) == 3
    agent.service.process.send_signal(signal.SIGKILL)
    agent.service.process.wait(10)
    assert all(alive(p) for p in doomed_pids + kept_pids)  # waiting for a restarted agent
    # a job on the first lease's core: its prolog finds no agent and frees the core itself
    started = tmp_path / "job-started"
    code = f"open({str(started)!r}, 'w').close()\n{SLEEP}"
    job = jobs.submit(job_script(code), "-w", node, "-c1", "--mem=100M")
    wait_until(started.exists, 30, "the job's first line (its prolog is over)")
    if set(job_cpus(job.job_id, node)) != set(doomed.cpu_ids):  # Slurm chose the other core
        doomed, kept = kept, doomed
        doomed_dirs, kept_dirs, doomed_pids, kept_pids = (
            kept_dirs,
            doomed_dirs,
            kept_pids,
            doomed_pids,
        )
        client.shutdown(wait=False)
        client = kept.executor()
    assert not any(alive(p) for p in doomed_pids), "a worker runs on the new job's core"
    assert not any(d.exists() for d in doomed_dirs)
    assert all(alive(p) for p in kept_pids)
    # the agent comes back (an upgrade, a crash and restart): the other lease is adopted
    restarted = agent_on[node] = start_slurm_agent(tmp_path, broker, node, agent.state_dir)
    assert f"lease {kept.lease_id}: adopted" in restarted.service.logs()
    assert client.invoke(add, 2, 3) == 5  # the client of the old agent sees no error
    with kept.executor() as fresh:  # and a new connection is admitted
        assert fresh.invoke(add, 3, 4) == 7
    client.shutdown(wait=False)
    leases = httpx.get(f"{broker.url}/v1/status", timeout=5, auth=ClientAuth()).json()["leases"]
    assert kept.lease_id in {lease["lease_id"] for lease in leases}
    kept.release()
    wait_until(lambda: not any(alive(p) for p in kept_pids), 10, "the adopted executor to go")


FLOOD = """
import os, socket, sys, time
path, seconds = sys.argv[1], float(sys.argv[2])
for _ in range(3):
    if os.fork() == 0:
        break
held = []
end = time.monotonic() + seconds
while time.monotonic() < end:
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        s.sendall(b'{"op": "prolog", "job_id": 1, "colocate": "allow"}\\n')
        if len(held) < 300:
            held.append(s)
        else:
            s.close()
    except OSError:
        pass
"""


def test_a_control_socket_flood_loses_no_eviction_and_no_deny(
    tmp_path: Path,
    broker: Service,
    agent_on: dict[str, SlurmAgent],
    jobs: JobSubmitter,
    slurm_cluster: SlurmCluster,
) -> None:
    agent = agent_on_idle_node(tmp_path, broker, slurm_cluster, agent_on)
    node = agent.node
    wait_until(lambda: len(agent.offer()[0]) == 2, 30, "both idle cores offered")
    lease = lease_when_offered(broker, agent)
    _dirs, pids = lease_processes(node, lease.lease_id)
    user = f"cflood{os.getpid()}"[:31]
    with unix_users(user):
        flood = None
        try:
            flood = subprocess.Popen(
                ["runuser", "-u", user, "--", "/usr/bin/python3", "-c", FLOOD, agent.socket, "60"],
                start_new_session=True,
            )
            time.sleep(1.0)  # the flood is on
            # a job that takes the whole node and says deny: its prolog must evict the lease
            started = tmp_path / "job-started"
            code = f"open({str(started)!r}, 'w').close()\n{SLEEP}"
            job = jobs.submit(job_script(code), "-w", node, "-c2", "--mem=100M", "--colocate=deny")
            wait_until(started.exists, 30, "the job's first line (its prolog is over)")
            assert not any(alive(p) for p in pids), "the lease survived the job's prolog"
            wait_until(
                lambda: any(j["job_id"] == job.job_id for j in agent.status().get("jobs", [])),
                10,
                "the agent to see the job",
            )
            row = next(j for j in agent.status()["jobs"] if j["job_id"] == job.job_id)
            assert row["colocate"] is False
            time.sleep(3.0)  # several intervals: the deny holds, nothing of the job is offered
            assert agent.offer()[0] == []
            assert flood.poll() is None  # the flood went on all along
        finally:
            if flood is not None:
                os.killpg(flood.pid, signal.SIGKILL)  # the flood and the processes it forked
                flood.wait()


def test_an_upgrade_restart_keeps_every_lease_and_its_clients_see_no_error(
    tmp_path: Path,
    broker: Service,
    agent_on: dict[str, SlurmAgent],
    jobs: JobSubmitter,
    slurm_cluster: SlurmCluster,
) -> None:
    agent = agent_on_idle_node(tmp_path, broker, slurm_cluster, agent_on)
    node = agent.node
    lease = lease_when_offered(broker, agent)
    _dirs, pids = lease_processes(node, lease.lease_id)
    client = lease.executor()
    assert client.invoke(add, 1, 2) == 3
    agent.service.process.send_signal(signal.SIGUSR1)  # what an upgrade script sends
    assert agent.service.process.wait(15) == 0
    assert "left 1 executor(s) to the next agent" in agent.service.logs()
    assert all(alive(p) for p in pids)
    assert client.invoke(add, 2, 2) == 4  # even while no agent runs
    restarted = agent_on[node] = start_slurm_agent(tmp_path, broker, node, agent.state_dir)
    assert f"lease {lease.lease_id}: adopted" in restarted.service.logs()
    assert client.invoke(add, 2, 3) == 5
    with lease.executor() as fresh:
        assert fresh.invoke(add, 3, 4) == 7
    client.shutdown(wait=False)
    leases = httpx.get(f"{broker.url}/v1/status", timeout=5, auth=ClientAuth()).json()["leases"]
    assert [entry["lease_id"] for entry in leases] == [lease.lease_id]
    assert restarted.evictions() == []
    lease.release()
    wait_until(lambda: not any(alive(p) for p in pids), 10, "the released executor to go")


def test_after_kill_9_without_a_restart_nothing_of_a_lease_remains_after_the_window(
    tmp_path: Path,
    broker: Service,
    agent_on: dict[str, SlurmAgent],
    slurm_cluster: SlurmCluster,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLOCATE_EXECUTOR__ADOPT_WINDOW_S", "1.0")
    agent = agent_on_idle_node(tmp_path, broker, slurm_cluster, agent_on)
    node = agent.node
    lease = lease_when_offered(broker, agent)
    dirs, pids = lease_processes(node, lease.lease_id)
    assert dirs and pids
    agent.service.process.send_signal(signal.SIGKILL)
    agent.service.process.wait(10)
    # the window (1 s) passes without a successor: the workers die with their fork server
    wait_until(
        lambda: not any(alive(p) for p in pids) and not any(d.exists() for d in dirs),
        1.0 + 5.0,  # the window + a loaded machine
        "the lease's processes and cgroups to go",
    )
