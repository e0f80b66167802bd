"""Confining an executor to its leased cores, memory and process count: cgroup v1, v2, or rlimits.

Standard library only (the prolog hook imports it to kill a dead agent's leases itself).

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
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from colocate.errors import BadRequest

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
    pids_max: int = 0  # 0: no pids controller


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
                if pids_max > 0:
                    with contextlib.suppress(FileNotFoundError):
                        _write(d / "pids.max", str(pids_max))
        except OSError:
            remove_dirs(tuple(dirs))
            raise
        return LeaseCgroups(self.mode, tuple(dirs), memory_bytes, pids_max)


def join(cgroups: LeaseCgroups, pid: int) -> None:
    """Move ``pid`` into the lease's cgroups (called by the worker itself, as root)."""
    for d in cgroups.dirs:
        _write(Path(d) / "cgroup.procs", str(pid))


def pids_in(dirs: tuple[str, ...]) -> set[int]:
    out: set[int] = set()
    for d in dirs:
        with contextlib.suppress(OSError, ValueError):
            out.update(int(x) for x in (Path(d) / "cgroup.procs").read_text().split())
    return out


def _freezer_of(dirs: list[str]) -> Path | None:
    for d in dirs:
        if (Path(d) / "freezer.state").exists():
            return Path(d)
    return None


def kill_cgroups(dirs: tuple[str, ...], warn_after_s: float = 1.0) -> None:
    """SIGKILL every task in ``dirs`` until they are all empty. Never gives up.

    v2: ``cgroup.kill``. v1: the lease's freezer group is frozen first, so that nothing forks
    between the listing and the kill, every task gets SIGKILL, then it is thawed (a frozen task
    cannot die). Logs a warning every ``warn_after_s`` seconds while tasks remain (a task in
    uninterruptible sleep on a hung file system dies only when its I/O ends).
    """
    left = [d for d in dirs if os.path.isdir(d)]
    freezer = _freezer_of(left)
    started = warned = time.monotonic()
    pause = 0.0005
    while True:
        pids = pids_in(tuple(left))
        if not pids:
            return
        for d in left:
            with contextlib.suppress(OSError):
                _write(Path(d) / "cgroup.kill", "1")  # v2 only; v1 has no such file
        if freezer is not None:
            with contextlib.suppress(OSError):
                _write(freezer / "freezer.state", "FROZEN")
        for pid in pids_in(tuple(left)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if freezer is not None:
            with contextlib.suppress(OSError):
                _write(freezer / "freezer.state", "THAWED")
        now = time.monotonic()
        if now - warned > warn_after_s:
            warned = now
            log.warning(
                "cgroups %s still hold tasks %s after %.1f s; still killing",
                left,
                sorted(pids),
                now - started,
            )
        time.sleep(pause)
        pause = min(pause * 2, 0.05)


def remove_dirs(dirs: tuple[str, ...], timeout_s: float = 10.0) -> bool:
    """Kill what is left in the cgroups (never giving up, see :func:`kill_cgroups`) and remove
    them; True when all are gone.

    ``rmdir`` fails with EBUSY for a moment after the last task has died, so it is retried for
    up to ``timeout_s`` seconds.
    """
    deadline = time.monotonic() + timeout_s
    left = [d for d in dirs if os.path.isdir(d)]
    while left:
        kill_cgroups(tuple(left))
        still: list[str] = []
        for d in left:
            try:
                os.rmdir(d)
            except FileNotFoundError:
                pass
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    log.warning("cannot remove cgroup %s: %s", d, exc)
                    return False
                still.append(d)
        left = still
        if left:
            if time.monotonic() > deadline:
                log.warning("cgroups still busy after %.1f s: %s", timeout_s, left)
                return False
            time.sleep(0.001)
    return True


def lease_cgroups_on(
    node: str, cpu_ids: frozenset[int] | None, cgroup_root: str = "/sys/fs/cgroup"
) -> dict[str, tuple[str, ...]]:
    """Every lease cgroup directory of ``node`` (v1 or v2), by lease id; with ``cpu_ids``, only
    the leases whose cpuset touches those cores (a lease without a readable cpuset is
    included: the safe side). For the prolog when the agent does not answer."""
    root = Path(cgroup_root)
    bases = [root / c / "colocate" / node for c in ("memory", "cpuset", "pids", "freezer")]
    bases.append(root / "colocate" / node)
    found: dict[str, list[str]] = {}
    cpus_of: dict[str, set[int] | None] = {}
    for base in bases:
        try:
            children = [c for c in base.iterdir() if c.is_dir()]
        except OSError:
            continue
        for child in children:
            found.setdefault(child.name, []).append(str(child))
            try:
                cpus = parse_cpu_list(_read(child / "cpuset.cpus"))
            except (OSError, ValueError):
                continue
            cpus_of[child.name] = cpus if cpus else None
    out: dict[str, tuple[str, ...]] = {}
    for lease, lease_dirs in found.items():
        lease_cpus = cpus_of.get(lease)
        if cpu_ids is None or lease_cpus is None or lease_cpus & cpu_ids:
            out[lease] = tuple(lease_dirs)
    return out


def parse_cpu_list(text: str) -> set[int]:
    """``"0-2,5"`` -> ``{0, 1, 2, 5}``."""
    out: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        out.update(range(int(first), int(last or first) + 1))
    return out
