"""Real usage-over-time shapes of jobs: the library in ``traces/data/usage-shapes.json.gz``.

Built by ``scripts/derive_usage_shapes.py`` from real per-job series (sources and citations:
``traces/data/README.md``):

- **CPU**: 2,613 SURF Lisa HPC jobs of at least 5 minutes (one week, 2022, a sample every
  30 s), averaged per minute (the replay's grid) and cut into piecewise-constant segments
  where the level changes by a factor of about 1.5 (on a log scale of the ratio to the job's
  mean); each shape keeps its job's duration and mean busy share of the node.
- **Memory**: 1,600 Google 2011 job series (24 h, 5-minute samples), cut where the level
  changes by about 10 %.

Levels are relative to the shape's mean (mean 1), so a shape scales to any job's mean.
Segment starts are fractions of the run (0 = start, 1 = end); a shape is stretched over the
run of the job it is given to, so CPU shapes are picked among the jobs of the nearest
duration (bursts per hour then stay close to the data's). ``reference`` holds the raw
series' figures (peak/mean quantiles, share of jobs above 2x, bursts per hour) the unit
tests compare the model against.
"""

from __future__ import annotations

import functools
import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from colocate.errors import TraceFormatError

LIBRARY = Path(__file__).resolve().parent / "data" / "usage-shapes.json.gz"
Floats = npt.NDArray[np.float64]
Ints = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class Shapes:
    """A set of shapes as flat arrays: shape ``i`` is ``frac/level[offsets[i]:offsets[i+1]]``."""

    offsets: Ints
    frac: Floats
    level: Floats

    def __len__(self) -> int:
        return int(self.offsets.size - 1)


@dataclass(frozen=True, slots=True)
class ShapeLibrary:
    """CPU shapes (sorted by their job's duration, with its mean busy share), memory shapes,
    and the data's reference figures."""

    cpu: Shapes
    cpu_duration_s: Floats
    cpu_mean_share: Floats
    memory: Shapes
    reference: dict[str, dict[str, float]]


def _shapes(doc: dict[str, list[float]], order: Ints | None = None) -> Shapes:
    offsets = np.asarray(doc["offsets"], dtype=np.int64)
    frac = np.asarray(doc["frac"], dtype=np.float64)
    level = np.asarray(doc["level"], dtype=np.float64)
    if order is None:
        return Shapes(offsets, frac, level)
    counts = np.diff(offsets)[order]
    take = _ranges(offsets[:-1][order], counts)
    return Shapes(
        np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), frac[take], level[take]
    )


def _ranges(starts: Ints, counts: Ints) -> Ints:
    """Concatenated ``arange(s, s + c)`` for each pair, without a Python loop."""
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.cumsum(counts)
    index = np.arange(total, dtype=np.int64) - np.repeat(ends - counts, counts)
    return np.repeat(starts, counts) + index


@functools.cache
def load_library(path: Path = LIBRARY) -> ShapeLibrary:
    """The shape library (read once per process)."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            doc = json.load(fh)
        order = np.argsort(np.asarray(doc["cpu"]["duration_s"]), kind="stable")
        return ShapeLibrary(
            cpu=_shapes(doc["cpu"], order),
            cpu_duration_s=np.asarray(doc["cpu"]["duration_s"], dtype=np.float64)[order],
            cpu_mean_share=np.asarray(doc["cpu"]["mean_share"], dtype=np.float64)[order],
            memory=_shapes(doc["memory"]),
            reference=doc["reference"],
        )
    except (OSError, ValueError, KeyError) as exc:
        raise TraceFormatError(
            f"cannot read the usage shape library: {exc}", path=str(path)
        ) from None


def pick_cpu_shapes(
    library: ShapeLibrary, run_s: Floats, rng: np.random.Generator, spread: int = 16
) -> Ints:
    """A CPU shape per job among the ``2 * spread + 1`` library jobs nearest in duration."""
    n = len(library.cpu)
    near = np.searchsorted(library.cpu_duration_s, run_s)
    picked = np.clip(near + rng.integers(-spread, spread + 1, size=run_s.size), 0, n - 1)
    return np.asarray(picked, dtype=np.int64)


def expand(shapes: Shapes, chosen: Ints) -> tuple[Ints, Floats, Floats]:
    """(job index, start fraction, relative level) of every segment of the chosen shapes."""
    starts = shapes.offsets[chosen]
    counts = shapes.offsets[chosen + 1] - starts
    take = _ranges(starts, counts)
    job = np.repeat(np.arange(chosen.size, dtype=np.int64), counts)
    return job, shapes.frac[take], shapes.level[take]


def peak_mean_figures(series: list[Floats], minutes_per_sample: float = 1.0) -> dict[str, float]:
    """The figures of ``reference`` for ``series`` (one array per job, evenly sampled):
    peak/mean quantiles, share of jobs peaking above 2x their mean, and bursts (upward
    crossings of 2x the mean) per hour."""
    ratios: list[float] = []
    bursts = 0
    hours = 0.0
    for s in series:
        m = float(s.mean())
        if m <= 0:
            continue
        ratios.append(float(s.max()) / m)
        above = s > 2 * m
        bursts += int(above[0]) + int((above[1:] & ~above[:-1]).sum())
        hours += s.size * minutes_per_sample / 60.0
    r = np.asarray(ratios)
    return {
        "jobs": float(r.size),
        "peak_mean_p50": float(np.quantile(r, 0.5)),
        "peak_mean_p75": float(np.quantile(r, 0.75)),
        "peak_mean_p90": float(np.quantile(r, 0.9)),
        "share_above_2x": float((r > 2).mean()),
        "bursts_per_hour": bursts / hours if hours else 0.0,
    }
