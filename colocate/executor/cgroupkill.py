"""Killing everything in a lease's cgroups, and finding a node's lease cgroups.

Standard library only, without logging or threads: the prolog hook imports it to free a job's
cores itself when the agent does not answer. Messages go to an optional ``warn`` callable.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

Warn = Callable[[str], None]


def _say(warn: Warn | None, message: str) -> None:
    if warn is not None:
        warn(message)


def _write(path: Path, value: str) -> None:
    path.write_text(value)


def _read(path: Path) -> str:
    return path.read_text().strip()


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


def kill_cgroups(
    dirs: tuple[str, ...], warn_after_s: float = 1.0, warn: Warn | None = None
) -> None:
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
            _say(
                warn,
                f"cgroups {left} still hold tasks {sorted(pids)} after {now - started:.1f} s; still killing",
            )
        time.sleep(pause)
        pause = min(pause * 2, 0.05)


def remove_dirs(dirs: tuple[str, ...], timeout_s: float = 10.0, warn: Warn | None = None) -> bool:
    """Kill what is left in the cgroups (never giving up, see :func:`kill_cgroups`) and remove
    them; True when all are gone.

    ``rmdir`` fails with EBUSY for a moment after the last task has died, so it is retried for
    up to ``timeout_s`` seconds.
    """
    deadline = time.monotonic() + timeout_s
    left = [d for d in dirs if os.path.isdir(d)]
    while left:
        kill_cgroups(tuple(left), warn=warn)
        still: list[str] = []
        for d in left:
            try:
                os.rmdir(d)
            except FileNotFoundError:
                pass
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    _say(warn, f"cannot remove cgroup {d}: {exc}")
                    return False
                still.append(d)
        left = still
        if left:
            if time.monotonic() > deadline:
                _say(warn, f"cgroups still busy after {timeout_s:.1f} s: {left}")
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
