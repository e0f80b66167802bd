"""Batch slowdown caused by co-located functions, per job sensitivity class.

Calibration (Copik et al., IPDPS 2024, computed from their artifact's raw data): with
functions pinned to the spare cores of a batch job's node, LULESH (compute bound) ran
-1.1 % to +3.1 % slower and MILC (memory-bandwidth bound) +3.0 % to +12.4 %, the spread
coming from which function co-ran (NAS CG worst).

Model: each job is memory-bound with probability ``memory_bound_fraction``, else compute
bound; it draws a severity ``x`` uniform in 0..1 and its slowdown at the reference
co-location (functions on ``reference_share`` of the node's cores) is
``lo + (hi - lo) * x`` of its class range. At another function share ``f`` of the node's
cores it scales linearly: ``slowdown = (lo + (hi - lo) * x) * f / reference_share``; no
functions, no slowdown. The reference share (half the node) is an assumption: the paper
co-located on the cores the batch job left free.

The replay also shows the guard what an agent's PSI would: ``cpu_pressure`` of a job is
``100 * s / (1 + s)`` (the share of time its work would stall) for a modelled slowdown ``s``
> 0. Memory-bandwidth contention does not show in PSI memory, so that stays unset.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from policies.interference import InterferenceTable


class InterferenceModel(BaseModel):
    """Slowdown ranges (fractions: 0.031 = 3.1 %) per sensitivity class at the reference share."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    memory_bound_fraction: float = Field(
        0.5, ge=0, le=1, description="share of jobs that are memory-bandwidth bound"
    )
    compute_bound_range: tuple[float, float] = Field(
        (-0.011, 0.031), description="LULESH, slowdown fraction"
    )
    memory_bound_range: tuple[float, float] = Field(
        (0.030, 0.124), description="MILC, slowdown fraction"
    )
    reference_share: float = Field(
        0.5, gt=0, le=1, description="function share of node cores the ranges hold at"
    )

    @classmethod
    def from_table(
        cls, table: InterferenceTable, memory_bound_fraction: float = 0.5
    ) -> InterferenceModel:
        """The model with a site's measured ranges (:meth:`InterferenceTable.class_ranges`)."""
        ranges = table.class_ranges()
        return cls(
            memory_bound_fraction=memory_bound_fraction,
            compute_bound_range=ranges["compute_bound"],
            memory_bound_range=ranges["memory_bound"],
            reference_share=table.function_share,
        )

    def sensitivity(
        self, n_jobs: int, seed: int
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
        """(slowdown per unit of function core share, memory-bound flag) for each job."""
        rng = np.random.default_rng(seed + 7919)  # independent of the usage draws
        memory_bound = rng.random(n_jobs) < self.memory_bound_fraction
        x = rng.random(n_jobs)
        lo = np.where(memory_bound, self.memory_bound_range[0], self.compute_bound_range[0])
        hi = np.where(memory_bound, self.memory_bound_range[1], self.compute_bound_range[1])
        return (lo + (hi - lo) * x) / self.reference_share, memory_bound


def cpu_pressure(slowdown: float) -> float | None:
    """PSI-like cpu ``some`` percent an agent would see for a slowdown fraction (None if <= 0)."""
    if slowdown <= 0.0:
        return None
    return 100.0 * slowdown / (1.0 + slowdown)
