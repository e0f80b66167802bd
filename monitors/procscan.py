"""The psutil fallback: map processes to jobs when Slurm runs without cgroup tracking
(``ProctrackType=proctrack/linuxproc``), or for jobs a cgroup source cannot find.

A process belongs to a job, first rule that answers wins:

1. its cgroup path names the job (``.../job_<id>/...``; a ``slurm_<other node>`` path means
   another slurmd on this host owns it);
2. ``SLURM_JOB_ID`` in its environment (``SLURMD_NODENAME``, when set, must be this node);
3. it descends from a ``slurmstepd: [<id>.<step>]`` process.

The mapping of a process is cached by (pid, start time). Usage is summed over the job's
live processes: CPU time of processes that already exited is lost, so the job's counter can
go down; the sampler treats that as a new window. Memory is the sum of RSS (shared pages
count once per process, so it overestimates for jobs sharing memory between processes).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import psutil

from monitors.cgroupfs import read_text
from monitors.usage import JobUsage, UsageReading, UsageSource
from slurm_plugin.slurm import JobOnNode, JobState

log = logging.getLogger(__name__)

_CGROUP_JOB = re.compile(r"/job_(\d+)(?:/|$)")
_CGROUP_NODE = re.compile(r"/slurm_([^/]+)/")
_STEPD = re.compile(r"slurmstepd: \[(\d+)\.")


def _env_value(environ: bytes, key: str) -> str | None:
    prefix = key.encode() + b"="
    for item in environ.split(b"\0"):
        if item.startswith(prefix):
            return item[len(prefix) :].decode(errors="replace")
    return None


class ProcessScanSource:
    """Per-job usage from a scan of all processes (psutil). ``proc`` is where cgroup and
    environment files are read (psutil itself reads the host's /proc)."""

    name = "psutil"

    def __init__(self, proc: str | Path = "/proc") -> None:
        self.proc = Path(proc)
        self._owner: dict[tuple[int, float], str | None] = {}
        self._denied: set[int] = set()  # pids whose environment we may not read

    def _by_files(self, pid: int, node: str) -> tuple[bool, str | None]:
        """(decided, job id) from the cgroup path, then the environment."""
        text = read_text(self.proc / str(pid) / "cgroup") or ""
        for line in text.splitlines():
            path = line.split(":", 2)[-1]
            m = _CGROUP_JOB.search(path)
            if m:
                other = _CGROUP_NODE.search(path)
                if other and other[1] != node:
                    return True, None
                return True, m[1]
        try:
            env = (self.proc / str(pid) / "environ").read_bytes()
        except PermissionError:
            self._denied.add(pid)
            return False, None
        except OSError:
            return False, None
        job = _env_value(env, "SLURM_JOB_ID")
        if job and job.isdigit():
            where = _env_value(env, "SLURMD_NODENAME")
            return True, job if where in (None, node) else None
        return False, None

    def read(self, node: str, expected: Sequence[JobOnNode] = ()) -> UsageReading:
        procs: dict[int, psutil.Process] = {}
        info: dict[int, dict[str, object]] = {}
        for p in psutil.process_iter(["pid", "ppid", "name", "create_time"]):
            procs[p.pid] = p
            info[p.pid] = p.info
        stepd_job: dict[int, str] = {}
        for pid, i in info.items():
            if i.get("name") == "slurmstepd":
                try:
                    m = _STEPD.search(" ".join(procs[pid].cmdline()))
                except psutil.Error:
                    continue
                if m:
                    stepd_job[pid] = m[1]
        owner: dict[int, str] = {}
        live_keys = set()
        for pid, i in info.items():
            if pid in stepd_job:
                continue
            key = (pid, float(i.get("create_time") or 0.0))  # type: ignore[arg-type]
            live_keys.add(key)
            if key in self._owner:
                job = self._owner[key]
            else:
                decided, job = self._by_files(pid, node)
                if not decided:
                    job = self._by_tree(pid, info, stepd_job)
                self._owner[key] = job
            if job is not None:
                owner[pid] = job
        for key in [k for k in self._owner if k not in live_keys]:
            del self._owner[key]
        self._denied &= set(info)
        reading = self._usage(owner, procs)
        if self._denied:
            note = (
                f"could not read the environment of {len(self._denied)} process(es) (permission denied): "
                "their jobs are found only through cgroups or slurmstepd ancestry; run as root"
            )
            return UsageReading(reading.jobs, (*reading.warnings, note))
        return reading

    @staticmethod
    def _by_tree(
        pid: int, info: dict[int, dict[str, object]], stepd_job: dict[int, str]
    ) -> str | None:
        seen = 0
        cur = info.get(pid, {}).get("ppid")
        while isinstance(cur, int) and cur > 1 and seen < 64:
            if cur in stepd_job:
                return stepd_job[cur]
            cur = info.get(cur, {}).get("ppid")
            seen += 1
        return None

    def _usage(self, owner: dict[int, str], procs: dict[int, psutil.Process]) -> UsageReading:
        cpu: dict[str, float] = {}
        rss: dict[str, int] = {}
        count: dict[str, int] = {}
        vanished: list[int] = []
        denied: list[int] = []
        for pid, job in owner.items():
            p = procs[pid]
            try:
                with p.oneshot():
                    t = p.cpu_times()
                    mem = p.memory_info().rss
            except psutil.NoSuchProcess:
                vanished.append(pid)
                continue
            except psutil.AccessDenied:
                denied.append(pid)
                continue
            cpu[job] = cpu.get(job, 0.0) + t.user + t.system
            rss[job] = rss.get(job, 0) + mem
            count[job] = count.get(job, 0) + 1
        warnings = []
        if vanished:
            warnings.append(
                f"skipped {len(vanished)} process(es) that exited during the scan: pids {vanished[:10]}"
            )
        if denied:
            warnings.append(
                f"skipped {len(denied)} process(es): permission denied: pids {denied[:10]}"
            )
        jobs = {
            job: JobUsage(job, cpu[job], rss[job], None, count[job], None, None, None, self.name)
            for job in cpu
        }
        return UsageReading(jobs, tuple(warnings))


class FallbackSource:
    """A primary source (cgroups), completed by a secondary one (the process scan) for the
    jobs Slurm lists on the node that the primary did not find. The scan runs only then."""

    def __init__(self, primary: UsageSource, secondary: UsageSource) -> None:
        self.primary = primary
        self.secondary = secondary
        self.name = f"{self.primary.name}+{self.secondary.name}"

    def read(self, node: str, expected: Sequence[JobOnNode] = ()) -> UsageReading:
        first = self.primary.read(node, expected)
        missing = [
            j for j in expected if j.job_id not in first.jobs and j.state is JobState.RUNNING
        ]
        if not missing:
            return first
        second = self.secondary.read(node, missing)
        jobs = dict(first.jobs)
        for j in missing:
            if j.job_id in second.jobs:
                jobs[j.job_id] = second.jobs[j.job_id]
        return UsageReading(jobs, first.warnings + second.warnings)
