"""The live table of ``colocate monitor``: what a user reads off it."""

from __future__ import annotations

from colocate.cli.monitor import render_table
from monitors.snapshot import JobSnapshot, NodeSnapshot

MIB = 1024**2


def snapshot(slurm_ok: bool = True, jobs: tuple[JobSnapshot, ...] = ()) -> NodeSnapshot:
    return NodeSnapshot(
        node="n1",
        t=0.0,
        cores_total=2,
        cpu_ids=(0, 1),
        memory_total_bytes=4096 * MIB,
        cores_unallocated=0,
        memory_unallocated_bytes=3072 * MIB,
        jobs=jobs,
        slurm_ok=slurm_ok,
        warnings=("job 7: skipped /x/memory.stat: missing",),
        cpu_pressure=12.0,
        source="cgroup-v1",
    )


def test_a_row_per_job_with_given_used_and_idle() -> None:
    job = JobSnapshot(
        job_id="7",
        user="alice",
        cores_allocated=2,
        cpu_ids=(0, 1),
        cores_used=1.02,
        memory_allocated_bytes=1024 * MIB,
        memory_used_bytes=200 * MIB,
        memory_peak_bytes=210 * MIB,
        processes=3,
    )
    table = render_table(snapshot(jobs=(job,)))
    row = next(line for line in table.splitlines() if line.strip().startswith("7 "))
    assert row.split()[:6] == ["7", "alice", "RUNNING", "0,1", "2", "1.02"]
    assert "0.98" in row and "1024Mi" in row and "200Mi" in row and "824Mi" in row
    assert "warning: job 7: skipped /x/memory.stat: missing" in table
    assert "PSI cpu 12%" in table and "SLURM UNAVAILABLE" not in table


def test_an_empty_node_and_slurm_down_are_said_plainly() -> None:
    table = render_table(snapshot(slurm_ok=False))
    assert "(no jobs on this node)" in table and "SLURM UNAVAILABLE" in table
