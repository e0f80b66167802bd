"""The agent's memory watch on a real cgroup v1 memory group: it wakes the agent when the
group grows by a step, within milliseconds, and stays quiet while nothing grows."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from slurm_plugin.agent.memory_watch import MemoryWatch
from tests.conftest import require

pytestmark = [pytest.mark.root]

MEMORY = Path("/sys/fs/cgroup/memory")
MiB = 1024**2
GROWER = (
    "import sys, time\n"
    "print('ready', flush=True)\n"
    "sys.stdin.readline()\n"
    "block = bytearray(96 << 20)\n"
    "for i in range(0, len(block), 4096): block[i] = 1\n"
    "print(time.time(), flush=True)\n"
    "sys.stdin.readline()\n"
)


@pytest.fixture
def group() -> Iterator[Path]:
    require(
        os.geteuid() == 0 and (MEMORY / "cgroup.event_control").exists(),
        "needs root and cgroup v1 memory",
    )
    path = MEMORY / f"colocate-watch-test-{os.getpid()}"
    path.mkdir()
    yield path
    for _ in range(50):
        try:
            path.rmdir()
            return
        except OSError:
            time.sleep(0.1)


def test_growth_by_a_step_wakes_the_agent_at_once(group: Path) -> None:
    woken: list[float] = []
    watch = MemoryWatch(
        group, lambda: woken.append(time.time()), step_bytes=32 * MiB, rearm_s=0.2
    ).start()
    proc = subprocess.Popen(
        [sys.executable, "-c", GROWER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        (group / "cgroup.procs").write_text(str(proc.pid))
        proc.stdout.readline()
        time.sleep(0.6)  # armed at the idle process's usage
        quiet = list(woken)
        started = time.time()
        proc.stdin.write("\n")
        proc.stdin.flush()
        grown_at = float(proc.stdout.readline())
        time.sleep(0.3)
        assert quiet == [], "woke while nothing grew"
        after = [t for t in woken if t >= started]
        assert after, "96 MiB of growth did not wake the agent"
        # The first wake-up comes while the block is being touched, not a poll interval later.
        assert after[0] <= grown_at + 0.05, (after[0] - started, grown_at - started)
    finally:
        proc.stdin.write("\n")
        proc.stdin.close()
        proc.wait(10)
        watch.close()


def test_no_group_means_no_watch_and_no_error(tmp_path: Path) -> None:
    watch = MemoryWatch(tmp_path / "absent", lambda: None, rearm_s=0.05).start()
    time.sleep(0.2)
    watch.close()
    assert watch.fired == 0
