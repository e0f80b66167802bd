"""Replay sweeps and tuning as a user runs them: the same small sweep as local processes, as a
job array on the real dev cluster and on a Dask LocalCluster gives identical rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from colocate.errors import BackendUnavailable
from colocate.sweep import SlurmArrayRunner
from tests.integration.conftest import SlurmCluster
from traces.sweep import Trial, comparable

SWEEP = ["--policy", "headroom", "--policy", "unallocated", "--seeds", "0-1"]


def colocate(*args: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "colocate", *args, "--json"],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc: dict[str, Any] = json.loads(proc.stdout)
    return doc


@pytest.mark.slurm
@pytest.mark.slow
def test_sweep_rows_are_identical_on_every_runner(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    local = colocate("replay", "--sweep", *SWEEP, "--workers", "2")
    array = colocate(
        "replay",
        "--sweep",
        *SWEEP,
        "--runner",
        "slurm",
        "--sweep-dir",
        str(tmp_path),
        "--timeout",
        "300",
    )
    dask = colocate("replay", "--sweep", *SWEEP, "--runner", "dask", "--workers", "2")

    assert local["trials"] == 4 and [r["trial"]["policy"] for r in local["rows"]] == [
        "headroom",
        "headroom",
        "unallocated",
        "unallocated",
    ]
    # a real result, not an empty one: money recovered, and the policies differ
    assert all(r["summary"]["recovered_cost"] > 0 for r in local["rows"])
    assert (
        local["rows"][0]["summary"]["recovered_cost"]
        != local["rows"][2]["summary"]["recovered_cost"]
    )
    assert comparable(array["rows"]) == comparable(local["rows"])
    assert comparable(dask["rows"]) == comparable(local["rows"])
    assert local["digest"] == array["digest"] == dask["digest"]
    # the array ran on the cluster: one result file per trial in the shared directory
    (work,) = tmp_path.glob("sweep-*")
    assert sorted(p.name for p in work.glob("result-*.json")) == [
        f"result-{i}.json" for i in range(4)
    ]


@pytest.mark.slurm
def test_a_failed_array_task_names_its_log(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    trial = Trial(
        policy="headroom",
        seed=0,
        jobs="/nonexistent.swf",
        jobs_format="swf",
        faas="/nonexistent",
        faas_format="azure2019",
        nodes=1,
        cores_per_node=1,
        memory_per_node_bytes=1024**3,
    )
    runner = SlurmArrayRunner(tmp_path, timeout_s=120, mem="200M")
    with pytest.raises(
        BackendUnavailable,
        match=r"trial 0 \(nonexistent headroom seed=0\) wrote no result; see .*task-0.out",
    ):
        runner.run([trial])
    assert runner.last_dir is not None
    assert "nonexistent" in (runner.last_dir / "task-0.out").read_text()


@pytest.mark.slow
def test_tune_is_the_same_study_on_local_processes_and_dask() -> None:
    args = ["tune", "--trials", "4", "--batch", "2", "--faas-scale", "4"]
    local = colocate(*args, "--workers", "2")
    dask = colocate(*args, "--runner", "dask", "--workers", "2")
    assert local["candidates"] == dask["candidates"]
    # candidate 0 is the default limits, the baseline; the search then moves away from them
    assert local["baseline"]["limits"]["max_function_share"] == 0.5
    assert len({json.dumps(c["limits"], sort_keys=True) for c in local["candidates"]}) == 4
    best = local["best"]
    if best is not None:
        assert best["feasible"] and best["violation_share"] <= 0.005
        assert best["recovered_cost"] == max(
            c["recovered_cost"] for c in local["candidates"] if c["feasible"]
        )


@pytest.mark.slow
def test_a_sweep_on_a_running_dask_scheduler_equals_the_local_one() -> None:
    from dask.distributed import LocalCluster

    args = ["replay", "--sweep", "--policy", "headroom", "--seeds", "0-1"]
    local = colocate(*args, "--workers", "1")
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as cluster:
        remote = colocate(*args, "--runner", "dask", "--dask-scheduler", cluster.scheduler_address)
    assert remote["runner"] == "dask" and remote["trials"] == 2
    assert comparable(remote["rows"]) == comparable(local["rows"])
