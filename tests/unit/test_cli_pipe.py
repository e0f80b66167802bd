"""Every CLI command ends quietly when its reader goes away (``colocate ... | head -1``)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from colocate.cli import SUBCOMMANDS


def _closed_pipe_run(*argv: str) -> subprocess.CompletedProcess[bytes]:
    """Run ``colocate argv`` with stdout a pipe whose reader is already gone."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [sys.executable, "-m", "colocate.cli", *argv],
            stdout=write_end,
            stderr=subprocess.PIPE,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)


def test_a_command_writing_into_a_closed_pipe_prints_no_traceback() -> None:
    # `dev-cluster status` only reads the cluster's state and prints one line per daemon
    # (before the fix: a BrokenPipeError traceback from its print()).
    assert "dev-cluster" in SUBCOMMANDS
    done = _closed_pipe_run("dev-cluster", "status")
    assert b"Traceback" not in done.stderr and b"BrokenPipe" not in done.stderr, done.stderr
    assert done.returncode == 141  # 128 + SIGPIPE, like a shell tool killed by a closed pipe


@pytest.mark.parametrize("argv", [(), ("status", "--help")])
def test_help_into_a_closed_pipe_prints_no_traceback(argv: tuple[str, ...]) -> None:
    done = _closed_pipe_run(*argv)
    assert b"Traceback" not in done.stderr, done.stderr


def test_an_open_pipe_still_gets_the_whole_output() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "colocate.cli", "status", "--help"], capture_output=True, check=False
    )
    assert done.returncode == 0 and b"--json" in done.stdout
