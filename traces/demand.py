"""FaaS demand on the replay's one-minute grid, from a :class:`~traces.azure.FaasTrace`.

Fluid model per minute ``m`` (each running invocation holds one core and its function's
instance memory):

- ``invocations[m]``: invocations that start in the minute;
- ``cores[m] = sum_f invocations_f[m] * duration_f / 60``: average concurrency (cores);
- ``memory_bytes[m] = sum_f concurrency_f[m] * memory_f``;
- ``cold_starts[m] = sum_f max(0, ceil(concurrency_f[m]) - ceil(concurrency_f[m-1]))``:
  instances that must start because concurrency grew (keep-alive of idle instances and their
  memory are not modelled).

The trace is repeated back to back to cover the job trace span (an 8-hour Azure 2019
window thus repeats three times a day), and multiplied by ``scale``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from traces.azure import FaasTrace

STEP_S = 60.0


@dataclass(frozen=True, slots=True)
class Demand:
    """Per-minute demand arrays (length = minutes of the replay), see the module docstring."""

    invocations: npt.NDArray[np.float64]
    cores: npt.NDArray[np.float64]
    memory_bytes: npt.NDArray[np.float64]
    cold_starts: npt.NDArray[np.float64]
    repeats: float  # how many times the trace was laid end to end


def demand(trace: FaasTrace, minutes: int, scale: float = 1.0) -> Demand:
    """Demand for ``minutes`` minutes, the trace tiled from its first column."""
    inv = trace.invocations.astype(np.float64)
    conc = inv * (trace.duration_s[:, None] / STEP_S)
    instances = np.ceil(conc - 1e-9)
    previous = np.roll(instances, 1, axis=1)  # wraps: the tiled trace follows itself
    cold = np.maximum(instances - previous, 0.0).sum(axis=0)
    per_min = (
        inv.sum(axis=0),
        conc.sum(axis=0),
        (conc * trace.memory_bytes[:, None]).sum(axis=0),
        cold,
    )
    width = max(trace.minutes, 1)
    index = np.arange(minutes) % width
    tiled = [
        np.asarray(a, dtype=np.float64)[index] * scale if a.size else np.zeros(minutes)
        for a in per_min
    ]
    return Demand(
        invocations=tiled[0],
        cores=tiled[1],
        memory_bytes=tiled[2],
        cold_starts=tiled[3],
        repeats=minutes / width,
    )
