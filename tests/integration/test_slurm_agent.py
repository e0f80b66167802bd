"""The Slurm-integrated agent on the dev cluster (real slurmctld/slurmd, prolog/epilog hooks,
SPANK, cgroups): a broker and ``colocate agent --config`` for one fake node run as
subprocesses; jobs are submitted with sbatch to that node.

The fake nodes share this machine's 2 cores: "idle" means idle as Slurm and the job's
cgroup see it. Timing assertions leave margins for a loaded machine.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest

from colocate import LeaseDenied, LeaseEvicted
from colocate.client.lease import Client
from slurm_plugin.devcluster import CONTROL_SOCKET
from tests.integration.conftest import JobSubmitter, SlurmCluster, slurm
from tests.integration.leasing import Service, wait_until
from tests.integration.slurm_agent import (
    HALF_BUSY,
    INTERVAL_S,
    MIN_HISTORY_S,
    MiB,
    SlurmAgent,
    agent_on_idle_node,
    job_cpus,
    job_field,
    job_script,
    lease_when_offered,
    start_slurm_agent,
)

pytestmark = [pytest.mark.slurm, pytest.mark.root, pytest.mark.slow]
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers run as nobody

PYTHON = sys.executable


def affinity() -> tuple[list[int], int]:
    import os as _os

    return sorted(_os.sched_getaffinity(0)), _os.getuid()


def sleep_for(seconds: float) -> str:
    import time as _time

    _time.sleep(seconds)
    return "finished"


# --- 1. a lease on exactly the idle cores of a job ---------------------------------------------


def test_lease_runs_on_the_idle_core_of_a_running_job(
    tmp_path: Path,
    broker: Service,
    agent_on: dict[str, SlurmAgent],
    jobs: JobSubmitter,
    slurm_cluster: SlurmCluster,
) -> None:
    agent = agent_on_idle_node(tmp_path, broker, slurm_cluster, agent_on)
    node = agent.node
    job = jobs.submit(job_script(HALF_BUSY), "-w", node, "-c2", "--mem=300M")
    allocated = job_cpus(job.job_id, node)
    busy = min(allocated)
    assert len(allocated) == 2
    # The job holds the whole node: whatever is offered now comes from inside it.
    wait_until(
        lambda: agent.offer()[0] == sorted(allocated - {busy}), 30, "the job's idle core offered"
    )
    lease = lease_when_offered(broker, agent)
    try:
        assert set(lease.cpu_ids) == allocated - {busy}
        with lease.executor() as executor:
            cores, uid = executor.invoke(affinity)
        assert cores == sorted(lease.cpu_ids)
        assert uid != 0
        status = agent.status()
        job_row = next(j for j in status["jobs"] if j["job_id"] == job.job_id)
        assert job_row["colocate"] is True
        assert isinstance(job_row["cpu_pressure"], float)  # per-job PSI reaches the policy
        # Prometheus sees the node as the monitor does: the lease, the job's cores.
        text = agent.metrics()
        assert f'colocate_node_cores{{node="{node}",state="leased"}} 1.0' in text, text
    finally:
        lease.release()


# --- 2. a new job takes the leased core back through its prolog ---------------------------------


def test_prolog_evicts_the_lease_on_a_starting_jobs_core(
    tmp_path: Path,
    broker: Service,
    agent_on: dict[str, SlurmAgent],
    jobs: JobSubmitter,
    slurm_cluster: SlurmCluster,
) -> None:
    agent = agent_on_idle_node(tmp_path, broker, slurm_cluster, agent_on)
    node = agent.node
    first = jobs.submit(job_script(HALF_BUSY), "-w", node, "-c1", "--mem=200M")
    free_core = sorted({0, 1} - job_cpus(first.job_id, node))
    wait_until(lambda: agent.offer()[0] == free_core, 30, "the unallocated core offered")
    lease = lease_when_offered(broker, agent)
    assert list(lease.cpu_ids) == free_core
    out = tmp_path / "second.out"
    with lease.executor() as executor:
        assert executor.invoke(affinity)[0] == free_core
        in_flight = executor.submit(sleep_for, 60)
        time.sleep(0.3)  # the call runs in the worker
        submitted = time.time()
        proc = slurm(
            "sbatch",
            "--parsable",
            "-w",
            node,
            "-c1",
            "--mem=100M",
            "-o",
            str(out),
            "--wrap",
            "date +%s.%N; sleep 5",
        )
        assert proc.returncode == 0, proc.stderr
        second = proc.stdout.strip()
        jobs.submitted.append(second)
        with pytest.raises(LeaseEvicted):
            in_flight.result(timeout=30)
    wait_until(lambda: out.exists() and out.read_text().strip(), 30, "the second job's first line")
    started = float(out.read_text().split()[0])
    assert job_cpus(second, node) == frozenset(free_core)
    # On time: the scheduler, the prolog (with the eviction) and the job's first line.
    assert started - submitted < 10.0, (
        f"second job started {started - submitted:.2f} s after sbatch"
    )
    record = next(e for e in agent.evictions() if e["lease_id"] == lease.lease_id)
    assert record["reason"] == "job_start"
    assert f'colocate_evictions_total{{node="{node}",reason="job_start"}} 1.0' in agent.metrics()
    shown = subprocess.run(
        [
            PYTHON,
            "-m",
            "colocate",
            "agent",
            "--status",
            "--node",
            node,
            "--control-socket",
            CONTROL_SOCKET,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert shown.returncode == 0, shown.stderr
    assert f"evicted {lease.lease_id} (job_start)" in shown.stdout, shown.stdout
    assert isinstance(record["seconds"], float) and record["seconds"] < 1.0
    hook_log = Path("/var/lib/colocate/dev-cluster/log/hook.log").read_text()
    assert f"prolog job {second} on {node}: hook exit 0" in hook_log
    assert f"prolog job {second}" in agent.service.logs() and lease.lease_id in agent.service.logs()


# --- 3. memory growth evicts before the job needs the memory --------------------------------


GROWER = """
import os, sys, time
out, go, step, top, hold = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
blocks = [bytearray(os.urandom(1)) * (16 << 20)]
with open(out, "a") as log:
    print("ready", time.time(), flush=True, file=log)
    while not os.path.exists(go):
        time.sleep(0.05)
    while sum(map(len, blocks)) < top:
        blocks.append(bytearray(step))
        for i in range(0, step, 4096):
            blocks[-1][i] = 1
        print("size", time.time(), sum(map(len, blocks)), flush=True, file=log)
        time.sleep(0.2)
    time.sleep(hold)
    print("done", time.time(), flush=True, file=log)
