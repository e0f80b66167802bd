"""Building and registering the SPANK plugin with the real compiler and Slurm's header,
into temporary folders (no Slurm daemons needed)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from colocate.errors import ColocateError
from slurm_plugin.spank import (
    LIBRARY_NAME,
    SPANK_HEADER,
    SpankBuildError,
    build,
    register,
    registered_library,
    unregister,
)
from tests.conftest import require


@pytest.fixture
def toolchain() -> None:
    require(shutil.which("gcc") is not None, "gcc missing; apt-get install gcc")
    require(SPANK_HEADER.exists(), f"{SPANK_HEADER} missing; apt-get install libslurm-dev")


def exported(library: Path) -> set[str]:
    out = subprocess.run(
        ["nm", "-D", "--defined-only", str(library)], capture_output=True, text=True, check=True
    ).stdout
    return {line.split()[-1] for line in out.splitlines() if line.strip()}


def test_builds_with_warnings_as_errors_and_exports_the_spank_entry_points(
    toolchain: None, tmp_path: Path
) -> None:
    library = build(tmp_path / "out")
    assert library == tmp_path / "out" / LIBRARY_NAME
    symbols = exported(library)
    assert {
        "slurm_spank_init",
        "slurm_spank_init_post_opt",
        "plugin_name",
        "plugin_type",
        "plugin_version",
    } <= symbols
    assert b"colocate" in library.read_bytes()
    assert [p.name for p in (tmp_path / "out").iterdir()] == [LIBRARY_NAME]  # no temporary left


def test_an_up_to_date_build_is_not_redone(toolchain: None, tmp_path: Path) -> None:
    library = build(tmp_path)
    first = library.stat().st_mtime_ns
    started = time.monotonic()
    assert build(tmp_path) == library
    assert time.monotonic() - started < 0.05
    assert library.stat().st_mtime_ns == first
    build(tmp_path, force=True)
    assert library.stat().st_mtime_ns >= first


def test_a_missing_header_says_what_to_install(tmp_path: Path) -> None:
    with pytest.raises(SpankBuildError, match="apt-get install libslurm-dev"):
        build(tmp_path / "out", include_dir=tmp_path / "no-headers")
    with pytest.raises(SpankBuildError, match="no C compiler 'no-such-cc'"):
        build(tmp_path / "out", cc="no-such-cc")


def test_register_and_unregister(tmp_path: Path) -> None:
    library = tmp_path / LIBRARY_NAME
    library.write_bytes(b"\x7fELF")  # registering only names the file
    conf_dir = tmp_path / "plugstack.conf.d"
    conf = register(library, conf_dir)
    assert conf.read_text().splitlines()[-1] == f"optional {library}"
    assert registered_library(conf_dir) == library
    register(library, conf_dir, required=True)
    assert conf.read_text().splitlines()[-1] == f"required {library}"
    assert unregister(conf_dir) is True
    assert registered_library(conf_dir) is None
    assert unregister(conf_dir) is False
    with pytest.raises(ColocateError, match="build it first"):
        register(tmp_path / "missing.so", conf_dir)


def test_command_line(toolchain: None, tmp_path: Path) -> None:
    def spank(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "slurm_plugin.spank", "--json", *argv],
            capture_output=True,
            text=True,
            timeout=120,
        )

    proc = spank("install", "--out", str(tmp_path / "lib"), "--conf-dir", str(tmp_path / "conf"))
    assert proc.returncode == 0, proc.stderr
    library = json.loads(proc.stdout)["library"]
    assert json.loads(spank("status", "--conf-dir", str(tmp_path / "conf")).stdout) == {
        "library": library,
        "exists": True,
    }
    bad = spank("register", "--so", str(tmp_path / "nope.so"), "--conf-dir", str(tmp_path / "conf"))
    assert bad.returncode == 1
    assert (
        bad.stderr.startswith("slurm_plugin.spank register: error:")
        and "Traceback" not in bad.stderr
    )
