"""ExecutorMeter on real processes: CPU rate and memory of an executor's workers."""

from __future__ import annotations

import subprocess
import sys
import time

from colocate.metrics.executor_meter import ExecutorMeter

BURN = "import time\nb = bytearray(32 * 1024 * 1024)\nwhile True:\n    pass\n"
SLEEP = "import time\ntime.sleep(60)\n"


def test_busy_and_idle_executors_are_told_apart() -> None:
    busy = subprocess.Popen([sys.executable, "-c", BURN])
    idle = subprocess.Popen([sys.executable, "-c", SLEEP])
    try:
        meter = ExecutorMeter()
        time.sleep(0.3)
        first = meter.measure([("L1", (busy.pid,)), ("L2", (idle.pid,))], time.time())
        assert all(ex.cores_used == 0.0 for ex in first)  # no window yet
        time.sleep(1.0)
        pairs = [("L1", (busy.pid,)), ("L2", (idle.pid,))]
        states = {ex.lease_id: ex for ex in meter.measure(pairs, time.time())}
        assert states["L1"].state == "busy" and states["L1"].cores_used > 0.1
        assert states["L1"].memory_used_bytes > 32 * 1024 * 1024
        assert states["L2"].state == "idle" and states["L2"].cores_used < 0.05
        busy.kill()
        busy.wait()
        gone = {ex.lease_id: ex for ex in meter.measure([("L1", (busy.pid,))], time.time())}
        assert gone["L1"].state == "stopping" and gone["L1"].memory_used_bytes == 0
    finally:
        for p in (busy, idle):
            p.kill()
            p.wait()