"""


@pytest.mark.parametrize("attempt", [1, 2, 3])
def test_memory_growth_evicts_before_the_job_runs_out(
    attempt: int,
    tmp_path: Path,
    broker: Service,
    agent_on: dict[str, SlurmAgent],
    jobs: JobSubmitter,
    slurm_cluster: SlurmCluster,
) -> None:
    # This checks the memory-growth path: the pressure guard (test_policies_guard.py) is set out
    # of reach, so CPU contention on the shared test machine cannot evict the lease first.
    out_of_reach = {"cpu_pressure_limit": 100.0, "memory_pressure_limit": 100.0}
    agent = agent_on_idle_node(tmp_path, broker, slurm_cluster, agent_on, limits=out_of_reach)
    node = agent.node
    script = tmp_path / "grower.py"
    script.write_text(GROWER)
    out, go = tmp_path / "grower.out", tmp_path / "go"
    limit = 3000 * MiB
    job = jobs.submit(
        f"{PYTHON} {script} {out} {go} {64 * MiB} {2500 * MiB} 2",
        "-w",
        node,
        "-c1",
        "--mem=3000M",
        "-o",
        str(tmp_path / "slurm.out"),
    )
    wait_until(lambda: out.exists() and "ready" in out.read_text(), 30, "the job to start")
    # Until the job has history it keeps its whole allocation; then it lends what it does not use.
    node_memory = 4096 * MiB
    wait_until(
        lambda: node_memory - limit + 512 * MiB < agent.offer()[1] < node_memory,
        30,
        "the job's unused memory offered",
    )
    offered = agent.offer()[1]
    lease = lease_when_offered(broker, agent, memory=offered - 100 * MiB)
    with lease.executor() as executor:
        assert executor.invoke(affinity)[0] == sorted(lease.cpu_ids)
        go.touch()
        # The job grows 64 MiB every 0.2 s to 2500 MiB (its limit is 3000 MiB).
        wait_until(
            lambda: any(e["lease_id"] == lease.lease_id for e in agent.evictions()),
            60,
            "the eviction",
        )
    evicted = next(e for e in agent.evictions() if e["lease_id"] == lease.lease_id)
    assert evicted["reason"] == "memory_growth"
    wait_until(lambda: "done" in out.read_text(), 60, "the job to finish")
    sizes = [
        (float(t), int(n))
        for kind, t, *rest in (line.split() for line in out.read_text().splitlines())
        if kind == "size"
        for n in rest
    ]
    assert sizes[-1][1] >= 2500 * MiB - 64 * MiB
    at_eviction = max((n for t, n in sizes if t <= float(evicted["at"])), default=0)
    # Evicted while the job still had room; and the job never got near its own limit.
    assert at_eviction < limit - 256 * MiB, (at_eviction, evicted)
    assert float(evicted["at"]) < sizes[-1][0], "evicted only after the job had grown to its peak"
    # Detection: the lease stops fitting once peak + margin (300 MiB here) + lease > node memory.
    threshold = node_memory - 300 * MiB - lease.memory_bytes
    # The job reports a size once it has touched the whole new block: the crossing happened
    # between the report before (plus its 0.2 s pause) and that one. The agent's memory watch
    # (a cgroup threshold notification) decides right then, not at the next interval.
    index = next(i for i, (_, n) in enumerate(sizes) if n > threshold)
    before, crossed = sizes[index - 1][0] if index else 0.0, sizes[index][0]
    at = float(evicted["at"])
    print(
        f"memory growth: crossed {threshold / MiB:.0f} MiB in [{before:.3f}, {crossed:.3f}], evicted at {at:.3f} ({(at - crossed) * 1e3:+.0f} ms)"
    )
    assert before < at < crossed + 2.0 + INTERVAL_S, (before, at, crossed)
    wait_until(
        lambda: job_field(job.job_id, "JobState") in {"COMPLETED", "FAILED", "OUT_OF_MEMORY"},
        30,
        "job end",
    )
    assert job_field(job.job_id, "JobState") == "COMPLETED"
    assert job_field(job.job_id, "ExitCode") == "0:0"


# --- 4. --colocate=deny: nothing of the job is ever lent -----------------------------------------


def test_deny_job_lends_nothing(
    tmp_path: Path,
    broker: Service,
    agent_on: dict[str, SlurmAgent],
    jobs: JobSubmitter,
    slurm_cluster: SlurmCluster,
) -> None:
    agent = agent_on_idle_node(tmp_path, broker, slurm_cluster, agent_on)
    node = agent.node
    job = jobs.submit(job_script(HALF_BUSY), "-w", node, "-c2", "--mem=500M", "--colocate=deny")
    allocated = job_cpus(job.job_id, node)
    assert allocated == frozenset({0, 1})
    # The broker may still hold the node's report from before the job; from the next one on
    # nothing of the job is offered, over many intervals and past the history the policy needs.
    wait_until(lambda: agent.offer()[0] == [], 10, "the job's cores withdrawn")
    deadline = time.monotonic() + MIN_HISTORY_S + 6 * INTERVAL_S + 2.0
    offers = []
    while time.monotonic() < deadline:
        offers.append(agent.offer())
        time.sleep(INTERVAL_S / 2)
    assert offers and all(cores == [] for cores, _ in offers), offers
    status = agent.status()
    row = next(j for j in status["jobs"] if j["job_id"] == job.job_id)
    assert row["colocate"] is False
    with pytest.raises(LeaseDenied):
        Client(broker.url).lease(1, 64 * MiB, "1m")


# --- 5. SIGKILL: the next agent cleans up and the broker forgets the leases ---------------------


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_agent_killed_and_restarted_adopts_its_executor_and_leaves_no_orphans(
    tmp_path: Path,
    broker: Service,
    agent_on: dict[str, SlurmAgent],
    jobs: JobSubmitter,
    slurm_cluster: SlurmCluster,
) -> None:
    agent = agent_on_idle_node(tmp_path, broker, slurm_cluster, agent_on)
    node = agent.node
    job = jobs.submit(job_script(HALF_BUSY), "-w", node, "-c1", "--mem=200M")
    free_core = sorted({0, 1} - job_cpus(job.job_id, node))
    wait_until(lambda: agent.offer()[0] == free_core, 30, "the unallocated core offered")
    lease = lease_when_offered(broker, agent)
    executor = lease.executor()
    assert executor.invoke(os.getpid) == 1  # pid 1 of the lease's own pid namespace
    cgroups = [
        Path(f"/sys/fs/cgroup/{c}/colocate/{node}/{lease.lease_id}") for c in ("cpuset", "memory")
    ]
    assert all(c.is_dir() for c in cgroups)
    worker_pids = [int(p) for p in (cgroups[1] / "cgroup.procs").read_text().split()]
    agent.service.process.send_signal(signal.SIGKILL)
    agent.service.process.wait(10)
    assert all(_alive(p) for p in worker_pids), "the worker waits for a restarted agent"
    restarted = agent_on[node] = start_slurm_agent(tmp_path, broker, node, agent.state_dir)
    # the lease is still valid and no job holds its core: adopted, its client sees no error
    assert f"lease {lease.lease_id}: adopted" in restarted.service.logs()
    assert executor.invoke(affinity)[0] == sorted(lease.cpu_ids)
    executor.shutdown(wait=False)
    lease.release()
    wait_until(lambda: not any(_alive(p) for p in worker_pids), 10, "the released executor to go")
    # its cgroups go right after its processes (the supervisor removes them once empty)
    wait_until(lambda: not any(c.exists() for c in cgroups), 10, "the lease's cgroups removed")
