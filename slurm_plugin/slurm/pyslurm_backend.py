"""The pyslurm backend: Slurm's C API in-process, no fork per question.

pyslurm is built for one Slurm major.minor release and refuses any other, so the release
must match the site's Slurm: PyPI has only 25.11.x (and 17/18); for Debian 12's Slurm 22.05
a wheel of pyslurm 22.5.3 is built from source (``scripts/setup --dev`` installs the one in
``../shared/vendor/`` when present). ``PyslurmSlurm()`` raises a ConfigError naming both
versions and what to do when they differ.

It uses pyslurm's object API, the same in 22.5.3 and 23.x+ for what colocate asks:
``pyslurm.Jobs.load()`` (22.5: a dict of id -> Job; 23.x+: a multi-cluster map; both have
``.values()``), ``Job.allocated_nodes``, ``Job.get_resource_layout_per_node()`` (per node
``cpu_ids`` and ``memory`` in MiB) and ``pyslurm.Node.load(name)``. Older pyslurm releases
without that API are refused at construction. pyslurm 22.5 has no binding for
``slurm_list_pids``: where ``Job.get_pids`` is missing, ``listpids`` is answered by
``scontrol listpids`` through the CLI backend, so the seam keeps one behaviour.
"""

from __future__ import annotations

import importlib
import subprocess
from types import ModuleType
from typing import Any

from colocate.errors import ConfigError, SlurmUnavailable
from colocate.units import MIB
from slurm_plugin.slurm.cli import CliSlurm
from slurm_plugin.slurm.hostlist import expand_hostlist, parse_cpu_ids
from slurm_plugin.slurm.parse import number
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
    if not all(hasattr(mod, api) for api in ("Jobs", "Job", "Node")):
        raise ConfigError(
            f"pyslurm backend unavailable: pyslurm {built} predates the object API "
            "(Jobs, Job, Node); install pyslurm 22.5.3 or later for this Slurm, "
            "or use the cli backend",
            key="slurm.backend",
        )
    return mod


def _int(value: Any) -> int:
    n = number(value)
    return int(n) if n is not None else 0


class PyslurmSlurm:
    """Slurm through pyslurm. Construction checks the version match and fails early.

    ``cli`` answers what pyslurm has no binding for (``listpids`` on 22.5).
    """

    name = "pyslurm"

    def __init__(
        self,
        module: ModuleType | None = None,
        slurm_version: str | None = None,
        cli: CliSlurm | None = None,
    ) -> None:
        self._slurm_version = slurm_version or installed_slurm_version()
        self._m = module or load_pyslurm(self._slurm_version)
        self._cli = cli or CliSlurm()

    def version(self) -> str:
        return self._slurm_version

    def _call(self, what: str, fn: Any, *args: Any) -> Any:
        """The one place pyslurm is called; its RPC errors become SlurmUnavailable."""
        try:
            return fn(*args)
        except Exception as exc:  # pyslurm raises RPCError, ValueError and plain errors alike
            raise SlurmUnavailable(f"pyslurm {what} failed: {exc}") from None

    def jobs_on_node(self, node: str) -> Parsed[JobOnNode]:
        jobs = self._call("Jobs.load", self._m.Jobs.load)
        out: list[JobOnNode] = []
        warnings: list[str] = []
        # 22.5's Jobs is a dict of id -> Job; 23.x+'s a multi-cluster map: .values() on both
        for job in jobs.values():
            try:
                state = job_state(getattr(job, "state", None))
                if not state.holds_resources:
                    continue
                hosts = getattr(job, "allocated_nodes", None) or getattr(job, "nodes", "")
                nodes = expand_hostlist(str(hosts or ""))
                if node not in nodes:
                    continue
                layout = job.get_resource_layout_per_node().get(node, {})
                ids = parse_cpu_ids(str(layout.get("cpu_ids", "")))
                mem = number(layout.get("memory")) or 0
                start = number(getattr(job, "start_time", None))
                limit = number(getattr(job, "time_limit", None))  # minutes, None = unlimited
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
                        time_limit_s=limit * 60.0 if limit is not None else None,
                    )
                )
            except (AttributeError, ValueError, TypeError) as exc:
                warnings.append(f"pyslurm: skipped job {getattr(job, 'id', '?')}: {exc}")
        return Parsed(tuple(out), tuple(warnings))

    def node_info(self, node: str) -> NodeInfo:
        try:
            n = self._m.Node.load(node)
        except Exception as exc:  # RPCError for an unknown node and for a silent slurmctld
            if "does not exist" in str(exc):
                raise ConfigError(
                    f"Slurm has no node {node!r}; pass --node with one of `sinfo -N`"
                ) from None
            raise SlurmUnavailable(f"pyslurm Node.load({node}) failed: {exc}") from None
        free = number(getattr(n, "free_memory", None))
        state = str(getattr(n, "state", "UNKNOWN"))
        return NodeInfo(
            name=node,
            state=node_state(state.split("+")),
            cpus=int(n.total_cpus),
            real_memory_bytes=int(n.real_memory) * MIB,
            alloc_cpus=_int(getattr(n, "allocated_cpus", 0)),
            alloc_memory_bytes=_int(getattr(n, "allocated_memory", 0)) * MIB,
            free_memory_bytes=int(free) * MIB if free is not None else None,
            cpu_load=number(getattr(n, "cpu_load", None)),  # a load average already
            partitions=tuple(str(p) for p in getattr(n, "partitions", ()) or ()),
            state_raw=state,
        )

    def listpids(self, job_id: str, node: str | None = None) -> Parsed[ProcessEntry]:
        if not hasattr(self._m.Job, "get_pids"):  # 22.5: no binding for slurm_list_pids
            return self._cli.listpids(job_id, node)
        try:
            job = self._m.Job.load(int(job_id))
        except Exception:  # gone between the question and the answer, as the CLI backend
            return Parsed()
        pids = self._call("Job.get_pids", job.get_pids)
        entries = [
            ProcessEntry(int(pid), job_id, str(step))
            for step, plist in dict(pids or {}).items()
            for pid in plist
        ]
        return Parsed(tuple(entries))
