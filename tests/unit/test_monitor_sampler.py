"""The sampler over a cgroup v1 tree we control (a copy of the captured one) and an
in-memory Slurm: rates, allocations, Slurm outages, jobs coming and going, the policy view."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from monitors.cgroup_v1 import CgroupV1Source
from monitors.history import UsageHistory
from monitors.sampler import GONE_AFTER_S, Backoff, Sampler
from monitors.view import MonitoredNode, node_view
from policies.model import UsageSample
from slurm_plugin.slurm import JobOnNode, JobState, NodeInfo, NodeState, Parsed, StaticSlurm

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "cgroup"
MIB = 1024**2
GIB = 1024**3


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Node:
    """A node n1 with Slurm job 10 (2 cores, 1 GiB) and its cgroup tree under tmp."""

    def __init__(self, tmp: Path, **sampler_kw: object) -> None:
        self.root = tmp / "cg"
        shutil.copytree(FIX / "v1", self.root)
        self.clock = Clock()
        self.slurm = StaticSlurm(
            nodes=[NodeInfo("n1", NodeState.MIXED, cpus=2, real_memory_bytes=4 * GIB)],
            jobs=[self.job("10", (0, 1), GIB)],
        )
        self.sampler = Sampler(
            "n1",
            self.slurm,
            CgroupV1Source(self.root, proc=FIX / "proc"),
            monotonic=self.clock,
            proc=FIX / "proc",
            **sampler_kw,  # type: ignore[arg-type]
        )

    @staticmethod
    def job(
        job_id: str, cpu_ids: tuple[int, ...], memory: int, state: JobState = JobState.RUNNING
    ) -> JobOnNode:
        return JobOnNode(
            job_id,
            "root",
            0,
            "n1",
            state,
            len(cpu_ids),
            cpu_ids,
            memory,
            start_time=900.0,
            nodes=("n1",),
        )

    def job_dir(self, ctrl: str, job_id: str = "10") -> Path:
        return self.root / ctrl / "slurm_n1" / "uid_0" / f"job_{job_id}"

    def burn(self, cpu_seconds: float, on: tuple[int, ...] = (0, 1)) -> None:
        """The job spends ``cpu_seconds`` more, spread evenly over CPUs ``on``."""
        f = self.job_dir("cpuacct") / "cpuacct.usage"
        f.write_text(str(int(f.read_text()) + int(cpu_seconds * 1e9)) + "\n")
        per_cpu_file = self.job_dir("cpuacct") / "cpuacct.usage_percpu"
        if not per_cpu_file.exists():
            return
        per_cpu = [int(n) for n in per_cpu_file.read_text().split()]
        for cpu in on:
            per_cpu[cpu] += int(cpu_seconds / len(on) * 1e9)
        per_cpu_file.write_text(" ".join(map(str, per_cpu)) + " \n")

    def set_memory(self, used: int, peak: int) -> None:
        (self.job_dir("memory") / "memory.usage_in_bytes").write_text(f"{used}\n")
        (self.job_dir("memory") / "memory.max_usage_in_bytes").write_text(f"{peak}\n")
        (self.job_dir("memory") / "memory.stat").write_text("total_inactive_file 0\n")

    def end_job(self, job_id: str = "10") -> None:
        for ctrl in ("cpuacct", "memory", "cpuset"):
            shutil.rmtree(self.job_dir(ctrl, job_id))


def test_cores_used_is_cpu_time_over_the_window_and_the_first_sample_has_none(
    tmp_path: Path,
) -> None:
    node = Node(tmp_path)
    first = node.sampler.sample(now=1.0)
    assert first.jobs[0].cores_used == 0.0
    assert node.sampler.history.samples("10") == ()  # no window yet: not history
    node.burn(1.5)
    node.clock.t += 1.0
    second = node.sampler.sample(now=2.0)
    job = second.jobs[0]
    assert job.cores_used == pytest.approx(1.5)
    assert job.cores_idle == pytest.approx(0.5)
    assert job.cpu_busy == ((0, pytest.approx(0.75)), (1, pytest.approx(0.75)))
    assert node.sampler.history.samples("10") == (
        UsageSample(2.0, job.cores_used, job.memory_used_bytes, cpu_busy=job.cpu_busy),
    )


def test_per_cpu_busy_shows_which_core_a_job_keeps_busy(tmp_path: Path) -> None:
    # One busy core of two (cpuacct.usage_percpu): the total alone (1.0 of 2) cannot say
    # which core is idle; the per-CPU shares can, and reach the history and the JSON.
    node = Node(tmp_path)
    node.sampler.sample(now=1.0)
    node.burn(1.0, on=(1,))
    node.clock.t += 1.0
    job = node.sampler.sample(now=2.0).jobs[0]
    assert job.cores_used == pytest.approx(1.0)
    assert job.cpu_busy == ((0, 0.0), (1, pytest.approx(1.0)))
    assert node.sampler.history.samples("10")[-1].cpu_busy == job.cpu_busy
    assert job.to_json()["cpu_busy"] == {"0": 0.0, "1": pytest.approx(1.0)}


def test_without_per_cpu_accounting_only_the_total_is_known(tmp_path: Path) -> None:
    node = Node(tmp_path)
    (node.job_dir("cpuacct") / "cpuacct.usage_percpu").unlink()
    node.sampler.sample(now=1.0)
    node.burn(0.0)
    node.clock.t += 1.0
    job = node.sampler.sample(now=2.0).jobs[0]
    assert job.cpu_busy == () and node.sampler.history.samples("10")[-1].cpu_busy == ()


def test_the_window_averages_over_window_s(tmp_path: Path) -> None:
    node = Node(tmp_path, window_s=2.0)
    node.sampler.sample()
    for burned in (2.0, 0.0, 0.0):
        node.burn(burned)
        node.clock.t += 1.0
        snap = node.sampler.sample()
    assert snap.jobs[0].cores_used == pytest.approx(0.0)  # the busy second left the 2 s window
    node.burn(1.0)
    node.clock.t += 1.0
    assert node.sampler.sample().jobs[0].cores_used == pytest.approx(0.5)


def test_memory_used_peak_and_unused(tmp_path: Path) -> None:
    node = Node(tmp_path)
    node.set_memory(300 * MIB, 500 * MIB)
    job = node.sampler.sample().jobs[0]
    assert (job.memory_used_bytes, job.memory_peak_bytes) == (300 * MIB, 500 * MIB)
    assert job.memory_unused_bytes == GIB - 300 * MIB
    node.set_memory(100 * MIB, 100 * MIB)  # the kernel's peak was reset: ours is kept
    assert node.sampler.sample().jobs[0].memory_peak_bytes == 500 * MIB


def test_unallocated_cores_and_memory(tmp_path: Path) -> None:
    node = Node(tmp_path)
    node.slurm.jobs = [node.job("10", (1,), GIB)]
    (node.job_dir("cpuset") / "cpuset.cpus").write_text("1\n")
    snap = node.sampler.sample()
    assert (snap.cores_total, snap.cores_unallocated) == (2, 1)
    assert snap.memory_unallocated_bytes == 3 * GIB
    assert snap.jobs[0].cpu_ids == (1,)


def test_a_cpuset_wider_than_the_allocation_is_not_trusted(tmp_path: Path) -> None:
    node = Node(tmp_path)  # the cgroup says 0-1 (ConstrainCores=no leaves the whole node)
    node.slurm.jobs = [node.job("10", (1,), GIB)]
    assert node.sampler.sample().jobs[0].cpu_ids == (1,)


def test_slurm_is_asked_only_when_something_may_have_changed(tmp_path: Path) -> None:
    node = Node(tmp_path, slurm_refresh_s=5.0)
    for _ in range(4):
        node.sampler.sample()
        node.clock.t += 1.0
    assert node.slurm.calls["jobs_on_node"] == 1
    node.end_job()
    node.slurm.jobs = []
    snap = node.sampler.sample()
    assert snap.jobs == () and node.slurm.calls["jobs_on_node"] == 2
    node.clock.t += 5.0
    node.sampler.sample()
    assert node.slurm.calls["jobs_on_node"] == 3  # the periodic refresh


def test_a_job_slurm_no_longer_lists_disappears_with_its_history(tmp_path: Path) -> None:
    node = Node(tmp_path, slurm_refresh_s=0.0)
    node.sampler.sample()
    node.clock.t += 1
    node.sampler.sample()
    assert "10" in node.sampler.history
    node.slurm.jobs = []
    node.clock.t += 1
    assert node.sampler.sample().jobs == ()
    assert "10" not in node.sampler.history


def test_slurm_down_keeps_live_jobs_and_backs_off(tmp_path: Path) -> None:
    node = Node(tmp_path, slurm_refresh_s=0.0)
    assert node.sampler.sample().slurm_ok
    node.slurm.available = False
    node.clock.t += 1
    snap = node.sampler.sample()
    assert not snap.slurm_ok and [j.job_id for j in snap.jobs] == ["10"]
    assert any("Slurm unavailable" in w and "retrying in 1 s" in w for w in snap.warnings)
    asked = node.slurm.calls["jobs_on_node"]
    node.clock.t += 0.5
    node.sampler.sample()
    assert node.slurm.calls["jobs_on_node"] == asked  # inside the backoff
    node.clock.t += 0.6
    snap = node.sampler.sample()
    assert node.slurm.calls["jobs_on_node"] == asked + 1
    assert any("retrying in 2 s" in w for w in snap.warnings)
    node.end_job()  # the job ends while Slurm is down: the cgroup says so
    node.clock.t += 2.1
    assert node.sampler.sample().jobs == ()
    node.slurm.available = True
    node.slurm.jobs = []
    node.clock.t += 4.1
    assert node.sampler.sample().slurm_ok


def test_slurm_down_as_a_job_starts_keeps_its_cores_until_it_is_surely_gone(
    tmp_path: Path,
) -> None:
    # Job 11 is listed by Slurm but has no cgroup yet (still starting) when Slurm falls
    # silent: its core must not look free; once unseen for GONE_AFTER_S it is taken as ended.
    node = Node(tmp_path, slurm_refresh_s=0.0)
    node.slurm.jobs = [node.job("10", (0,), GIB), node.job("11", (1,), GIB)]
    assert [j.job_id for j in node.sampler.sample().jobs] == ["10", "11"]
    node.slurm.available = False
    node.clock.t += 1
    snap = node.sampler.sample()
    assert not snap.slurm_ok and [j.job_id for j in snap.jobs] == ["10", "11"]
    assert snap.cores_unallocated == 0
    node.clock.t += GONE_AFTER_S
    snap = node.sampler.sample()
    assert [j.job_id for j in snap.jobs] == ["10"] and snap.cores_unallocated == 1


def test_slurm_never_answered_still_gives_a_snapshot_with_cgroup_allocations(
    tmp_path: Path,
) -> None:
    node = Node(tmp_path)
    node.slurm.available = False
    snap = node.sampler.sample()
    assert not snap.slurm_ok
    assert snap.cores_total >= 1 and snap.memory_total_bytes > 0
    assert any("taken from this machine" in w for w in snap.warnings)
    # job 10 started while Slurm was down: its cgroup's cpuset and limit stand in
    (job,) = snap.jobs
    assert (job.job_id, job.user, job.cpu_ids, job.memory_allocated_bytes) == (
        "10",
        "uid 0",
        (0, 1),
        GIB,
    )
    assert any("allocation read from its cgroup" in w for w in snap.warnings)


def test_a_running_job_without_usage_is_named(tmp_path: Path) -> None:
    node = Node(tmp_path)
    node.slurm.jobs.append(node.job("11", (), 100 * MIB))
    snap = node.sampler.sample()
    eleven = next(j for j in snap.jobs if j.job_id == "11")
    assert eleven.memory_used_bytes == 0 and eleven.processes == 0
    assert any(w.startswith("job 11: no usage found") for w in snap.warnings)
    assert snap.cores_unallocated == 0  # counted from Slurm's cores when ids are missing


def test_warnings_from_the_source_reach_the_snapshot_and_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node = Node(tmp_path)
    (node.job_dir("memory") / "memory.stat").unlink()
    snap = node.sampler.sample()
    assert any("memory.stat: missing" in w for w in snap.warnings)
    assert "memory.stat: missing" in caplog.text
    assert len(snap.jobs) == 1


def test_node_view_for_the_policies(tmp_path: Path) -> None:
    node = Node(tmp_path)
    node.set_memory(300 * MIB, 400 * MIB)
    node.sampler.sample(now=1.0)
    node.clock.t += 1
    node.burn(0.5)
    snap = node.sampler.sample(now=2.0)
    view = node_view(snap, node.sampler.history, memory_reserved_bytes=256 * MIB)
    assert view.cpu_ids == frozenset({0, 1}) and view.memory_total_bytes == 4 * GIB
    (job,) = view.jobs
    assert job.cpu_ids == frozenset({0, 1}) and job.memory_allocated_bytes == GIB
    assert job.memory_peak_bytes == 400 * MIB and job.start_time == 900.0
    assert [s.cores_used for s in job.history] == [pytest.approx(0.5)]
    assert view.memory_reserved_bytes == 256 * MIB


def test_monitored_node_is_a_node_source(tmp_path: Path) -> None:
    node = Node(tmp_path)
    source = MonitoredNode(node.sampler)
    view = source.view(5.0)
    assert source.node == "n1" and view.node == "n1" and len(view.jobs) == 1
    assert source.last_snapshot is not None and source.last_snapshot.t == 5.0


def test_json_contract(tmp_path: Path) -> None:
    data = Node(tmp_path).sampler.sample().to_json()
    assert {
        "node",
        "cores_total",
        "memory_total_bytes",
        "cores_unallocated",
        "memory_unallocated_bytes",
        "jobs",
    } <= set(data)
    job = data["jobs"][0]
    assert {
        "job_id",
        "user",
        "cores_allocated",
        "cpu_ids",
        "cores_used",
        "cores_idle",
        "memory_allocated_bytes",
        "memory_used_bytes",
        "memory_peak_bytes",
        "memory_unused_bytes",
    } <= set(job)
    assert data["cpu_pressure"] == 3.0  # node PSI from the fixture /proc/pressure


def test_backoff_doubles_up_to_the_cap() -> None:
    b = Backoff(1.0, 8.0)
    assert [b.failed(0.0) for _ in range(5)] == [1.0, 2.0, 4.0, 8.0, 8.0]
    assert not b.ready(7.9) and b.ready(8.0)
    b.succeeded()
    assert b.ready(0.0) and b.failed(0.0) == 1.0


def test_history_keeps_the_horizon() -> None:
    h = UsageHistory(horizon_s=10.0)
    for t in range(30):
        h.add("1", UsageSample(float(t), 1.0, 0))
    assert h.samples("1")[0].t == 19.0
    h.retain([])
    assert h.samples("1") == () and len(h) == 0


class BrokenSource:
    name = "broken"

    def read(self, node: str, expected: object = ()) -> object:
        raise RuntimeError("disk on fire")


def test_a_failing_source_does_not_stop_sampling(tmp_path: Path) -> None:
    node = Node(tmp_path)
    node.sampler.source = BrokenSource()  # type: ignore[assignment]
    snap = node.sampler.sample()
    assert [j.job_id for j in snap.jobs] == ["10"] and snap.jobs[0].memory_used_bytes == 0
    assert any("usage source broken failed: RuntimeError: disk on fire" in w for w in snap.warnings)


class SlowSlurm(StaticSlurm):
    def __init__(self, delay_s: float, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.delay_s = delay_s

    def jobs_on_node(self, node: str) -> Parsed[JobOnNode]:
        time.sleep(self.delay_s)
        return super().jobs_on_node(node)


def test_a_slow_slurm_does_not_stall_sampling(tmp_path: Path) -> None:
    node = Node(tmp_path)
    slow = SlowSlurm(0.4, nodes=node.slurm.nodes.values(), jobs=node.slurm.jobs)
    sampler = Sampler("n1", slow, node.sampler.source, slurm_wait_s=0.05, proc=FIX / "proc")
    t0 = time.monotonic()
    first = sampler.sample()
    assert time.monotonic() - t0 < 0.3
    assert not first.slurm_ok and any("Slurm slow" in w for w in first.warnings)
    time.sleep(0.5)
    second = sampler.sample()  # the answer arrived meanwhile
    assert second.slurm_ok and [j.job_id for j in second.jobs] == ["10"]
    sampler.close()


def test_colocate_choices_reach_the_policy_view_and_are_forgotten_with_the_job(
    tmp_path: Path,
) -> None:
    node = Node(tmp_path)
    source = MonitoredNode(node.sampler, default_colocate=True)
    source.colocate["10"] = False  # the prolog said --colocate=deny
    source.colocate["99"] = False  # a job the monitor has not seen yet keeps its choice
    assert [j.colocate for j in source.view(1.0).jobs] == [False]
    node.slurm.jobs = []
    node.end_job()
    node.clock.t += 1
    source.view(2.0)
    assert source.colocate == {"99": False}
    assert (
        node_view(Node(tmp_path / "b").sampler.sample(), default_colocate=False).jobs[0].colocate
        is False
    )


def test_cores_waiting_is_run_queue_time_of_the_jobs_threads(tmp_path: Path) -> None:
    # A job on a CPU shared with other work: it runs half the time and waits the other half.
    # cpuacct sees 0.5 core; schedstat's run_delay shows it wants a whole one.
    proc = tmp_path / "proc"
    shutil.copytree(FIX / "proc", proc)
    node = Node(tmp_path)
    node.sampler.source = CgroupV1Source(node.root, proc=proc)
    (node.job_dir("cpuacct") / "tasks").write_text("4242\n")
    (proc / "4242").mkdir()
    schedstat = proc / "4242" / "schedstat"
    schedstat.write_text("0 1000000000 10\n")
    node.sampler.sample(now=1.0)
    node.burn(0.5, on=(0,))
    schedstat.write_text("500000000 1500000000 20\n")
    node.clock.t += 1.0
    job = node.sampler.sample(now=2.0).jobs[0]
    assert job.cores_used == pytest.approx(0.5)
    assert job.cores_waiting == pytest.approx(0.5)
    sample = node.sampler.history.samples("10")[-1]
    assert sample.cores_wanted == pytest.approx(1.0)


def test_a_thread_that_wakes_often_waits_without_wanting_a_core(tmp_path: Path) -> None:
    # Under heavy load a watcher waking 20 times a second waits 30 ms each time and runs
    # 0.5 ms: its wait counts only up to 3x what it ran (it wants almost nothing).
    proc = tmp_path / "proc"
    shutil.copytree(FIX / "proc", proc)
    node = Node(tmp_path)
    node.sampler.source = CgroupV1Source(node.root, proc=proc)
    (node.job_dir("cpuacct") / "tasks").write_text("4242\n")
    (proc / "4242").mkdir()
    schedstat = proc / "4242" / "schedstat"
    schedstat.write_text("1000000000 1000000000 10\n")
    node.sampler.sample(now=1.0)
    node.burn(0.01, on=(0,))
    schedstat.write_text("1010000000 1600000000 30\n")
    node.clock.t += 1.0
    job = node.sampler.sample(now=2.0).jobs[0]
    assert job.cores_waiting == pytest.approx(0.03)
