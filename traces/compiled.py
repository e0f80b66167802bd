"""The replay's hot loop compiled with mypyc, when it is built, and the guard that keeps it true.

:mod:`traces.decisions` (the per-node decision loop) is typed Python, ``mypy --strict``
clean. mypyc, the compiler that ships with mypy (it compiles mypy and black), turns that same
source into a C extension: the same results bit for bit (``tests/unit/test_compiled.py``),
about a fifth less CPU time per replay (``benchmarks/replay.py`` prints both). Nothing else
is compiled: the policies, the live agent and the broker run as Python.

``scripts/setup`` builds it when mypy and a C compiler are installed (``python -m
traces.build``); elsewhere the source runs. The extension sits next to its source (e.g.
``traces/decisions.cpython-311-x86_64-linux-gnu.so``, git-ignored), where Python's import
prefers it, with a stamp: the sha256 of the sources it was built from (it and the project
modules it imports, :data:`SOURCES`). :func:`guard` (run by ``traces/__init__``, before
anything imports the loop) imports the source instead when one of them changed since the
build (and says so once, with the command that rebuilds), or when ``COLOCATE_PURE=1`` asks
for the interpreted loop.

    python -m traces.build [--check] [--json]
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent
MODULES = ("decisions",)  # modules of this package that are compiled when built
# what a build was compiled against: the module and the project modules it imports (their
# types are checked into the extension), relative to the repository
SOURCES = {
    "decisions": (
        "traces/decisions.py",
        "traces/demand.py",
        "traces/interference.py",
        "traces/placement.py",
        "traces/usage.py",
        "policies/__init__.py",
        "policies/limits.py",
        "policies/model.py",
    ),
}
PURE_ENV = "COLOCATE_PURE"
REBUILD = "python -m traces.build"


def digest(name: str) -> str:
    """sha256 over the sources module ``name`` is compiled against (:data:`SOURCES`)."""
    sha = hashlib.sha256()
    for path in SOURCES[name]:
        sha.update(path.encode() + b"\0" + (HERE.parent / path).read_bytes())
    return sha.hexdigest()


def _built(name: str) -> list[Path]:
    """The extension files of module ``name`` next to its source (none when not built)."""
    return [
        HERE / f"{name}{suffix}"
        for suffix in importlib.machinery.EXTENSION_SUFFIXES
        if (HERE / f"{name}{suffix}").exists()
    ]


def state(name: str) -> str:
    """``compiled``, ``stale`` (built from another source), ``pure`` (``COLOCATE_PURE``
    set) or ``source`` (not built) for module ``name`` of this package."""
    if not _built(name):
        return "source"
    if os.environ.get(PURE_ENV, "") not in ("", "0"):
        return "pure"
    stamp = HERE / f"{name}.mypyc-stamp"
    try:
        fresh = stamp.read_text().strip() == digest(name)
    except OSError:
        fresh = False
    return "compiled" if fresh else "stale"


def running(name: str = "decisions") -> str:
    """What runs for module ``name`` in this process: ``compiled`` or ``source``."""
    module = sys.modules.get(f"{__package__}.{name}")
    origin = getattr(module, "__file__", "") or ""
    return "source" if origin.endswith(".py") else "compiled"


def guard() -> None:
    """Import the source of each compiled module that is stale or that ``COLOCATE_PURE``
    turns off, so Python's import does not pick the extension (call before any import of
    them)."""
    for name in MODULES:
        why = state(name)
        if why not in ("stale", "pure"):
            continue
        full = f"{__package__}.{name}"
        if full in sys.modules:
            continue
        if why == "stale":
            log.warning(
                "traces/%s.py or a module it imports changed since it was compiled: "
                "running the source (rebuild: %s)",
                name,
                REBUILD,
            )
        spec = importlib.util.spec_from_file_location(full, HERE / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[full]
            raise


def build() -> dict[str, str]:
    """Compile every module of :data:`MODULES` that is not fresh; its state after."""
    done: dict[str, str] = {}
    todo = [name for name in MODULES if state(name) != "compiled"]
    if todo:
        root = HERE.parent
        with tempfile.TemporaryDirectory(prefix="colocate-mypyc-") as tmp:
            # mypyc builds in its working directory and writes the extensions next to the
            # sources: links to the packages keep the repository's own pyproject out of it
            for package in ("traces", "policies"):
                (Path(tmp) / package).symlink_to(root / package)
            digests = {name: digest(name) for name in todo}
            for name in todo:
                for old in _built(name):
                    old.unlink()
            proc = subprocess.run(
                [sys.executable, "-m", "mypyc", *(f"traces/{name}.py" for name in todo)],
                cwd=tmp,
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode != 0:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
                raise RuntimeError(f"mypyc failed: {tail[0] if tail else proc.returncode}")
            for name in todo:
                (HERE / f"{name}.mypyc-stamp").write_text(digests[name] + "\n")
    for name in MODULES:
        done[name] = state(name)
    return done
