"""``colocate calibrate`` on the real dev cluster: kernels as Slurm jobs, functions leased on
the node's idle core through a real broker and agent, a table every cell of which is filled.

Small: 2 repeats, 1.5 s windows, working sets at a quarter (the committed table,
benchmarks/results/calibration.json, comes from ``python benchmarks/calibrate.py``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from colocate.config import load_interference_table
from policies.interference import guarded_limits
from policies.limits import Limits
from tests.integration.conftest import SlurmCluster, slurm
from tests.integration.leasing import Service
from tests.integration.slurm_agent import SlurmAgent, agent_on_idle_node

pytestmark = [pytest.mark.slurm, pytest.mark.root, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def test_calibrate_fills_every_cell_on_a_real_node(
    tmp_path: Path,
    broker: Service,
    agent_on: dict[str, SlurmAgent],
    slurm_cluster: SlurmCluster,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The guard must not take the lease back when other tests load the shared cores: the
    # calibration measures that interference (an eviction would be retried, but its 60 s
    # cooldown would outlast the test).
    monkeypatch.setenv("COLOCATE_POLICY__LIMITS__CPU_PRESSURE_LIMIT", "100")
    node = agent_on_idle_node(tmp_path, broker, slurm_cluster, agent_on).node
    out, plot = tmp_path / "table.json", tmp_path / "table.png"
    argv = [
        sys.executable, "-m", "colocate", "calibrate", "--broker", broker.url, "--nodes", node,
        "--repeats", "2", "--segment-s", "1.5", "--scale", "0.25", "--out", str(out),
        "--plot", str(plot), "--workdir", str(tmp_path),
    ]  # fmt: skip
    started = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=240)
    took = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    # progress on stderr, the table on stdout
    assert "calibrate: stream: job" in proc.stderr and "repeat 2/2 done" in proc.stderr
    assert "stream   compress" in proc.stdout

    table = json.loads(out.read_text())
    cells = {(c["kernel"], c["function"]): c for c in table["cells"]}
    assert set(cells) == {
        (k, f) for k in ("stream", "matmul", "chase") for f in ("compress", "bfs", "image")
    }
    for cell in cells.values():
        assert cell["n"] == 2, cell
        assert 0 < cell["ci_low"] <= cell["slowdown"] <= cell["ci_high"], cell
        assert cell["cpu_slowdown"] > 0, cell
    assert table["node"] == node and table["function_share"] == 0.5
    assert plot.stat().st_size > 10_000
    # the kernels ran as Slurm jobs on the node, and none is left behind
    assert not slurm("squeue", "-h", "-n", "colocate-calibrate-stream").stdout.strip()
    # what the guard and the replay read
    loaded = load_interference_table(out)
    assert guarded_limits(Limits(), loaded).max_function_share <= Limits().max_function_share
    print(f"calibrate --repeats 2 took {took:.0f} s")
    assert took < 180, f"calibrate --repeats 2 took {took:.0f} s"
