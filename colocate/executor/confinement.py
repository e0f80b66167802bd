"""Confining an executor to its leased cores, memory and process count: cgroup v1, v2, or rlimits.

Each lease gets ``<cgroup_root>/<controller>/colocate/<node>/<lease>/`` (v1) or
``<cgroup_root>/colocate/<node>/<lease>/`` (v2), under the agent's own ``colocate`` subtree and
never inside a Slurm job's cgroup. The node level keeps several agents on one machine (the dev
cluster) out of each other's leases. Where no cgroup hierarchy is writable (a laptop, a
container), workers get ``RLIMIT_AS`` and the supervisor runs an RSS watchdog instead.

On v1 a lease also gets a ``pids`` group (``pids.max``) and a ``freezer`` group, so that
:func:`kill_cgroups` can stop every task of the lease at once (a fork bomb cannot outrun the
kill loop), SIGKILL them all, and thaw; it loops until the groups are empty and never gives up
(v2: ``cgroup.kill``).

The supervisor creates and removes the directories; each worker joins them itself, before it
drops privileges, by writing its pid to ``cgroup.procs``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from colocate.errors import BadRequest
from colocate.executor import cgroupkill
from colocate.executor.cgroupkill import lease_cgroups_on, parse_cpu_list, pids_in

__all__ = [
    "Confinement",
    "LeaseCgroups",
    "check_name",
    "join",
    "kill_cgroups",
    "lease_cgroups_on",
    "parse_cpu_list",
    "pids_in",
    "remove_dirs",
]

log = logging.getLogger(__name__)

_LEASE_ID = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


def check_name(value: str, what: str) -> str:
    """A lease id or node name usable as a directory name, or BadRequest."""
    if not _LEASE_ID.match(value) or value in (".", ".."):
        raise BadRequest(f"{what} {value!r} must be 1-128 characters of A-Z a-z 0-9 _ . -")
    return value


@dataclass(frozen=True, slots=True)
class LeaseCgroups:
    """Where one lease's processes live; ``dirs`` is empty in rlimit mode."""

    mode: Literal["v1", "v2", "rlimit"]
    dirs: tuple[str, ...]
    memory_bytes: int
    pids_max: int = 0  # the cgroup pids limit set; 0: none (no pids controller)


def _write(path: Path, value: str) -> None:
    path.write_text(value)


def _read(path: Path) -> str:
    return path.read_text().strip()


