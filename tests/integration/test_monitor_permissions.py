"""Permission denied on cgroup and /proc files: named in a warning, the rest still read.

Runs the source in a forked child that dropped root for ``nobody`` (root reads anything)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from monitors.cgroup_v1 import CgroupV1Source
from monitors.procscan import ProcessScanSource
from tests.conftest import require

pytestmark = pytest.mark.root

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "cgroup" / "v1"
NOBODY = 65534


def as_nobody(fn: Callable[[], object]) -> object:
    """Run ``fn`` in a child process as uid/gid nobody; return its JSON-able result."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            data = json.dumps({"ok": fn()}).encode()
        except BaseException as exc:  # report anything, never return into pytest
            data = json.dumps({"error": repr(exc)}).encode()
        os.write(write_end, data)
        os._exit(0)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 65536):
        chunks.append(chunk)
    os.close(read_end)
    os.waitpid(pid, 0)
    result = json.loads(b"".join(chunks))
    assert "error" not in result, result
    return result["ok"]


@pytest.fixture
def tree() -> Iterator[Path]:
    require(os.geteuid() == 0, "needs root to drop to nobody")
    base = Path(tempfile.mkdtemp(prefix="colocate-perm-"))
    base.chmod(0o755)
    root = base / "v1"
    shutil.copytree(FIX, root)
    for d in root.rglob("*"):
        d.chmod(0o755 if d.is_dir() else 0o644)
    yield root
    shutil.rmtree(base)


def test_an_unreadable_cgroup_file_is_named_and_the_rest_is_read(tree: Path) -> None:
    job = tree / "memory" / "slurm_n1" / "uid_0" / "job_10"
    (job / "memory.stat").chmod(0o600)

    def read() -> object:
        reading = CgroupV1Source(tree).read("n1")
        usage = reading.jobs["10"]
        return {
            "warnings": list(reading.warnings),
            "cpu": usage.cpu_seconds_total,
            "mem": usage.memory_bytes,
        }

    got = as_nobody(read)
    assert isinstance(got, dict)
    assert any("memory.stat: permission denied" in w for w in got["warnings"])
    assert got["cpu"] > 0 and got["mem"] > 0


def test_unreadable_process_environments_are_reported_not_fatal(
    spawned_root_job: subprocess.Popen[bytes],
) -> None:
    def read() -> object:
        reading = ProcessScanSource().read("nX")  # root's /proc/PID/environ is unreadable now
        return {"jobs": sorted(reading.jobs), "warnings": list(reading.warnings)}

    got = as_nobody(read)
    assert isinstance(got, dict)
    assert "987660" not in got["jobs"]  # only its environment names the job
    assert any("permission denied" in w and "run as root" in w for w in got["warnings"])
    # as root the same process is found
    assert "987660" in ProcessScanSource().read("nX").jobs


@pytest.fixture
def spawned_root_job() -> Iterator[subprocess.Popen[bytes]]:
    require(os.geteuid() == 0, "needs root to drop to nobody")
    proc = subprocess.Popen(["sleep", "60"], env={**os.environ, "SLURM_JOB_ID": "987660"})
    yield proc
    proc.kill()
    proc.wait()
