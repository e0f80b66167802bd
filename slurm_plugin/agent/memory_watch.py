"""Wake the agent as soon as the node's jobs grow in memory, not at the next interval.

cgroup v1 memory threshold notifications: an eventfd registered in ``cgroup.event_control``
of Slurm's node group (``/sys/fs/cgroup/memory/slurm_<node>``, the parent of every job group)
fires when ``memory.usage_in_bytes`` crosses a threshold. The watch keeps the threshold at
the current usage plus ``step_bytes`` (16 MiB; re-armed after each event and every ``rearm_s``, so it
follows the usage down too) and calls ``wake`` when it fires: the agent then samples and
decides at once, so a lease whose memory a growing job needs is evicted milliseconds after
the job crossed the step, instead of up to one interval later.

Where there is no such group (cgroup v2, no job ran yet) the watch retries every ``rearm_s``
and the agent still decides every interval.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

#: Growth (bytes) of the node's jobs together that wakes the agent. Growth that stops short
#: of a step is seen at the next interval; the policies' memory margin (256 MiB) covers it.
DEFAULT_STEP_BYTES = 16 * 1024**2
#: Least time between two wake-ups (seconds): a job growing fast wakes the agent at most
#: 1 / MIN_WAKE_GAP_S times a second.
MIN_WAKE_GAP_S = 0.02
#: Growth below this during a gap counts as none (allocator noise), bytes.
GROWTH_NOISE_BYTES = 1024**2


class MemoryWatch:
    """Calls ``wake()`` when the memory of ``group`` grows by ``step_bytes``; a daemon thread.

    ``fired`` counts the notifications; ``last_fired`` is their latest ``time.monotonic()``.
    """

    def __init__(
        self,
        group: Path,
        wake: Callable[[], None],
        *,
        step_bytes: int = DEFAULT_STEP_BYTES,
        rearm_s: float = 1.0,
    ) -> None:
        self.group = Path(group)
        self.wake = wake
        self.step_bytes = step_bytes
        self.rearm_s = rearm_s
        self.fired = 0
        self.last_fired: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-watch", daemon=True)
        self._warned = False

    @classmethod
    def for_node(
        cls, node: str, wake: Callable[[], None], root: str | Path = "/sys/fs/cgroup/memory"
    ) -> MemoryWatch:
        """The watch on Slurm's cgroup v1 group of ``node`` (``slurm_<node>``, or ``slurm`` for a
        single slurmd per host, whichever exists first)."""
        base = Path(root)
        named = base / f"slurm_{node}"
        group = named if named.exists() or not (base / "slurm").exists() else base / "slurm"
        return cls(group, wake)

    def start(self) -> MemoryWatch:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)

    def _arm(self) -> tuple[int, int] | None:
        """A new eventfd at usage + step; None when the group is not there (yet)."""
        try:
            usage = int((self.group / "memory.usage_in_bytes").read_text())
            ufd = os.open(self.group / "memory.usage_in_bytes", os.O_RDONLY | os.O_CLOEXEC)
        except (OSError, ValueError):
            return None
        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            (self.group / "cgroup.event_control").write_text(
                f"{efd} {ufd} {usage + self.step_bytes}"
            )
        except OSError as exc:
            os.close(efd)
            os.close(ufd)
            if not self._warned:
                log.warning(
                    "memory watch on %s unavailable (%s); deciding every interval only",
                    self.group,
                    exc,
                )
                self._warned = True
            return None
        return efd, ufd

    def _usage(self) -> int | None:
        try:
            return int((self.group / "memory.usage_in_bytes").read_text())
        except (OSError, ValueError):
            return None

    def _wake_while_growing(self) -> None:
        """Wake the agent, then again after each gap in which the usage kept growing (the
        threshold is re-armed only once the growth pauses, so none of it goes unseen)."""
        seen = self._usage()
        self.wake()
        while not self._stop.wait(MIN_WAKE_GAP_S):
            now = self._usage()
            if now is None or seen is None or now <= seen + GROWTH_NOISE_BYTES:
                return
            seen = now
            self.wake()

    def _run(self) -> None:
        fds: tuple[int, int] | None = None
        try:
            while not self._stop.is_set():
                if fds is None:
                    fds = self._arm()
                    if fds is None:
                        self._stop.wait(self.rearm_s)
                        continue
                ready, _, _ = select.select([fds[0]], [], [], self.rearm_s)
                if ready:
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(fds[0])
                    self.fired += 1
                    self.last_fired = time.monotonic()
                    self._wake_while_growing()
                for fd in fds:  # closing the eventfd unregisters it
                    os.close(fd)
                fds = None
        finally:
            if fds is not None:
                for fd in fds:
                    os.close(fd)
