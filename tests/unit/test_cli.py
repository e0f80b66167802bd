from __future__ import annotations

import subprocess
import sys

import pytest

import colocate
from colocate.cli import SUBCOMMANDS, main


def test_public_api_is_locked() -> None:
    assert sorted(colocate.__all__) == sorted(
        [
            "BackendUnavailable",
            "BadRequest",
            "Client",
            "ColocateError",
            "ConfigError",
            "ExecutorLost",
            "LeaseDenied",
            "LeaseError",
            "LeaseEvicted",
            "LeaseExpired",
            "PayloadTooLarge",
            "SlurmUnavailable",
            "TraceFormatError",
            "Unauthorized",
            "__version__",
        ]
    )


def test_top_level_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert name in out


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_every_subcommand_has_help(name: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "colocate", name, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"colocate {name}" in proc.stdout


def test_unknown_subcommand_is_an_error() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "colocate", "frobnicate"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "invalid choice" in proc.stderr
