"""Modelled CPU and memory use of batch jobs, for traces that do not record it.

Most job traces (RICC, KTH, sacct without steps) give allocations only. The replay needs what
each job *uses*, so each job without a measurement gets one drawn from an empirical
distribution; measured values are used as they are (``UsageModel.use_measured``).

Default distributions (quantiles at probabilities 0, 0.05, ..., 1), fitted from the HPC2N
"Seth" log (bundled excerpt, SWF fields 6 and 7; a unit test refits them):

- busy share of allocated cores: average CPU time / run time over 2,622 jobs; median 1.00,
  mean 0.96 (HPC jobs keep their cores busy, MPI polling included).
- memory used / memory allocated: used memory per processor over 1 GiB per processor
  (Seth nodes: 2 processors, 2 GiB assumed) over 1,038 jobs; mean 0.16, 75 % below 0.15,
  92 % at or below 0.5.

Published figures to compare with (shared notes): LLNL > 90 % of jobs use < 15 % of node
memory (this table: 75 %); Perlmutter ~64 % use <= 50 % (this table: 92 %); Piz Daint ~80 %
of memory free (this table: mean use 16 %, i.e. 84 % free inside allocations). The Google
2011 sample (cloud tasks, 599 joined) has mean CPU use 0.30 of the request: not HPC-like,
so not used for the default; pass ``cpu_quantiles`` to model such a workload.

Time shape (``time_shapes``), piecewise constant steps per job:

- ``"real"`` (default): real shapes from :mod:`traces.shapes`. CPU: a SURF Lisa job of
  about the same duration gives its shape *and* its mean busy share (``cpu_mean="shape"``;
  ``"quantiles"`` draws the mean from ``cpu_quantiles`` instead), stretched over the run;
  levels are capped at all allocated cores. Memory: a Google 2011 job's memory shape scaled
  to the memory share drawn above, capped at the allocation. Jobs under 5 minutes are flat.
- ``"flat"`` (the model before real shapes): CPU constant; memory at ``ramp_memory_level``
  of the steady level during a start-up phase (``ramp_fraction`` of the run time, at most
  ``ramp_max_s``), then steady.

A measured mean (SWF fields 6 and 7, sacct) replaces the modelled mean; the shape still
varies around it. Deterministic: the same seed gives the same draws.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, field_validator

from traces.jobs import JobTrace
from traces.shapes import ShapeLibrary, expand, load_library, pick_cpu_shapes

SHORTEST_SHAPED_S = 300.0  # the library holds jobs of at least 5 minutes
CHUNK_STEPS = 1 << 20  # raw steps merged at a time (a few tens of MB of temporaries)

HPC2N_CPU_QUANTILES: tuple[float, ...] = (
    0.0072, 0.5629, 0.8889, 0.9839, 0.9987, 0.9995, 0.9998, 0.9999, 0.9999, 1.0, 1.0,
    1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0,
)  # fmt: skip
HPC2N_MEMORY_QUANTILES: tuple[float, ...] = (
    0.0068, 0.0137, 0.0244, 0.0273, 0.034, 0.0391, 0.0488, 0.0547, 0.0547, 0.0547, 0.0547,
    0.0732, 0.0879, 0.1094, 0.1094, 0.2075, 0.2197, 0.2197, 0.4395, 0.8789, 0.8789,
)  # fmt: skip


class UsageModel(BaseModel):
    """How job usage is modelled where the trace lacks it (all shares 0..1)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cpu_quantiles: tuple[float, ...] = Field(
        HPC2N_CPU_QUANTILES,
        description="busy share of allocated cores, quantiles at even probabilities",
    )
    memory_quantiles: tuple[float, ...] = Field(
        HPC2N_MEMORY_QUANTILES,
        description="memory used / allocated, quantiles at even probabilities",
    )
    use_measured: bool = Field(True, description="use the trace's measured usage where present")
    ramp_fraction: float = Field(
        0.1, ge=0, le=1, description="share of the run time in the start-up phase"
    )
    ramp_max_s: float = Field(1800.0, ge=0, description="longest start-up phase, seconds")
    ramp_memory_level: float = Field(0.5, ge=0, le=1, description="start-up memory / steady memory")
    time_shapes: Literal["real", "flat"] = Field(
        "real", description="usage over time: real job shapes (traces.shapes) or flat phases"
    )
    cpu_mean: Literal["shape", "quantiles"] = Field(
        "shape", description="mean busy share: the shape's own job, or drawn from cpu_quantiles"
    )

    @field_validator("cpu_quantiles", "memory_quantiles")
    @classmethod
    def _monotone(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if len(value) < 2 or any(b < a for a, b in itertools.pairwise(value)):
            raise ValueError("quantiles need at least 2 values in ascending order")
        if value[0] < 0 or value[-1] > 1:
            raise ValueError("quantiles are shares between 0 and 1")
        return value

    def sample(
        self, trace: JobTrace, memory_alloc_bytes: npt.NDArray[np.float64], seed: int
    ) -> JobUsage:
        """Usage of every job of ``trace``; ``memory_alloc_bytes`` is what the replay allocated."""
        rng = np.random.default_rng(seed)
        n = len(trace)
        u_cpu, u_mem = rng.random(n), rng.random(n)
        cpu = _inverse_cdf(self.cpu_quantiles, u_cpu)
        mem = _inverse_cdf(self.memory_quantiles, u_mem)
        cpu_measured = np.isfinite(trace.cpu_used_ratio) & self.use_measured
        with np.errstate(divide="ignore", invalid="ignore"):
            measured_share = trace.memory_used_bytes / memory_alloc_bytes
        mem_measured = np.isfinite(measured_share) & self.use_measured
        cpu = np.where(cpu_measured, trace.cpu_used_ratio, cpu)
        mem = np.where(mem_measured, np.clip(measured_share, 0.0, 1.0), mem)
        run = trace.end_s - trace.start_s
        ramp = np.minimum(run * self.ramp_fraction, self.ramp_max_s)
        if self.time_shapes == "flat":
            with np.errstate(divide="ignore", invalid="ignore"):
                ramp_frac = np.where(run > 0, ramp / run, 0.0)
            has_ramp = (ramp_frac > 0) & (self.ramp_memory_level != 1.0)
            idx = np.arange(n, dtype=np.int64)
            job = np.concatenate([idx, idx[has_ramp]])
            frac = np.concatenate([np.zeros(n), ramp_frac[has_ramp]])
            s_cpu = np.concatenate([cpu, cpu[has_ramp]])
            level = np.where(has_ramp, self.ramp_memory_level, 1.0)
            s_mem = np.concatenate([mem * level, mem[has_ramp]])
            order = np.lexsort((frac, job))
            job, frac, s_cpu, s_mem = job[order], frac[order], s_cpu[order], s_mem[order]
            offsets = np.searchsorted(job, np.arange(n + 1)).astype(np.int64)
        else:  # already in (job, start) order
            offsets, frac, s_cpu, s_mem, cpu = self._real_steps(rng, run, cpu, cpu_measured, mem)
        return JobUsage(
            cpu_share=cpu,
            memory_share=mem,
            ramp_s=ramp,
            ramp_memory_level=self.ramp_memory_level,
            cpu_measured=cpu_measured,
            memory_measured=mem_measured,
            step_offsets=offsets,
            step_frac=frac,
            step_cpu=s_cpu,
            step_memory=s_mem,
        )

    def _real_steps(
        self,
        rng: np.random.Generator,
        run: npt.NDArray[np.float64],
        cpu: npt.NDArray[np.float64],
        cpu_measured: npt.NDArray[np.bool_],
        mem: npt.NDArray[np.float64],
    ) -> tuple[
        npt.NDArray[np.int64],
        npt.NDArray[np.float64],
        npt.NDArray[np.float64],
        npt.NDArray[np.float64],
        npt.NDArray[np.float64],
    ]:
        """Steps (offsets per job as in :class:`JobUsage`, start fraction, busy share, memory
        share) from the real shapes, and the mean busy share of each job (the shape's own
        unless measured or ``cpu_mean`` says)."""
        library = load_library()
        n = run.size
        shaped = run >= SHORTEST_SHAPED_S
        cpu_shape = pick_cpu_shapes(library, run, rng)
        mem_shape = rng.integers(0, len(library.memory), size=n)
        if self.cpu_mean == "shape":
            cpu = np.where(cpu_measured, cpu, library.cpu_mean_share[cpu_shape])
        # Jobs are merged a chunk at a time into outputs sized for every raw step: the
        # temporaries of a whole trace (RICC: 25 M raw steps, ten arrays) would take 1.5 GB
        # of fresh pages, and the kernel zeroing them cost more than the merge itself.
        raw = np.where(
            shaped,
            np.diff(library.cpu.offsets)[cpu_shape] + np.diff(library.memory.offsets)[mem_shape],
            1,
        )
        bound = int(raw.sum())
        counts = np.empty(n, dtype=np.int64)
        frac = np.empty(bound)
        s_cpu = np.empty(bound)
        s_mem = np.empty(bound)
        filled = 0
        for lo, hi in chunks(raw):
            parts = _merge_steps(
                library, lo, shaped[lo:hi], cpu_shape[lo:hi], mem_shape[lo:hi], cpu, mem
            )
            counts[lo:hi] = np.bincount(parts[0] - lo, minlength=hi - lo)
            k = parts[0].size
            for out, part in zip((frac, s_cpu, s_mem), parts[1:], strict=True):
                out[filled : filled + k] = part
            filled += k
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return offsets, frac[:filled], s_cpu[:filled], s_mem[:filled], cpu


def chunks(raw: npt.NDArray[np.int64]) -> list[tuple[int, int]]:
    """Consecutive index ranges ``(lo, hi)`` covering ``raw`` (items of ``raw[i]`` raw steps
    each), cut after the item where the running total passes each ``CHUNK_STEPS``; an item
    larger than a chunk is a chunk of its own. No empty range."""
    cuts = np.searchsorted(np.cumsum(raw), np.arange(CHUNK_STEPS, int(raw.sum()), CHUNK_STEPS))
    bounds = [0, *np.unique(cuts + 1).tolist(), raw.size]
    return [(lo, hi) for lo, hi in itertools.pairwise(bounds) if lo < hi]


def _merge_steps(
    library: ShapeLibrary,
    first: int,
    shaped: npt.NDArray[np.bool_],
    cpu_shape: npt.NDArray[np.int64],
    mem_shape: npt.NDArray[np.int64],
    cpu: npt.NDArray[np.float64],
    mem: npt.NDArray[np.float64],
) -> tuple[
    npt.NDArray[np.int64], npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]
]:
    """(job, start fraction, busy share, memory share) of jobs ``first``, ``first + 1``, ...
    (one per entry of ``shaped``), in (job, start) order."""
    # short jobs: one flat step (the one-minute grid cannot show their shape)
    flat = np.flatnonzero(~shaped) + first
    shaped_jobs = np.flatnonzero(shaped) + first
    c_job, c_frac, c_level = expand(library.cpu, cpu_shape[shaped])
    c_job = shaped_jobs[c_job]
    m_job, m_frac, m_level = expand(library.memory, mem_shape[shaped])
    m_job = shaped_jobs[m_job]
    # merge the CPU and memory steps of a job; each value holds until its next step
    # in (job, start, kind) order: each part is sorted by (job, start) and shape starts
    # are below 1, so one stable sort of job + start over [CPU, memory, flat] does it
    # (a merge of sorted runs, far cheaper than a three-key lexsort)
    job = np.concatenate([c_job, m_job, flat])
    frac = np.concatenate([c_frac, m_frac, np.zeros(flat.size)])
    kind = np.concatenate(  # 0: CPU changes, 1: memory changes, 2: both (flat)
        [
            np.zeros(c_job.size, dtype=np.int8),
            np.ones(m_job.size, dtype=np.int8),
            np.full(flat.size, 2, dtype=np.int8),
        ]
    )
    c_val = np.concatenate([c_level, np.zeros(m_job.size), np.ones(flat.size)])
    m_val = np.concatenate([np.zeros(c_job.size), m_level, np.ones(flat.size)])
    order = np.argsort(job + frac, kind="stable")
    job, frac, kind = job[order], frac[order], kind[order]
    pos = np.arange(job.size)
    last_c = np.maximum.accumulate(np.where(kind != 1, pos, 0))
    last_m = np.maximum.accumulate(np.where(kind != 0, pos, 0))
    # several steps at one instant: the last holds (values looked up for those only)
    keep = np.ones(job.size, dtype=bool)
    keep[:-1] = (job[1:] != job[:-1]) | (frac[1:] != frac[:-1])
    job, frac = job[keep], frac[keep]
    c_val, m_val = c_val[order[last_c[keep]]], m_val[order[last_m[keep]]]
    s_cpu = np.minimum(c_val * cpu[job], 1.0)
    s_mem = np.minimum(m_val * mem[job], 1.0)
    return job, frac, s_cpu, s_mem


