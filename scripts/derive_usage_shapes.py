"""Derive traces/data/usage-shapes.json.gz from the real per-job usage series.

    python -m venv /tmp/derive && /tmp/derive/bin/pip install pyarrow numpy
    /tmp/derive/bin/python scripts/derive_usage_shapes.py /path/to/traces/job_usage

Not part of the package (it needs pyarrow, which colocate does not): it is kept so that the
shipped library can be rebuilt and checked. Inputs and citations: traces/data/README.md.

What it writes (JSON, gzip -9, deterministic):
- ``cpu``: one shape per SURF Lisa job of at least 5 minutes: busy cores / node cores averaged
  per minute (the replay's grid), then cut into segments where the level, on a log scale of
  ratio to the job's mean (base 1.5), changes; each segment keeps the mean of its minutes.
  Stored per shape: the job's duration (s), its mean busy share, segment start fractions
  and levels relative to the mean (so a shape can be scaled to another mean).
- ``memory``: one shape per Google 2011 series, memory per 5 minutes cut the same way (base
  1.1: memory is steadier), levels relative to the mean.
- ``reference``: figures of the raw series (1-minute CPU averages of the jobs of at least
  1 h; 5-minute memory): peak/mean quantiles, share above 2x, bursts per hour. The unit test
  checks the model against these.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

NODE_MHZ = 33_600.0  # 16 cores x 2,100 MHz (README of the SURF Lisa week)
OUT = Path(__file__).resolve().parents[1] / "traces" / "data" / "usage-shapes.json.gz"


def per_minute(x: np.ndarray) -> np.ndarray:
    n = len(x) // 2 * 2
    m = x[:n].reshape(-1, 2).mean(1)
    return np.concatenate([m, x[n:]]) if len(x) % 2 else m


def segments(x: np.ndarray, base: float) -> tuple[list[float], list[float]]:
    """(start fractions, levels relative to the mean) of the piecewise-constant shape."""
    mean = float(x.mean())
    q = np.round(np.log((x + 0.01) / (mean + 0.01)) / math.log(base)).astype(int)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(q)) + 1, [len(x)]])
    levels = np.add.reduceat(x, bounds[:-1]) / np.diff(bounds) / mean
    return [round(b / len(x), 5) for b in bounds[:-1].tolist()], [
        round(v, 4) for v in levels.tolist()
    ]


def figures(series: list[np.ndarray]) -> dict[str, float]:
    """Peak/mean quantiles, share above 2x and bursts (upward crossings of 2x mean) per hour."""
    ratios, bursts, hours = [], 0, 0.0
    for s in series:
        m = float(s.mean())
        if m <= 0:
            continue
        ratios.append(float(s.max()) / m)
        above = s > 2 * m
        bursts += int(above[0]) + int((above[1:] & ~above[:-1]).sum())
        hours += len(s) / 60.0
    r = np.asarray(ratios)
    return {
        "jobs": len(r),
        "peak_mean_p50": round(float(np.quantile(r, 0.5)), 3),
        "peak_mean_p75": round(float(np.quantile(r, 0.75)), 3),
        "peak_mean_p90": round(float(np.quantile(r, 0.9)), 3),
        "share_above_2x": round(float((r > 2).mean()), 4),
        "bursts_per_hour": round(bursts / hours, 4),
    }


def main(root: Path) -> None:
    lisa = root / "surf_lisa_week"
    frags = pq.read_table(lisa / "fragments.parquet").to_pydict()
    ids = np.asarray(frags["id"])
    use = np.asarray(frags["cpu_usage"], dtype=np.float64) / NODE_MHZ
    order = np.argsort(ids, kind="stable")
    ids, use = ids[order], np.clip(use[order], 0.0, 1.0)
    _, first, count = np.unique(ids, return_index=True, return_counts=True)
    cpu: dict[str, list[float]] = {"duration_s": [], "mean_share": [], "offsets": [0]}
    frac: list[float] = []
    level: list[float] = []
    long_jobs = []
    for s, c in zip(first.tolist(), count.tolist(), strict=True):
        if c < 10:  # under 5 minutes: flat on a one-minute grid
            continue
        x = per_minute(use[s : s + c])
        if x.mean() <= 0:
            continue
        if c >= 120:
            long_jobs.append(x)
        f, v = segments(x, 1.5)
        cpu["duration_s"].append(c * 30.0)
        cpu["mean_share"].append(round(float(x.mean()), 4))
        frac += f
        level += v
        cpu["offsets"].append(len(frac))
    cpu["frac"], cpu["level"] = frac, level

    memory: dict[str, list[float]] = {"offsets": [0], "frac": [], "level": []}
    mem_series = []
    with tarfile.open(root / "google2011_gcd" / "GCD_VMs.tar.gz") as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.name)
        for m in members:
            fh = tar.extractfile(m)
            assert fh is not None
            rows = np.loadtxt(io.TextIOWrapper(fh), ndmin=2)
            x = rows[:, 1]
            if x.mean() <= 0:
                continue
            mem_series.append(x)
            f, v = segments(x, 1.1)
            memory["frac"] += f
            memory["level"] += v
            memory["offsets"].append(len(memory["frac"]))
    mem_fig = figures(mem_series)
    mem_fig.pop("bursts_per_hour")  # 5-minute samples: per-hour counts are not comparable
    doc = {
        "about": "Normalised per-job usage shapes; see traces/data/README.md for sources",
        "cpu": cpu,
        "memory": memory,
        "reference": {"cpu": figures(long_jobs), "memory": mem_fig},
    }
    raw = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
    with (
        open(OUT, "wb") as out,
        gzip.GzipFile(fileobj=out, mode="wb", compresslevel=9, mtime=0) as gz,
    ):
        gz.write(raw)
    print(
        f"wrote {OUT}: {len(cpu['duration_s'])} CPU shapes ({len(frac)} segments), "
        f"{len(memory['offsets']) - 1} memory shapes; reference {doc['reference']}"
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
