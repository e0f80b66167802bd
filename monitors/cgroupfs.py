"""Reading cgroup and /proc files without letting a vanished or unreadable file stop a sample.

Every reader takes a ``Skips`` collector: a file that is missing or unreadable is noted
there (named), and the caller carries on with what it has.
"""

from __future__ import annotations

import os
from pathlib import Path

from slurm_plugin.slurm import parse_cpu_ids


class Skips:
    """Collects one warning per thing that could not be read."""

    def __init__(self) -> None:
        self.warnings: list[str] = []

    def note(self, what: str, exc: BaseException | str) -> None:
        reason = exc if isinstance(exc, str) else _reason(exc)
        self.warnings.append(f"skipped {what}: {reason}")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "missing"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, ValueError):
        return f"unreadable ({exc})"
    return f"{type(exc).__name__}: {exc}"


def read_text(path: Path, skips: Skips | None = None) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        if skips is not None:
            skips.note(str(path), exc)
        return None


def read_int(path: Path, skips: Skips | None = None) -> int | None:
    text = read_text(path, skips)
    if text is None:
        return None
    try:
        return int(text.split()[0])
    except (ValueError, IndexError):
        if skips is not None:
            skips.note(str(path), ValueError(f"not a number: {text[:40]!r}"))
        return None


def read_int_list(path: Path, skips: Skips | None = None) -> tuple[int, ...] | None:
    """Space-separated integers on one line (``cpuacct.usage_percpu``); None if unreadable."""
    text = read_text(path, skips)
    if text is None:
        return None
    try:
        return tuple(int(word) for word in text.split())
    except ValueError:
        if skips is not None:
            skips.note(str(path), ValueError(f"not numbers: {text[:40]!r}"))
        return None


def read_flat_keyed(path: Path, skips: Skips | None = None) -> dict[str, int]:
    """``key value`` lines (``memory.stat``, ``cpu.stat``) as a dict; bad lines are ignored."""
    text = read_text(path, skips)
    out: dict[str, int] = {}
    for line in (text or "").splitlines():
        key, _, value = line.partition(" ")
        try:
            out[key] = int(value)
        except ValueError:
            continue
    return out


def read_cpuset(path: Path, skips: Skips | None = None) -> tuple[int, ...] | None:
    text = read_text(path, skips)
    if text is None:
        return None
    try:
        return parse_cpu_ids(text)
    except ValueError as exc:
        if skips is not None:
            skips.note(str(path), exc)
        return None


def subtree_pids(
    directory: Path, skips: Skips | None = None, skip_dirs: frozenset[str] = frozenset()
) -> set[int]:
    """Pids in ``cgroup.procs`` of ``directory`` and every group below it, except groups
    named in ``skip_dirs`` (v2 keeps slurmstepd itself in ``step_*/slurm``)."""
    pids: set[int] = set()
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = [d for d in dirnames if d not in skip_dirs]
        if "cgroup.procs" not in filenames:
            continue
        text = read_text(Path(dirpath) / "cgroup.procs", skips)
        pids.update(int(p) for p in (text or "").split() if p.isdigit())
    return pids


def subtree_tids(directory: Path) -> set[int]:
    """Thread ids in ``tasks`` of ``directory`` and every group below it (cgroup v1)."""
    tids: set[int] = set()
    for dirpath, _, filenames in os.walk(directory):
        if "tasks" in filenames:
            text = read_text(Path(dirpath) / "tasks")
            tids.update(int(t) for t in (text or "").split() if t.isdigit())
    return tids


def run_delays(tids: set[int], proc: Path) -> dict[int, tuple[int, int]]:
    """Each thread's cumulative (time on a CPU, time waiting on a run queue), ns, from
    ``/proc/TID/schedstat``; threads that exited meanwhile are left out."""
    out: dict[int, tuple[int, int]] = {}
    for tid in tids:
        text = read_text(proc / str(tid) / "schedstat")
        fields = (text or "").split()
        if len(fields) >= 2 and fields[0].isdigit() and fields[1].isdigit():
            out[tid] = (int(fields[0]), int(fields[1]))
    return out


def unified_path(pid: int, proc: Path) -> str | None:
    """The cgroup v2 path of ``pid`` (the ``0::`` line of /proc/PID/cgroup), or None."""
    text = read_text(proc / str(pid) / "cgroup")
    for line in (text or "").splitlines():
        if line.startswith("0::"):
            return line[3:].strip() or "/"
    return None


def environ_value(pid: int, proc: Path, key: str) -> str | None:
    """One variable of a process's environment (root or the same user only)."""
    try:
        data = (proc / str(pid) / "environ").read_bytes()
    except OSError:
        return None
    prefix = key.encode() + b"="
    for item in data.split(b"\0"):
        if item.startswith(prefix):
            return item[len(prefix) :].decode(errors="replace")
    return None
