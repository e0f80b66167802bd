"""What the executors use right now, from their processes (the I/O edge of the metrics).

The agent knows each lease's executor pids (``ExecutorHandle.pids``); once per cycle it asks
:meth:`ExecutorMeter.measure` for ``ExecutorState`` values to put in its ``NodeState``.
CPU use is a rate between two calls, so the first measurement of an executor reports 0.0
cores (psutil's ``cpu_percent()`` has the same quirk). Memory is the sum of the workers'
RSS; forked workers share pages, so this over-counts a little, never under-counts.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import psutil

from colocate.metrics.state import ExecutorState

log = logging.getLogger(__name__)

__all__ = ["BUSY_CORES", "ExecutorMeter"]

#: An executor using at least this many cores is ``busy``, else ``idle`` (inferred from CPU).
BUSY_CORES = 0.05


class ExecutorMeter:
    """Turns executor pids into ``ExecutorState``; remembers CPU times between calls."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[float, float]] = {}  # lease_id -> (now, cpu seconds)

    def measure(
        self,
        executors: Iterable[tuple[str, Sequence[int]]],
        now: float,
        *,
        stopping: Iterable[str] = (),
    ) -> tuple[ExecutorState, ...]:
        """``executors``: (lease_id, pids) pairs; ``now``: epoch seconds of this cycle.

        Leases in ``stopping`` (being evicted) are reported as ``stopping``. A pid that is
        gone counts as using nothing; an executor with no live pid is ``stopping``.
        """
        stopping = set(stopping)
        out: list[ExecutorState] = []
        seen: set[str] = set()
        for lease_id, pids in executors:
            seen.add(lease_id)
            cpu_s, rss, alive = 0.0, 0, 0
            for pid in pids:
                try:
                    proc = psutil.Process(pid)
                    with proc.oneshot():
                        times = proc.cpu_times()
                        cpu_s += times.user + times.system
                        rss += proc.memory_info().rss
                    alive += 1
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
            cores = 0.0
            previous = self._last.get(lease_id)
            if previous is not None and now > previous[0] and cpu_s >= previous[1]:
                cores = (cpu_s - previous[1]) / (now - previous[0])
            self._last[lease_id] = (now, cpu_s)
            if lease_id in stopping or not alive:
                state = "stopping"
            else:
                state = "busy" if cores >= BUSY_CORES else "idle"
            out.append(ExecutorState(lease_id, lease_id, state, cores, rss))
        for lease_id in set(self._last) - seen:
            del self._last[lease_id]
        return tuple(out)
