"""Usage sources over committed cgroup trees: v1 (captured from a live Slurm job), v2 in
both job directory layouts (``job_<id>`` and the SLUID naming of Slurm >= 26.05), and what
happens when files are missing or unreadable."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from monitors.cgroup_v1 import CgroupV1Source
from monitors.cgroup_v2 import CgroupV2Source
from monitors.procscan import FallbackSource, ProcessScanSource
from monitors.usage import UsageSource
from slurm_plugin.slurm import JobOnNode, JobState

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "cgroup"
MIB = 1024**2


def v1_file(ctrl: str, name: str, root: Path = FIX / "v1") -> Path:
    return root / ctrl / "slurm_n1" / "uid_0" / "job_10" / name


def first_int(path: Path) -> int:
    return int(path.read_text().split()[0])


def expected_job(job_id: str, node: str = "c1", sluid: str | None = None) -> JobOnNode:
    return JobOnNode(
        job_id, "alice", 1000, node, JobState.RUNNING, 2, (2, 3), 1024 * MIB, sluid=sluid
    )


def test_v1_reads_the_captured_job() -> None:
    reading = CgroupV1Source(FIX / "v1", proc=FIX / "proc").read("n1")
    assert reading.warnings == ()
    job = reading.jobs["10"]
    assert job.cpu_seconds_total == pytest.approx(
        first_int(v1_file("cpuacct", "cpuacct.usage")) / 1e9
    )
    inactive = next(
        int(line.split()[1])
        for line in v1_file("memory", "memory.stat").read_text().splitlines()
        if line.startswith("total_inactive_file ")
    )
    assert job.memory_bytes == first_int(v1_file("memory", "memory.usage_in_bytes")) - inactive
    assert job.memory_peak_bytes == first_int(v1_file("memory", "memory.max_usage_in_bytes"))
    assert job.cpu_ids == (0, 1)
    assert job.processes == 2  # the batch script and its python; slurmstepd is not in cpuacct
    assert job.cpu_pressure is None  # v1: no per-job PSI
    assert job.memory_limit_bytes == first_int(v1_file("memory", "memory.limit_in_bytes"))
    assert job.uid == 0
    # cpuacct.usage_percpu: the same CPU time split by CPU (which cores the job keeps busy)
    per_cpu = [int(n) / 1e9 for n in v1_file("cpuacct", "cpuacct.usage_percpu").read_text().split()]
    assert job.cpu_seconds_per_cpu == pytest.approx(tuple(per_cpu))
    assert sum(per_cpu) == pytest.approx(job.cpu_seconds_total)


def test_v1_other_nodes_jobs_are_not_ours() -> None:
    assert CgroupV1Source(FIX / "v1").read("n2").jobs == {}


def test_v1_missing_and_unreadable_files_are_named_and_the_rest_is_kept(tmp_path: Path) -> None:
    root = tmp_path / "v1"
    shutil.copytree(FIX / "v1", root)
    v1_file("memory", "memory.stat", root).unlink()
    v1_file("cpuset", "cpuset.cpus", root).unlink()
    v1_file("memory", "memory.max_usage_in_bytes", root).write_text("garbage\n")
    reading = CgroupV1Source(root).read("n1")
    job = reading.jobs["10"]
    assert job.cpu_seconds_total > 0 and job.memory_bytes > 0  # still produced
    assert job.cpu_ids is None and job.memory_peak_bytes is None
    text = "\n".join(reading.warnings)
    assert "memory.stat: missing" in text and "cpuset.cpus: missing" in text
    assert "memory.max_usage_in_bytes: unreadable" in text
    assert all(w.startswith("job 10: skipped ") for w in reading.warnings)


def test_v1_a_file_replaced_by_a_directory_is_a_warning_not_a_crash(tmp_path: Path) -> None:
    root = tmp_path / "v1"
    shutil.copytree(FIX / "v1", root)
    usage = v1_file("cpuacct", "cpuacct.usage", root)
    usage.unlink()
    usage.mkdir()
    reading = CgroupV1Source(root).read("n1")
    assert reading.jobs["10"].cpu_seconds_total == 0.0
    assert any("cpuacct.usage" in w for w in reading.warnings)


def test_v2_job_id_layout() -> None:
    reading = CgroupV2Source(FIX / "v2-jobid", proc=FIX / "proc").read("c1")
    assert reading.warnings == ()
    assert set(reading.jobs) == {"42", "43"}
    job = reading.jobs["42"]
    assert job.cpu_seconds_total == pytest.approx(12.5)
    assert job.memory_bytes == 230 * MIB - 10 * MIB  # memory.current - inactive_file
    assert job.memory_peak_bytes == 260 * MIB
    assert job.cpu_ids == (2, 3)
    assert job.processes == 3  # task processes of both steps; step_*/slurm (slurmstepd) excluded
    assert (job.cpu_pressure, job.memory_pressure) == (12.5, 0.75)
    older = reading.jobs["43"]
    assert older.memory_peak_bytes is None and older.cpu_pressure is None  # kernel without them


def test_v2_sluid_layout_resolved_through_slurm() -> None:
    source = CgroupV2Source(FIX / "v2-sluid", proc=FIX / "proc")
    reading = source.read("c1", [expected_job("101", sluid="sEKNKTV3WPV500")])
    assert "101" in reading.jobs and reading.jobs["101"].cpu_seconds_total == pytest.approx(12.5)


def test_v2_sluid_layout_resolved_through_the_processes_environment() -> None:
    reading = CgroupV2Source(FIX / "v2-sluid", proc=FIX / "proc").read("c1")
    assert set(reading.jobs) == {"42", "43"}
    assert reading.jobs["42"].memory_peak_bytes == 260 * MIB


def test_v2_unresolvable_sluid_is_skipped_with_a_warning(tmp_path: Path) -> None:
    reading = CgroupV2Source(FIX / "v2-sluid", proc=tmp_path).read("c1")  # no /proc entries
    assert reading.jobs == {}
    assert len(reading.warnings) == 2 and all("SLUID" in w for w in reading.warnings)


def test_detection() -> None:
    assert CgroupV2Source.detect(FIX / "v2-jobid") and not CgroupV2Source.detect(FIX / "v1")
    assert CgroupV1Source.detect(FIX / "v1") and not CgroupV1Source.detect(FIX / "v2-jobid")


def test_fallback_fills_only_jobs_the_primary_misses() -> None:
    primary = CgroupV1Source(FIX / "v1")
    secondary = CgroupV2Source(FIX / "v2-jobid", proc=FIX / "proc")
    source = FallbackSource(primary, secondary)
    found = source.read("n1", [expected_job("10", "n1")])
    assert set(found.jobs) == {"10"}
    both = source.read("c1", [expected_job("42")])
    assert set(both.jobs) == {"42"} and both.jobs["42"].source == "cgroup-v2"


@pytest.mark.parametrize(
    "source",
    [
        CgroupV1Source("/nonexistent"),
        CgroupV2Source("/nonexistent"),
        ProcessScanSource(),
        FallbackSource(CgroupV1Source("/nonexistent"), CgroupV2Source("/nonexistent")),
    ],
    ids=lambda s: s.name,
)
def test_every_source_answers_for_a_node_without_jobs(source: UsageSource) -> None:
    reading = source.read("no-such-node", [expected_job("1", "no-such-node")])
    assert reading.jobs == {}
