"""The replay's loop compiled with mypyc (``traces.compiled``): the same results as its
source, and never a stale build.

Where ``scripts/setup`` built it (CI does), every replay test runs the compiled loop; here
the interpreted source runs too, in a child process with ``COLOCATE_PURE=1``, on a workload
that exercises the guard (evictions, cooldowns, follow-ups) with every policy, and both must
agree on every figure and series. A copy of the package with a source that changed since the
build must import the source, and say so.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from traces import compiled

ROOT = Path(__file__).resolve().parents[2]
REQUIRE_ENV = "COLOCATE_REQUIRE_COMPILED"  # scripts/test (CI) sets it: no silent skip there


@pytest.fixture
def built() -> None:
    """The loop compiled from the sources here, or a skip (a failure where CI requires it)."""
    what = compiled.state("decisions")
    if what in ("compiled", "pure"):
        return
    why = f"the loop is {what} here ({compiled.REBUILD} builds it)"
    if os.environ.get(REQUIRE_ENV):
        pytest.fail(f"{why}; {REQUIRE_ENV} is set")
    pytest.skip(why)


# a replay whose every figure and series is printed as JSON (series as sha256 of their bytes)
FIGURES = r"""
import hashlib, json, sys
import numpy as np
from policies.limits import Limits
from traces import bundled, compiled, replay
from traces.azure import read_azure2019
from traces.interference import InterferenceModel
from traces.placement import Cluster
from traces.swf import read_swf

cluster = Cluster(bundled.HPC2N_NODES, bundled.HPC2N_CORES_PER_NODE, bundled.HPC2N_MEMORY_PER_NODE)
jobs = read_swf(bundled.HPC2N_EXCERPT).head(1500)
faas = read_azure2019(bundled.AZURE2019)
limits = Limits(cpu_pressure_limit=2.0, pressure_grace_s=60.0, reoffer_cooldown_s=180.0)
noisy = InterferenceModel(memory_bound_fraction=0.6, memory_bound_range=(0.2, 0.4))
out = {"running": compiled.running()}
for scale in (1.0, 30.0):
    result = replay(jobs, faas, cluster, None, seed=3, faas_scale=scale, limits=limits,
                    interference=noisy)
    for name, series in result.policies.items():
        summary = {k: v for k, v in series.summary.items() if k != "replay_seconds"}
        arrays = {f: hashlib.sha256(np.ascontiguousarray(getattr(series, f)).tobytes()).hexdigest()
                  for f in ("offered_cores", "offered_memory_bytes", "harvested_cores",
                            "evictions", "cold_starts", "recovered_cost")}
        out[f"{name} x{scale:g}"] = {"summary": summary, "arrays": arrays,
                                     "eviction_jobs": series.eviction_jobs}
