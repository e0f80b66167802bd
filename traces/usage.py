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

Time shape: piecewise constant, two phases per job. During a start-up phase
(``ramp_fraction`` of the run time, at most ``ramp_max_s``) memory is at
``ramp_memory_level`` of the steady level; then it is at the steady level until the end.
CPU use is constant. Deterministic: the same seed gives the same draws.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, field_validator

from traces.jobs import JobTrace

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
        return JobUsage(
            cpu_share=cpu,
            memory_share=mem,
            ramp_s=ramp,
            ramp_memory_level=self.ramp_memory_level,
            cpu_measured=cpu_measured,
            memory_measured=mem_measured,
        )


@dataclass(frozen=True, slots=True)
class JobUsage:
    """Per job: busy core share, steady memory share of its allocation, start-up phase length.

    ``cpu_measured``/``memory_measured`` say which values came from the trace.
    """

    cpu_share: npt.NDArray[np.float64]
    memory_share: npt.NDArray[np.float64]
    ramp_s: npt.NDArray[np.float64]
    ramp_memory_level: float
    cpu_measured: npt.NDArray[np.bool_]
    memory_measured: npt.NDArray[np.bool_]


def _inverse_cdf(
    quantiles: tuple[float, ...], u: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    probs = np.linspace(0.0, 1.0, len(quantiles))
    return np.interp(u, probs, np.asarray(quantiles, dtype=np.float64))


def fit_quantiles(values: npt.NDArray[np.float64], points: int = 21) -> tuple[float, ...]:
    """Quantiles at even probabilities of the finite ``values`` clipped to 0..1 (4 decimals)."""
    finite = np.clip(values[np.isfinite(values)], 0.0, 1.0)
    return tuple(round(float(q), 4) for q in np.quantile(finite, np.linspace(0.0, 1.0, points)))
