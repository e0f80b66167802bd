"""What each entry point costs to import: modules, memory, time; one run.

    .venv/bin/python benchmarks/imports.py [--before REV] [--runs 7]

For ``from colocate import Client``, a worker (the fork server's imports, which every
worker it forks starts with) and the prolog hook, each in a fresh interpreter: the modules
the import adds, the process's peak RSS (``ru_maxrss``) and the import's wall time,
median of ``--runs``. Baseline, same run: ``python -c pass`` of the same interpreter.
With ``--before REV`` the same entry points are also measured on that commit's tree
(``git archive``), so the drop shows next to the current figures.

Prints a table and saves JSON to ``benchmarks/results/imports.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

ENTRY_POINTS = {
    "python -c pass (baseline)": "pass",
    "from colocate import Client": "from colocate import Client",
    "worker (fork server imports)": "from colocate.executor.forkserver import main",
    "prolog hook": "import slurm_plugin.hooks",
}

# The tree to import from goes first on sys.path; the editable install's finder is dropped
# so that an older checkout is really the one imported.
PROBE = """
import json, resource, sys, time
sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f)]
sys.path.insert(0, {tree!r})
before = len(sys.modules)
t0 = time.perf_counter()
{code}
took = time.perf_counter() - t0
print(json.dumps({{"modules": len(sys.modules) - before, "import_ms": 1000 * took,
                   "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def measure(tree: Path, code: str, runs: int) -> dict[str, float]:
    got = []
    for _ in range(runs):
        out = subprocess.run(
            [sys.executable, "-c", PROBE.format(tree=str(tree), code=code)],
            capture_output=True,
            text=True,
            check=True,
            cwd=tempfile.gettempdir(),
        )
        got.append(json.loads(out.stdout))
    return {k: statistics.median(g[k] for g in got) for k in ("modules", "import_ms", "rss_mib")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", help="a git revision to measure as well, e.g. HEAD~5")
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()

    trees = {"now": ROOT}
    tmp = None
    if args.before:
        tmp = tempfile.TemporaryDirectory()
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", args.before], capture_output=True, check=True
        )
        subprocess.run(["tar", "-x", "-C", tmp.name], input=archive.stdout, check=True)
        trees = {f"before ({args.before})": Path(tmp.name), "now": ROOT}

    rows: list[dict[str, Any]] = []
    for label, tree in trees.items():
        for entry, code in ENTRY_POINTS.items():
            rows.append({"tree": label, "entry": entry, **measure(tree, code, args.runs)})
    if tmp is not None:
        tmp.cleanup()

    print(f"{'tree':22} {'entry point':30} {'modules':>8} {'RSS MiB':>8} {'import ms':>10}")
    for r in rows:
        print(
            f"{r['tree']:22} {r['entry']:30} {r['modules']:8.0f} {r['rss_mib']:8.1f} "
            f"{r['import_ms']:10.1f}"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {
        "benchmark": "imports",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "python": platform.python_version(),
            "kernel": platform.release(),
            "load_1m": float(Path("/proc/loadavg").read_text().split()[0]),
        },
        "runs": args.runs,
        "before": args.before,
        "rows": rows,
    }
    (RESULTS / "imports.json").write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
