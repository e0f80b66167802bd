"""The replay's hot loop compiled with mypyc, when it is built, and the guard that keeps it true.

:mod:`traces.decisions` (the per-node decision loop) is typed Python, ``mypy --strict``
clean. mypyc, the compiler that ships with mypy (it compiles mypy and black), turns that same
source into a C extension: the same results bit for bit (``tests/unit/test_compiled.py``),
about a fifth less CPU time per replay (``benchmarks/replay.py`` prints both). Nothing else
is compiled: the policies, the live agent and the broker run as Python.

``scripts/setup`` builds it when mypy and a C compiler are installed (``python -m
traces.build``); elsewhere the source runs. The extension sits next to its source (e.g.
``traces/decisions.cpython-311-x86_64-linux-gnu.so``, git-ignored), where Python's import
prefers it, with a stamp: the sha256 of the sources it was built against (every module of
traces/ and policies/). :func:`guard` (run by ``traces/__init__``, before anything imports
the loop) imports the source instead when one of them changed since the build (and says so
once, with the command that rebuilds), or when ``COLOCATE_PURE=1`` asks for the interpreted
loop. Compiled code calls its own functions directly: patching ``traces.decisions.X`` at run
time reaches only callers outside the module.

    python -m traces.build [--check] [--json]
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent
MODULES = ("decisions",)  # modules of this package that are compiled when built
PACKAGES = ("traces", "policies")  # the sources a build is stamped with: every module here
PURE_ENV = "COLOCATE_PURE"
REBUILD = "python -m traces.build"


def digest() -> str:
    """sha256 over every module of :data:`PACKAGES`: what a build was compiled against (mypyc
    checks the types of what the loop imports into the extension, so an edit of any of them
    makes the build stale; the rule is kept simple rather than following imports)."""
    sha = hashlib.sha256()
    root = HERE.parent
    for path in sorted(p for package in PACKAGES for p in (root / package).glob("*.py")):
        sha.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return sha.hexdigest()


def _built(name: str) -> list[Path]:
    """The extension of module ``name`` next to its source (none when not built)."""
    return [
        HERE / f"{name}{suffix}"
        for suffix in importlib.machinery.EXTENSION_SUFFIXES
        if (HERE / f"{name}{suffix}").exists()
    ]


def _stamp(name: str) -> Path:
    return HERE / f"{name}.mypyc-stamp"


def fresh(name: str) -> bool:
    """True when module ``name`` is built from the sources here as they are now."""
    if not _built(name):
        return False
    try:
        return _stamp(name).read_text().strip() == digest()
    except OSError:
        return False


def state(name: str) -> str:
    """What an import of module ``name`` of this package gets: ``compiled``, ``stale`` (the
    source: built from other sources), ``pure`` (the source: ``COLOCATE_PURE`` set) or
    ``source`` (not built)."""
    if not _built(name):
        return "source"
    if not fresh(name):
        return "stale"
    return "pure" if os.environ.get(PURE_ENV, "") not in ("", "0") else "compiled"


def running(name: str = "decisions") -> str:
    """What runs for module ``name`` in this process: ``compiled`` or ``source``."""
    module = importlib.import_module(f"{__package__}.{name}")
    origin = getattr(module, "__file__", "") or ""
    compiled = origin.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
    return "compiled" if compiled else "source"


def guard() -> None:
    """Import the source of each compiled module that is stale or that ``COLOCATE_PURE``
    turns off, so Python's import does not pick the extension (call before any import of
    them)."""
    package = sys.modules[__package__]
    pure = os.environ.get(PURE_ENV, "") not in ("", "0")
    for name in MODULES:
        if not _built(name) or (fresh(name) and not pure):
            continue
        full = f"{__package__}.{name}"
        if full in sys.modules:
            continue
        if not pure:  # stale; with COLOCATE_PURE the source was asked for: nothing to say
            log.warning(
                "traces/%s.py's compiled build is stale (traces/ or policies/ changed since): "
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
        setattr(package, name, module)  # as an import would: traces.decisions


def build() -> dict[str, str]:
    """Compile every module of :data:`MODULES` that is not fresh; the state of each after.

    The stamp goes first and is written last, so a failed build is never taken for fresh;
    floating-point contraction is off so the extension computes what the source does."""
    import subprocess  # here, not at import: traces/__init__ imports this module
    import tempfile

    todo = [name for name in MODULES if not fresh(name)]
    if todo:
        root = HERE.parent
        with tempfile.TemporaryDirectory(prefix="colocate-mypyc-") as tmp:
            # mypyc builds in its working directory and writes the extensions next to the
            # sources: links to the packages keep the repository's own pyproject out of it
            for package in PACKAGES:
                (Path(tmp) / package).symlink_to(root / package)
            sources = digest()
            for name in todo:
                _stamp(name).unlink(missing_ok=True)
                for old in (*_built(name), *HERE.glob(f"{name}__mypyc.*")):
                    old.unlink()
            flags = os.environ.get("CFLAGS", "") + " -ffp-contract=off"
            proc = subprocess.run(
                [sys.executable, "-m", "mypyc", *(f"traces/{name}.py" for name in todo)],
                cwd=tmp,
                env={**os.environ, "CFLAGS": flags.strip()},
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode != 0:
                lines = (proc.stderr + proc.stdout).strip().splitlines()
                errors = [line for line in lines if "error" in line.lower()]
                why = (errors or lines or [f"exit {proc.returncode}"])[0].strip()
                raise RuntimeError(f"mypyc failed: {why}")
            for name in todo:
                _stamp(name).write_text(sources + "\n")
    return {name: state(name) for name in MODULES}