@dataclass(frozen=True, slots=True)
class JobUsage:
    """Per job: mean busy core share, memory share of its allocation, start-up phase length
    (flat model), and its usage steps.

    Steps of job ``j`` are ``step_*[step_offsets[j]:step_offsets[j + 1]]``: start as a fraction
    of the run (the first at 0, ascending), busy share of the allocated cores and share of the
    allocated memory, each holding until the next step. ``cpu_measured``/``memory_measured``
    say which means came from the trace.
    """

    cpu_share: npt.NDArray[np.float64]
    memory_share: npt.NDArray[np.float64]
    ramp_s: npt.NDArray[np.float64]
    ramp_memory_level: float
    cpu_measured: npt.NDArray[np.bool_]
    memory_measured: npt.NDArray[np.bool_]
    step_offsets: npt.NDArray[np.int64]
    step_frac: npt.NDArray[np.float64]
    step_cpu: npt.NDArray[np.float64]
    step_memory: npt.NDArray[np.float64]


def _inverse_cdf(
    quantiles: tuple[float, ...], u: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    probs = np.linspace(0.0, 1.0, len(quantiles))
    return np.interp(u, probs, np.asarray(quantiles, dtype=np.float64))


def fit_quantiles(values: npt.NDArray[np.float64], points: int = 21) -> tuple[float, ...]:
    """Quantiles at even probabilities of the finite ``values`` clipped to 0..1 (4 decimals)."""
    finite = np.clip(values[np.isfinite(values)], 0.0, 1.0)
    return tuple(round(float(q), 4) for q in np.quantile(finite, np.linspace(0.0, 1.0, points)))
