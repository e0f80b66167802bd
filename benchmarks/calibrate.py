"""This machine's interference table: ``colocate calibrate`` on one idle dev-cluster node.

On the real dev cluster (root, ``colocate dev-cluster up``): one broker and one
``colocate agent`` on an idle 2-CPU node, started the way the integration tests start them
(tests/integration/leasing.py, slurm_agent.py), then the ``colocate calibrate`` CLI against
that broker. The agent's PSI pressure limit is raised to 100 % for the run
(``COLOCATE_POLICY__LIMITS__CPU_PRESSURE_LIMIT``): on two cores shared by several engineers
the guard would otherwise take the lease back whenever the machine is busy, and the table is
meant to measure that interference, not avoid it.

The baseline is inside the table: every slowdown is a with-function window over the job's
idle window of the same repeat, seconds apart in the same job.

Writes ``benchmarks/results/calibration.json`` and ``calibration.png``.
``--repeats N`` (default 8), ``--segment-s S`` (default 3), ``--quick`` (2 repeats, 1.5 s
windows, scale 0.25: the integration test's size).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.integration.conftest import SlurmCluster, _cluster_nodes  # noqa: E402
from tests.integration.leasing import start_broker  # noqa: E402
from tests.integration.slurm_agent import idle_node, start_slurm_agent  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--segment-s", type=float, default=3.0)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(RESULTS / "calibration.json"))
    parser.add_argument("--plot", default=str(RESULTS / "calibration.png"))
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.segment_s, args.scale = 2, 1.5, 0.25
    nodes, reason = _cluster_nodes()
    if not nodes:
        print(reason, file=sys.stderr)
        return 2
    os.environ["COLOCATE_POLICY__LIMITS__CPU_PRESSURE_LIMIT"] = "100"
    tmp = Path(tempfile.mkdtemp(prefix="colocate-calibrate-bench-"))
    broker = start_broker(tmp)
    agent = None
    try:
        node = idle_node(SlurmCluster(nodes))
        agent = start_slurm_agent(tmp, broker, node)
        started = time.monotonic()
        argv = [
            sys.executable, "-m", "colocate", "calibrate", "--broker", broker.url,
            "--nodes", node, "--repeats", str(args.repeats), "--segment-s", str(args.segment_s),
            "--scale", str(args.scale), "--out", args.out, "--plot", args.plot,
        ]  # fmt: skip
        proc = subprocess.run(argv, cwd=ROOT, check=False)
        print(f"calibrate took {time.monotonic() - started:.0f} s, exit {proc.returncode}")
        return proc.returncode
    finally:
        if agent is not None:
            agent.service.stop()
        broker.stop()


if __name__ == "__main__":
    raise SystemExit(main())
