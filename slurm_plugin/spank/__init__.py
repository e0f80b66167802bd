"""Build and register the colocate SPANK plugin (``--colocate=allow|deny``).

The C source ships with the package (``colocate_spank.c``); it needs only
``<slurm/spank.h>`` (Debian package ``libslurm-dev``) and a C compiler. Registering it is
one line in a plugstack include file; Slurm reads it at every command, no restart needed::

    python -m slurm_plugin.spank install --out /var/lib/colocate/spank
    # = build into that folder + write /etc/slurm/plugstack.conf.d/colocate.conf

From Python (the dev cluster does this)::

    from slurm_plugin.spank import install
    so = install(Path("/var/lib/colocate/spank"))
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from colocate.errors import BackendUnavailable, ColocateError

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("colocate_spank.c")
#: Name of the built plugin inside the build folder.
LIBRARY_NAME = "colocate_spank.so"
SPANK_HEADER = Path("/usr/include/slurm/spank.h")
DEFAULT_BUILD_DIR = Path("/var/lib/colocate/spank")
DEFAULT_CONF_DIR = Path("/etc/slurm/plugstack.conf.d")
CONF_NAME = "colocate.conf"

__all__ = [
    "DEFAULT_BUILD_DIR",
    "DEFAULT_CONF_DIR",
    "SOURCE",
    "SpankBuildError",
    "build",
    "install",
    "register",
    "registered_library",
    "unregister",
]


class SpankBuildError(BackendUnavailable):
    """The plugin cannot be built here: a missing compiler or header, or a compile error."""


def build(
    out_dir: Path, *, cc: str | None = None, include_dir: Path | None = None, force: bool = False
) -> Path:
    """Compile the plugin into ``out_dir/colocate_spank.so`` and return that path.

    Skips the compile when the library is newer than the source (unless ``force``). The
    library is written under a temporary name and renamed, so a command that loads it at
    the same time never sees half a file. ``include_dir`` holds ``slurm/spank.h``
    (default: the system include path).
    """
    out_dir = Path(out_dir)
    target = out_dir / LIBRARY_NAME
    if not force and target.exists() and target.stat().st_mtime >= SOURCE.stat().st_mtime:
        return target
    compiler = cc or os.environ.get("CC") or "gcc"
    if shutil.which(compiler) is None:
        raise SpankBuildError(
            f"no C compiler {compiler!r} to build the SPANK plugin; apt-get install gcc"
        )
    header = (include_dir / "slurm" / "spank.h") if include_dir else SPANK_HEADER
    if not header.exists():
        raise SpankBuildError(
            f"{header} is missing; apt-get install libslurm-dev (Slurm's headers)"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".colocate_spank.", suffix=".so", dir=out_dir)
    os.close(fd)
    cmd = [compiler, "-shared", "-fPIC", "-Wall", "-Werror", "-O2", "-o", tmp, str(SOURCE)]
    if include_dir:
        cmd[1:1] = ["-I", str(include_dir)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            first = (proc.stderr.strip().splitlines() or ["no output"])[0]
            raise SpankBuildError(f"compiling {SOURCE.name} failed: {first}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    log.info("built %s", target)
    return target


def register(library: Path, conf_dir: Path = DEFAULT_CONF_DIR, *, required: bool = False) -> Path:
    """Write ``conf_dir/colocate.conf`` naming ``library``; return the file written.

    ``optional`` (the default) means a missing or broken library does not stop jobs;
    ``required`` makes every job fail without it. Debian's plugstack.conf includes
    ``/etc/slurm/plugstack.conf.d/*.conf``; other layouts need that include line.
    """
    library = Path(library).resolve()
    if not library.is_file():
        raise ColocateError(
            f"{library} does not exist; build it first (python -m slurm_plugin.spank build)"
        )
    conf_dir = Path(conf_dir)
    try:
        conf_dir.mkdir(parents=True, exist_ok=True)
        conf = conf_dir / CONF_NAME
        tmp = conf.with_name(f".{CONF_NAME}.tmp")
        tmp.write_text(
            "# colocate: --colocate=allow|deny for sbatch/salloc/srun (written by slurm_plugin.spank)\n"
            f"{'required' if required else 'optional'} {library}\n"
        )
        os.replace(tmp, conf)
    except OSError as exc:
        raise ColocateError(
            f"cannot write {conf_dir / CONF_NAME}: {exc.strerror}; run as root"
        ) from exc
    plugstack = conf_dir.parent / "plugstack.conf"
    if plugstack.exists() and str(conf_dir) not in plugstack.read_text():
        log.warning(
            "%s does not include %s/*.conf; add: include %s/*.conf", plugstack, conf_dir, conf_dir
        )
    log.info("registered %s in %s", library, conf)
    return conf


def registered_library(conf_dir: Path = DEFAULT_CONF_DIR) -> Path | None:
    """The library named in ``conf_dir/colocate.conf``, or None when not registered."""
    conf = Path(conf_dir) / CONF_NAME
    try:
        text = conf.read_text()
    except FileNotFoundError:
        return None
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in ("optional", "required"):
            return Path(parts[1])
    return None


def unregister(conf_dir: Path = DEFAULT_CONF_DIR) -> bool:
    """Remove ``conf_dir/colocate.conf``; True if there was one."""
    conf = Path(conf_dir) / CONF_NAME
    try:
        conf.unlink()
    except FileNotFoundError:
        return False
    log.info("removed %s", conf)
    return True


def install(
    build_dir: Path = DEFAULT_BUILD_DIR, conf_dir: Path = DEFAULT_CONF_DIR, *, force: bool = False
) -> Path:
    """Build the plugin into ``build_dir`` (if stale) and register it as optional; return the library.

    Idempotent; takes about 0.1 s when already built.
    """
    library = build(build_dir, force=force)
    register(library, conf_dir)
    return library
