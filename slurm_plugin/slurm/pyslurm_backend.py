"""The pyslurm backend: Slurm's C API in-process, no fork per question.

pyslurm is built for one Slurm major.minor release and refuses any other; PyPI has only
25.11.x (and 17/18). On the Debian 22.05 machines it therefore cannot be used: ``PyslurmSlurm()``
raises a ConfigError naming both versions and what to do. Written against pyslurm's 23.x+
object API (``pyslurm.Jobs.load()``, ``Job.get_resource_layout_per_node()``,
``pyslurm.Node.load()``).
"""

from __future__ import annotations

import importlib
import subprocess
from types import ModuleType
from typing import Any

from colocate.errors import ConfigError, SlurmUnavailable
from slurm_plugin.slurm.hostlist import expand_hostlist, parse_cpu_ids
from slurm_plugin.slurm.parse import MIB, number
from slurm_plugin.slurm.records import JobOnNode, NodeInfo, Parsed, ProcessEntry
from slurm_plugin.slurm.states import job_state, node_state


def _major_minor(version: str) -> tuple[int, int] | None:
    parts = version.replace("-", ".").split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None


def installed_slurm_version() -> str:
    """The local Slurm release from ``sinfo --version`` ("unknown" when sinfo is missing)."""
    try:
        out = subprocess.run(
            ["sinfo", "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    words = out.stdout.split()
    return words[-1] if words else "unknown"


def load_pyslurm(slurm_version: str | None = None) -> ModuleType:
    """Import pyslurm and check it matches the local Slurm; ConfigError otherwise."""
    slurm_version = slurm_version or installed_slurm_version()
    try:
        mod = importlib.import_module("pyslurm")
    except ImportError as exc:
        raise ConfigError(
            f"pyslurm backend unavailable: cannot import pyslurm ({exc}); this node runs Slurm "
            f"{slurm_version}, so install pyslurm=={slurm_version.rsplit('.', 1)[0]}.* built against it, "
            "or use the cli backend",
            key="slurm.backend",
        ) from None
    raw = getattr(mod, "__version__", None)
    if raw is None and callable(getattr(mod, "version", None)):
        raw = mod.version()
    built = str(raw or "unknown")
    want, have = _major_minor(built), _major_minor(slurm_version)
    if want is None or have is None or want != have:
        raise ConfigError(
            f"pyslurm backend unavailable: pyslurm {built} requires Slurm "
            f"{'.'.join(map(str, want)) if want else '?'}, found Slurm {slurm_version}; "
            "use the cli backend or install the pyslurm release matching this Slurm",
            key="slurm.backend",
        )
    return mod


class PyslurmSlurm:
    """Slurm through pyslurm. Construction checks the version match and fails early."""

    name = "pyslurm"

    def __init__(self, module: ModuleType | None = None, slurm_version: str | None = None) -> None:
        self._slurm_version = slurm_version or installed_slurm_version()
        self._m = module or load_pyslurm(self._slurm_version)

    def version(self) -> str:
        return self._slurm_version

    def _call(self, what: str, fn: Any, *args: Any) -> Any:
        """The one place pyslurm is called; its RPC errors become SlurmUnavailable."""
        try:
            return fn(*args)
        except Exception as exc:  # pyslurm raises RPCError and plain errors alike
            raise SlurmUnavailable(f"pyslurm {what} failed: {exc}") from None

    def jobs_on_node(self, node: str) -> Parsed[JobOnNode]:
        jobs = self._call("Jobs.load", self._m.Jobs.load)
        out: list[JobOnNode] = []
        warnings: list[str] = []
        for job in dict(jobs).values():
            try:
                nodes = expand_hostlist(getattr(job, "nodes", "") or "")
                state = job_state(getattr(job, "state", None))
                if node not in nodes or not state.holds_resources:
                    continue
                layout = job.get_resource_layout_per_node().get(node, {})
                ids = parse_cpu_ids(str(layout.get("cpu_ids", "")))
                mem = number(layout.get("memory")) or 0
                start = number(getattr(job, "start_time", None))
                out.append(
                    JobOnNode(
                        job_id=str(job.id),
                        user=str(getattr(job, "user_name", None) or job.user_id),
                        uid=getattr(job, "user_id", None),
                        node=node,
                        state=state,
                        cores=len(ids),
                        cpu_ids=ids,
                        memory_bytes=int(mem) * MIB,
                        start_time=start,
                        nodes=nodes,
                        partition=getattr(job, "partition", None),
                    )
                )
            except (AttributeError, ValueError, TypeError) as exc:
                warnings.append(f"pyslurm: skipped job {getattr(job, 'id', '?')}: {exc}")
        return Parsed(tuple(out), tuple(warnings))

    def node_info(self, node: str) -> NodeInfo:
        n = self._call(f"Node.load({node})", self._m.Node.load, node)
        return NodeInfo(
            name=node,
            state=node_state(str(getattr(n, "state", "UNKNOWN"))),
            cpus=int(n.total_cpus),
            real_memory_bytes=int(n.real_memory) * MIB,
            alloc_cpus=int(getattr(n, "allocated_cpus", 0) or 0),
            alloc_memory_bytes=int(getattr(n, "allocated_memory", 0) or 0) * MIB,
            free_memory_bytes=int(n.free_memory) * MIB if getattr(n, "free_memory", None) else None,
            partitions=tuple(getattr(n, "partitions", ()) or ()),
        )

    def listpids(self, job_id: str, node: str | None = None) -> Parsed[ProcessEntry]:
        job = self._call(f"Job.load({job_id})", self._m.Job.load, int(job_id))
        pids = self._call("Job.get_pids", getattr(job, "get_pids", lambda: {}))
        entries = [
            ProcessEntry(int(pid), job_id, str(step))
            for step, plist in dict(pids or {}).items()
            for pid in plist
        ]
        return Parsed(tuple(entries))