print(json.dumps(out, sort_keys=True))
"""


def _figures(pure: bool) -> dict[str, object]:
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    env.pop(compiled.PURE_ENV, None)
    if pure:
        env[compiled.PURE_ENV] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", FIGURES],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    figures: dict[str, object] = json.loads(proc.stdout)
    return figures


@pytest.mark.usefixtures("built")
def test_the_compiled_loop_gives_exactly_the_figures_of_its_source() -> None:
    fast, pure = _figures(pure=False), _figures(pure=True)
    assert fast.pop("running") == "compiled"
    assert pure.pop("running") == "source"
    assert len(fast) == 6  # three policies at two loads
    evictions = [v["summary"]["evictions"] for v in fast.values()]  # type: ignore[index]
    assert sum(evictions) > 0, "the workload must evict"
    for key in fast:
        assert fast[key] == pure[key], key


def _package_copy(tmp_path: Path) -> Path:
    """traces/ and policies/ (sources and any built extension) in ``tmp_path``."""
    keep = shutil.ignore_patterns("__pycache__", "data")
    for package in ("traces", "policies"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=keep)
    shutil.copytree(ROOT / "traces" / "data", tmp_path / "traces" / "data")
    return tmp_path


# which file the loop came from, reached as an import would reach it
WHICH = "import traces, traces.decisions; traces.decisions.Drive; print(traces.decisions.__file__)"


def _which_loop(root: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k != compiled.PURE_ENV}
    proc = subprocess.run(
        [sys.executable, "-c", WHICH],
        cwd=root,
        env={**clean, "PYTHONPATH": str(root), **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.mark.usefixtures("built")
def test_a_loop_changed_since_its_build_runs_from_source_and_says_so(tmp_path: Path) -> None:
    root = _package_copy(tmp_path)
    fresh = _which_loop(root)
    assert fresh.stdout.strip().endswith(".so"), fresh.stdout
    assert "changed since it was compiled" not in fresh.stderr

    source = root / "traces" / "decisions.py"
    source.write_text(source.read_text() + "\n# an edit after the build\n")
    stale = _which_loop(root)
    assert stale.stdout.strip() == str(source)
    assert "traces/decisions.py's compiled build is stale" in stale.stderr
    assert compiled.REBUILD in stale.stderr

    # the stamp names the sources it was built from: the built ones again are fresh again
    source.write_text((ROOT / "traces" / "decisions.py").read_text())
    assert _which_loop(root).stdout.strip().endswith(".so")
    assert _which_loop(root, COLOCATE_PURE="1").stdout.strip() == str(source)

    # so does an edit of a module the loop imports (mypyc checks their types into it)
    usage = root / "policies" / "model.py"
    usage.write_text(usage.read_text() + "\n# an edit after the build\n")
    assert _which_loop(root).stdout.strip() == str(source)
    check = subprocess.run(
        [sys.executable, "-m", "traces.build", "--check", "--json"],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root), compiled.PURE_ENV: "1"},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert json.loads(check.stdout) == {"decisions": "stale"}  # COLOCATE_PURE hides nothing


def test_without_a_build_the_source_runs_and_check_says_so(tmp_path: Path) -> None:
    root = _package_copy(tmp_path)
    for built in (root / "traces").glob("decisions*.so"):
        built.unlink()
    assert _which_loop(root).stdout.strip() == str(root / "traces" / "decisions.py")
    check = subprocess.run(
        [sys.executable, "-m", "traces.build", "--check", "--json"],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert json.loads(check.stdout) == {"decisions": "source"}


def test_replay_reports_which_loop_ran() -> None:
    from traces import bundled, replay
    from traces.azure import read_azure2019
    from traces.placement import Cluster
    from traces.swf import read_swf

    cluster = Cluster(
        bundled.HPC2N_NODES, bundled.HPC2N_CORES_PER_NODE, bundled.HPC2N_MEMORY_PER_NODE
    )
    result = replay(
        read_swf(bundled.HPC2N_EXCERPT).head(50), read_azure2019(bundled.AZURE2019), cluster
    )
    # what the build's state says an import gets: the extension only when built and fresh
    expected = "compiled" if compiled.state("decisions") == "compiled" else "source"
    assert result.info["replay_loop"] == expected
    assert np.isfinite(result.policies["headroom"].summary["recovered_cost"])


def test_a_cluster_takes_whole_numbers_of_any_kind_and_names_a_bad_one() -> None:
    """The compiled loop reads the cluster as ints: ``12e9`` bytes and numpy integers are
    made ints at the boundary (both loops see the same), and a fraction is a clear error."""
    from traces import bundled, replay
    from traces.azure import read_azure2019
    from traces.placement import Cluster
    from traces.swf import read_swf

    cluster = Cluster(bundled.HPC2N_NODES, np.int64(bundled.HPC2N_CORES_PER_NODE), 12e9)
    assert type(cluster.cores_per_node) is int and cluster.memory_per_node_bytes == 12 * 10**9
    result = replay(
        read_swf(bundled.HPC2N_EXCERPT).head(50), read_azure2019(bundled.AZURE2019), cluster
    )
    assert result.policies["headroom"].summary["offered_core_hours"] > 0
    with pytest.raises(ValueError, match=r"Cluster\.memory_per_node_bytes must be a whole number"):
        Cluster(4, 8, 1.5)