class Confinement:
    """Detects the cgroup layout once and creates/removes per-lease cgroups.

    ``cgroup_root`` is the cgroup filesystem mount point (``/sys/fs/cgroup``).
    """

    def __init__(self, node: str, cgroup_root: str | None = "/sys/fs/cgroup") -> None:
        self.node = check_name(node, "node")
        self.mode: Literal["v1", "v2", "rlimit"] = "rlimit"
        self._v1_memory: Path | None = None
        self._v1_cpuset: Path | None = None
        self._v1_pids: Path | None = None
        self._v1_freezer: Path | None = None
        self._v2: Path | None = None
        if cgroup_root is not None:
            self._detect(Path(cgroup_root))
        log.info("executor confinement on node %s: %s", node, self.mode)

    def _detect(self, root: Path) -> None:
        if (root / "memory" / "memory.limit_in_bytes").exists():
            try:
                self._v1_memory = self._ensure_v1(root / "memory", cpuset=False)
                if (root / "cpuset" / "cpuset.cpus").exists():
                    self._v1_cpuset = self._ensure_v1(root / "cpuset", cpuset=True)
                if (root / "pids" / "cgroup.procs").exists():
                    self._v1_pids = self._ensure_v1(root / "pids", cpuset=False)
                if (root / "freezer" / "cgroup.procs").exists():
                    self._v1_freezer = self._ensure_v1(root / "freezer", cpuset=False)
                self.mode = "v1"
            except OSError as exc:
                log.warning("cgroup v1 at %s not writable (%s); using rlimits", root, exc)
        elif (root / "cgroup.controllers").exists():
            try:
                self._v2 = self._ensure_v2(root)
                self.mode = "v2"
            except OSError as exc:
                log.warning("cgroup v2 at %s not writable (%s); using rlimits", root, exc)

    def _ensure_v1(self, controller: Path, *, cpuset: bool) -> Path:
        base = controller
        for part in ("colocate", self.node):
            child = base / part
            child.mkdir(exist_ok=True)
            if cpuset:  # a cpuset cgroup holds no task until cpus and mems are set
                for key in ("cpuset.cpus", "cpuset.mems"):
                    if not _read(child / key):
                        _write(child / key, _read(base / key))
            base = child
        return base

    def _ensure_v2(self, root: Path) -> Path:
        base = root
        for part in ("colocate", self.node):
            with contextlib.suppress(OSError):
                _write(base / "cgroup.subtree_control", "+memory +cpuset +pids")
            base = base / part
            base.mkdir(exist_ok=True)
        with contextlib.suppress(OSError):
            _write(base / "cgroup.subtree_control", "+memory +cpuset +pids")
        enabled = {c.lstrip("+") for c in (base / "cgroup.subtree_control").read_text().split()}
        if "memory" not in enabled:
            raise OSError(errno.EPERM, "memory controller not delegated", str(base))
        return base

    def lease_dirs(self) -> dict[str, list[str]]:
        """lease id -> cgroup directories that exist for it (to clean up after a restart)."""
        found: dict[str, list[str]] = {}
        for base in (self._v1_memory, self._v1_cpuset, self._v1_pids, self._v1_freezer, self._v2):
            if base is None:
                continue
            for child in base.iterdir():
                if child.is_dir():
                    found.setdefault(child.name, []).append(str(child))
        return found

    def create(
        self, lease_id: str, cpu_ids: tuple[int, ...], memory_bytes: int, pids_max: int = 0
    ) -> LeaseCgroups:
        """Create the lease's cgroups with its memory limit, cpuset and (``pids_max`` > 0) pids
        limit; returns their paths."""
        check_name(lease_id, "lease id")
        dirs: list[str] = []
        limited = 0  # the pids limit actually set
        try:
            if self.mode == "v1":
                assert self._v1_memory is not None
                mem = self._v1_memory / lease_id
                mem.mkdir(exist_ok=True)
                dirs.append(str(mem))
                _write(mem / "memory.limit_in_bytes", str(memory_bytes))
                if (mem / "memory.memsw.limit_in_bytes").exists():  # no escape into swap
                    _write(mem / "memory.memsw.limit_in_bytes", str(memory_bytes))
                if self._v1_cpuset is not None:
                    cs = self._v1_cpuset / lease_id
                    cs.mkdir(exist_ok=True)
                    dirs.append(str(cs))
                    _write(cs / "cpuset.cpus", ",".join(map(str, cpu_ids)))
                    _write(cs / "cpuset.mems", _read(self._v1_cpuset / "cpuset.mems"))
                if self._v1_pids is not None and pids_max > 0:
                    pg = self._v1_pids / lease_id
                    pg.mkdir(exist_ok=True)
                    dirs.append(str(pg))
                    _write(pg / "pids.max", str(pids_max))
                    limited = pids_max
                if self._v1_freezer is not None:
                    fz = self._v1_freezer / lease_id
                    fz.mkdir(exist_ok=True)
                    dirs.append(str(fz))
            elif self.mode == "v2":
                assert self._v2 is not None
                d = self._v2 / lease_id
                d.mkdir(exist_ok=True)
                dirs.append(str(d))
                _write(d / "memory.max", str(memory_bytes))
                with contextlib.suppress(FileNotFoundError):
                    _write(d / "memory.swap.max", "0")
                with contextlib.suppress(FileNotFoundError):
                    _write(d / "cpuset.cpus", ",".join(map(str, cpu_ids)))
                if pids_max > 0 and (d / "pids.max").exists():
                    _write(d / "pids.max", str(pids_max))
                    limited = pids_max
        except OSError:
            remove_dirs(tuple(dirs))
            raise
        return LeaseCgroups(self.mode, tuple(dirs), memory_bytes, limited)


def kill_cgroups(dirs: tuple[str, ...], warn_after_s: float = 1.0) -> None:
    """See :func:`colocate.executor.cgroupkill.kill_cgroups`; warnings go to the log."""
    cgroupkill.kill_cgroups(dirs, warn_after_s, warn=log.warning)


def remove_dirs(dirs: tuple[str, ...], timeout_s: float = 10.0) -> bool:
    """See :func:`colocate.executor.cgroupkill.remove_dirs`; warnings go to the log."""
    return cgroupkill.remove_dirs(dirs, timeout_s, warn=log.warning)


def join(cgroups: LeaseCgroups, pid: int) -> None:
    """Move ``pid`` into the lease's cgroups (called by the worker itself, as root)."""
    for d in cgroups.dirs:
        _write(Path(d) / "cgroup.procs", str(pid))
