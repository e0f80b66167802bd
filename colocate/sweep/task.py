"""One task of a sweep's Slurm job array: ``python -m colocate.sweep.task DIR``.

Runs trials ``i, i+K, ...`` of ``DIR/trials.json`` (``i`` = ``$SLURM_ARRAY_TASK_ID``, ``K``
the array's task count written there) and writes each row to ``DIR/result-<n>.json``
(written to a temporary name and renamed, so the gatherer never reads half a row).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from traces.sweep import run_trial


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m colocate.sweep.task SWEEP_DIR", file=sys.stderr)
        return 2
    work = Path(argv[0])
    index = int(os.environ.get("SLURM_ARRAY_TASK_ID", "0"))
    doc = json.loads((work / "trials.json").read_text())
    tasks, trials = int(doc["tasks"]), doc["trials"]
    for n in range(index, len(trials), tasks):
        row = run_trial(trials[n])
        tmp = work / f".result-{n}.json.tmp"
        tmp.write_text(json.dumps(row))
        tmp.rename(work / f"result-{n}.json")
        print(f"trial {n}: {row['summary']['trial_wall_s']:.2f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
