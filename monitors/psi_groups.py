"""Per-job PSI on cgroup v1 machines that also mount cgroup2 (hybrid mode). Opt-in.

Slurm's v1 plugin leaves job processes at the root of the unified (v2) hierarchy, so the
kernel keeps no pressure figures per job. With ``PsiGroups`` the monitor moves each job's
processes into ``<unified>/colocate-psi/<node>/job_<id>/`` (a pure tracking group: no v2
controllers are enabled in hybrid mode, so no limit changes) and the kernel then reports
``cpu.pressure``/``memory.pressure`` per job. Children inherit the group; processes of new
steps are moved at the next sample. Groups of ended jobs are removed.

Only processes still at the unified root are moved: a process another manager placed in a
v2 group is left alone. Do not enable it where systemd runs in hybrid mode (systemd tracks
its units in that hierarchy). Needs root.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

from monitors.cgroupfs import Skips, unified_path

log = logging.getLogger(__name__)


class PsiGroups:
    """Moves job processes into per-job groups of the unified hierarchy (see module doc)."""

    def __init__(
        self,
        unified_root: str | Path = "/sys/fs/cgroup/unified",
        proc: str | Path = "/proc",
        parent: str = "colocate-psi",
    ) -> None:
        self.unified = Path(unified_root)
        self.proc = Path(proc)
        self.parent = parent
        self._placed: dict[str, set[int]] = {}

    @classmethod
    def available(cls, unified_root: str | Path = "/sys/fs/cgroup/unified") -> bool:
        """True when a cgroup2 hierarchy with PSI is mounted there and we may write to it."""
        root = Path(unified_root)
        return (
            (root / "cgroup.procs").is_file()
            and (root / "cpu.pressure").is_file()
            and os.access(root, os.W_OK)
        )

    def group(self, node: str, job_id: str) -> Path:
        return self.unified / self.parent / node / f"job_{job_id}"

    def attach(self, node: str, job_id: str, pids: Iterable[int], skips: Skips) -> Path | None:
        """Put the job's processes that sit at the unified root into its group; returns it."""
        group = self.group(node, job_id)
        key = f"{node}/{job_id}"
        placed = self._placed.setdefault(key, set())
        new = [p for p in pids if p not in placed]
        if not new and group.is_dir():
            return group
        try:
            group.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            skips.note(f"PSI group {group}", exc)
            return None
        for pid in new:
            if unified_path(pid, self.proc) == "/":
                try:
                    (group / "cgroup.procs").write_text(f"{pid}\n")
                except ProcessLookupError:
                    continue  # exited meanwhile
                except OSError as exc:
                    skips.note(f"moving pid {pid} into {group}", exc)
                    continue
            placed.add(pid)
        return group

    def prune(self, node: str, live_job_ids: Iterable[str]) -> None:
        """Remove the groups of jobs no longer on the node (only empty groups can go)."""
        live = set(live_job_ids)
        base = self.unified / self.parent / node
        if not base.is_dir():
            return
        for group in base.iterdir():
            job_id = group.name.removeprefix("job_")
            if job_id in live or not group.is_dir():
                continue
            try:
                group.rmdir()
                self._placed.pop(f"{node}/{job_id}", None)
            except OSError as exc:  # still has processes: try again next time
                log.debug("keeping %s: %s", group, exc)
