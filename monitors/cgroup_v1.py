"""Slurm's per-job cgroups on cgroup v1 (``CgroupPlugin=cgroup/v1``), the layout on these machines.

Slurm puts each job at ``<root>/<controller>/slurm[_<node>]/uid_<uid>/job_<id>/`` (the
``_<node>`` suffix on builds with several slurmd per host). Read per job: ``cpuacct.usage``
(ns), ``memory.usage_in_bytes`` minus ``total_inactive_file``, ``memory.max_usage_in_bytes``,
``cpuset.cpus``, and the pids of the whole subtree.

PSI: v1 has none. Where the kernel also mounts cgroup2 (``<root>/unified``), per-job PSI
exists only if the job's processes sit in their own v2 group; Slurm's v1 plugin leaves them
at the v2 root, so pressure is None there (checked through one job process's ``0::`` path),
unless ``psi_groups`` (opt-in, ``monitors.psi_groups``) gives each job such a group.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from pathlib import Path

from monitors.cgroupfs import (
    Skips,
    read_cpuset,
    read_flat_keyed,
    read_int,
    read_int_list,
    run_delays,
    subtree_pids,
    subtree_tids,
    unified_path,
)
from monitors.psi import read_some_avg10
from monitors.psi_groups import PsiGroups
from monitors.usage import JobUsage, UsageReading
from slurm_plugin.slurm import JobOnNode

log = logging.getLogger(__name__)

_JOB_DIR = re.compile(r"^job_(\d+)$")
UNLIMITED = 1 << 62  # v1 reports "no limit" as a huge page-rounded number


def _uid_of(job_dir: Path | None) -> int | None:
    name = job_dir.parent.name if job_dir is not None else ""
    return int(name[4:]) if name.startswith("uid_") and name[4:].isdigit() else None


class CgroupV1Source:
    """Per-job usage from Slurm's cgroup v1 tree under ``cgroup_root``."""

    name = "cgroup-v1"

    def __init__(
        self,
        cgroup_root: str | Path = "/sys/fs/cgroup",
        proc: str | Path = "/proc",
        psi_groups: PsiGroups | None = None,
    ) -> None:
        self.root = Path(cgroup_root)
        self.proc = Path(proc)
        self.psi_groups = psi_groups

    @classmethod
    def detect(cls, cgroup_root: str | Path = "/sys/fs/cgroup") -> bool:
        """True when ``cgroup_root`` holds v1 controllers (legacy or hybrid mode)."""
        root = Path(cgroup_root)
        return (root / "cpuacct").is_dir() or (root / "memory").is_dir()

    def _slurm_dir(self, controller: str, node: str) -> Path | None:
        for name in (f"slurm_{node}", "slurm"):
            d = self.root / controller / name
            if d.is_dir():
                return d
        return None

    def job_dirs(self, node: str, controller: str = "cpuacct") -> dict[str, Path]:
        """job id -> that job's directory under ``controller`` for ``node``."""
        base = self._slurm_dir(controller, node)
        out: dict[str, Path] = {}
        if base is None:
            return out
        try:
            for uid_dir in base.iterdir():
                if not uid_dir.name.startswith("uid_"):
                    continue
                for job_dir in uid_dir.iterdir():
                    m = _JOB_DIR.match(job_dir.name)
                    if m and job_dir.is_dir():
                        out[m[1]] = job_dir
        except OSError as exc:
            log.debug("listing %s: %s", base, exc)
        return out

    def read(self, node: str, expected: Sequence[JobOnNode] = ()) -> UsageReading:
        skips = Skips()
        acct = self.job_dirs(node, "cpuacct")
        mem = self.job_dirs(node, "memory")
        cpuset = self.job_dirs(node, "cpuset")
        jobs: dict[str, JobUsage] = {}
        for job_id in sorted(set(acct) | set(mem), key=lambda j: (len(j), j)):
            usage = self._job(
                node, job_id, acct.get(job_id), mem.get(job_id), cpuset.get(job_id), skips
            )
            if usage is not None:
                jobs[job_id] = usage
        if self.psi_groups is not None:
            self.psi_groups.prune(node, jobs)
        return UsageReading(jobs, tuple(skips.warnings))

    def _job(
        self,
        node: str,
        job_id: str,
        acct: Path | None,
        mem: Path | None,
        cpuset: Path | None,
        skips: Skips,
    ) -> JobUsage | None:
        local = Skips()
        ns = read_int(acct / "cpuacct.usage", local) if acct else None
        per_cpu = read_int_list(acct / "cpuacct.usage_percpu") if acct else None
        delays = run_delays(subtree_tids(acct), self.proc) if acct else None
        read_at = time.monotonic()  # rates are timed at the read, not at the sample's start
        usage = read_int(mem / "memory.usage_in_bytes", local) if mem else None
        peak = read_int(mem / "memory.max_usage_in_bytes", local) if mem else None
        limit = read_int(mem / "memory.limit_in_bytes") if mem else None
        stat = read_flat_keyed(mem / "memory.stat", local) if mem else {}
        ids = read_cpuset(cpuset / "cpuset.cpus", local) if cpuset else None
        pids = subtree_pids(acct or mem or Path("/nonexistent"), local)
        gone = not any(d is not None and d.exists() for d in (acct, mem))
        if gone:
            return None  # the job ended while we read it: not worth a warning
        skips.warnings.extend(f"job {job_id}: {w}" for w in local.warnings)
        if ns is None and usage is None:
            return None
        working_set = max(0, (usage or 0) - stat.get("total_inactive_file", 0))
        cpu_p = mem_p = None
        group: Path | None = None
        if self.psi_groups is not None and pids:
            group = self.psi_groups.attach(node, job_id, pids, skips)
        else:
            for pid in sorted(pids)[:1]:
                path = unified_path(pid, self.proc)
                if path and path != "/":
                    group = self.root / "unified" / path.lstrip("/")
        if group is not None:
            cpu_p = read_some_avg10(group / "cpu.pressure")
            mem_p = read_some_avg10(group / "memory.pressure")
        return JobUsage(
            job_id=job_id,
            cpu_seconds_total=(ns or 0) / 1e9,
            memory_bytes=working_set,
            memory_peak_bytes=peak,
            processes=len(pids),
            cpu_ids=ids or None,
            cpu_pressure=cpu_p,
            memory_pressure=mem_p,
            source=self.name,
            memory_limit_bytes=limit if limit is not None and limit < UNLIMITED else None,
            uid=_uid_of(acct or mem),
            cpu_seconds_per_cpu=tuple(n / 1e9 for n in per_cpu) if per_cpu else None,
            read_at=read_at if ns is not None else None,
            run_delay_ns=delays,
        )
