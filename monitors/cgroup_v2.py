"""Slurm's per-job cgroups on cgroup v2 (``CgroupPlugin=cgroup/v2``), as at many sites.

Slurm puts jobs below the slurmstepd scope, ``<root>/system.slice/slurmstepd.scope/``
(``<node>_slurmstepd.scope`` with several slurmd per host), in one of two layouts:

- ``job_<id>/`` (Slurm < 26.05, or ``CgroupJobIdPaths=yes``);
- ``<SLUID>/`` (Slurm >= 26.05 default), e.g. ``sEKNKTV3WPV500``: no job id in the name.
  It is resolved to the job id through Slurm's ``sluid`` field when the job list has it,
  else through ``SLURM_JOB_ID`` in the environment of one of the group's processes.

Read per job: ``cpu.stat`` ``usage_usec``, ``memory.current`` minus ``memory.stat``
``inactive_file``, ``memory.peak`` (kernel >= 5.19), ``cpuset.cpus.effective``,
``cpu.pressure`` and ``memory.pressure`` (PSI), and the pids of the subtree.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

from monitors.cgroupfs import (
    Skips,
    environ_value,
    read_cpuset,
    read_flat_keyed,
    read_int,
    subtree_pids,
)
from monitors.psi import read_some_avg10
from monitors.usage import JobUsage, UsageReading
from slurm_plugin.slurm import JobOnNode

log = logging.getLogger(__name__)

_JOB_DIR = re.compile(r"^job_(\d+)$")
# A SLUID: 's' and 13 Crockford base32 characters (no I, L, O, U).
STEPD_DIRS = frozenset({"slurm"})  # step_*/slurm holds slurmstepd, not the job's processes
SLUID = re.compile(r"^s[0-9A-HJKMNP-TV-Z]{13}$")


class CgroupV2Source:
    """Per-job usage from Slurm's cgroup v2 tree under ``cgroup_root``."""

    name = "cgroup-v2"

    def __init__(
        self,
        cgroup_root: str | Path = "/sys/fs/cgroup",
        proc: str | Path = "/proc",
        slice_name: str = "system.slice",
    ) -> None:
        self.root = Path(cgroup_root)
        self.proc = Path(proc)
        self.slice_name = slice_name

    @classmethod
    def detect(cls, cgroup_root: str | Path = "/sys/fs/cgroup") -> bool:
        """True when ``cgroup_root`` is a cgroup2 mount (unified mode)."""
        return (Path(cgroup_root) / "cgroup.controllers").is_file()

    def scope(self, node: str) -> Path | None:
        base = self.root / self.slice_name
        for name in (f"{node}_slurmstepd.scope", "slurmstepd.scope"):
            if (base / name).is_dir():
                return base / name
        return None

    def job_dirs(self, node: str, expected: Sequence[JobOnNode], skips: Skips) -> dict[str, Path]:
        """job id -> job directory, for both layouts."""
        scope = self.scope(node)
        if scope is None:
            return {}
        by_sluid = {j.sluid: j.job_id for j in expected if j.sluid}
        out: dict[str, Path] = {}
        try:
            entries = sorted(scope.iterdir())
        except OSError as exc:
            skips.note(str(scope), exc)
            return {}
        for d in entries:
            m = _JOB_DIR.match(d.name)
            if m:
                out[m[1]] = d
            elif SLUID.match(d.name):
                job_id = by_sluid.get(d.name) or self._job_id_from_processes(d)
                if job_id:
                    out[job_id] = d
                else:
                    skips.note(
                        f"{d} (SLUID {d.name})",
                        "no job id: not in Slurm's list, no process with SLURM_JOB_ID",
                    )
        return out

    def _job_id_from_processes(self, job_dir: Path) -> str | None:
        for pid in sorted(subtree_pids(job_dir, skip_dirs=STEPD_DIRS)):
            value = environ_value(pid, self.proc, "SLURM_JOB_ID")
            if value and value.isdigit():
                return value
        return None

    def read(self, node: str, expected: Sequence[JobOnNode] = ()) -> UsageReading:
        skips = Skips()
        jobs: dict[str, JobUsage] = {}
        for job_id, d in self.job_dirs(node, expected, skips).items():
            local = Skips()
            cpu = read_flat_keyed(d / "cpu.stat", local)
            current = read_int(d / "memory.current", local)
            stat = read_flat_keyed(d / "memory.stat", local)
            peak = read_int(d / "memory.peak")  # optional: kernels < 5.19 have none
            limit = read_int(d / "memory.max")  # "max" (no limit) reads as None
            ids = read_cpuset(d / "cpuset.cpus.effective") or read_cpuset(d / "cpuset.cpus")
            pids = subtree_pids(d, local, skip_dirs=STEPD_DIRS)
            if not d.exists():
                continue  # ended while we read it
            skips.warnings.extend(f"job {job_id}: {w}" for w in local.warnings)
            if "usage_usec" not in cpu and current is None:
                continue
            jobs[job_id] = JobUsage(
                job_id=job_id,
                cpu_seconds_total=cpu.get("usage_usec", 0) / 1e6,
                memory_bytes=max(0, (current or 0) - stat.get("inactive_file", 0)),
                memory_peak_bytes=peak,
                processes=len(pids),
                cpu_ids=ids or None,
                cpu_pressure=read_some_avg10(d / "cpu.pressure"),
                memory_pressure=read_some_avg10(d / "memory.pressure"),
                source=self.name,
                memory_limit_bytes=limit,
            )
        return UsageReading(jobs, tuple(skips.warnings))
