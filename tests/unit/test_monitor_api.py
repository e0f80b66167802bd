"""The public names of ``monitors`` and ``slurm_plugin.slurm`` are locked: changing them is
a decision, not an accident."""

from __future__ import annotations

import subprocess
import sys

import monitors
import slurm_plugin.slurm as slurm


def test_monitors_exports() -> None:
    assert monitors.__all__ == [
        "Backoff",
        "CgroupV1Source",
        "CgroupV2Source",
        "FallbackSource",
        "JobSnapshot",
        "JobUsage",
        "MonitoredNode",
        "NodeSnapshot",
        "ProcessScanSource",
        "Sampler",
        "UsageHistory",
        "UsageReading",
        "UsageSource",
        "default_source",
        "node_view",
    ]
    for name in monitors.__all__:
        assert getattr(monitors, name) is not None


def test_slurm_seam_exports() -> None:
    assert slurm.__all__ == [
        "BACKENDS",
        "CliSlurm",
        "CommandRunner",
        "JobOnNode",
        "JobState",
        "NodeInfo",
        "NodeState",
        "Parsed",
        "ProcessEntry",
        "PyslurmSlurm",
        "SlurmClient",
        "StaticSlurm",
        "expand_hostlist",
        "format_cpu_ids",
        "job_state",
        "make_slurm",
        "node_state",
        "parse_cpu_ids",
        "subprocess_runner",
    ]
    assert set(slurm.BACKENDS) == {"cli", "pyslurm"}


def test_importing_the_snapshot_contract_stays_light() -> None:
    code = "import sys, monitors.snapshot; print(' '.join(m for m in ('psutil', 'slurm_plugin') if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == ""
