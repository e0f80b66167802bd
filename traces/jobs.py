"""The job trace every reader returns: one numpy array per field, one row per job.

Units: seconds (times are Unix epoch seconds), bytes, cores. Missing values are NaN (floats)
or -1 (ints). Column arrays, not one object per job: the replay reads hundreds of thousands
of jobs and must stay fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class JobTrace:
    """Batch jobs as recorded.

    - ``job_id``: the trace's job number (int64).
    - ``submit_s``, ``start_s``, ``end_s``: epoch seconds (float64); start = submit + wait.
    - ``cores``: allocated cores (int64); ``nodes``: allocated nodes, -1 when unknown.
    - ``memory_alloc_bytes``: memory allocated or requested for the whole job, NaN when unknown.
    - ``cpu_used_ratio``: average busy cores / allocated cores (0..1), NaN when unknown.
    - ``memory_used_bytes``: memory used by the whole job (average or peak, see ``notes``),
      NaN when unknown.

    ``max_nodes``/``max_procs``/``memory_per_node_bytes`` are what the trace says about the
    machine (0 when it says nothing). ``skipped`` counts rows dropped by reason (never run,
    no cores).
    """

    path: str
    format: str
    job_id: IntArray
    submit_s: FloatArray
    start_s: FloatArray
    end_s: FloatArray
    cores: IntArray
    nodes: IntArray
    memory_alloc_bytes: FloatArray
    cpu_used_ratio: FloatArray
    memory_used_bytes: FloatArray
    max_nodes: int = 0
    max_procs: int = 0
    memory_per_node_bytes: int = 0
    unix_start_time: float = 0.0
    header: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def __len__(self) -> int:
        return int(self.job_id.shape[0])

    @property
    def span_s(self) -> tuple[float, float]:
        """(first start, last end) in epoch seconds; (0, 0) for an empty trace."""
        if len(self) == 0:
            return (0.0, 0.0)
        return (float(self.start_s.min()), float(self.end_s.max()))

    def head(self, n: int) -> JobTrace:
        """The first ``n`` jobs in start order (for benchmarks at 10 %, 50 %, ...)."""
        order = np.argsort(self.start_s, kind="stable")[:n]
        return self.take(order)

    def take(self, index: npt.NDArray[np.intp] | npt.NDArray[np.bool_]) -> JobTrace:
        """A trace with only the rows selected by ``index`` (integer indices or a mask)."""
        return JobTrace(
            path=self.path,
            format=self.format,
            job_id=self.job_id[index],
            submit_s=self.submit_s[index],
            start_s=self.start_s[index],
            end_s=self.end_s[index],
            cores=self.cores[index],
            nodes=self.nodes[index],
            memory_alloc_bytes=self.memory_alloc_bytes[index],
            cpu_used_ratio=self.cpu_used_ratio[index],
            memory_used_bytes=self.memory_used_bytes[index],
            max_nodes=self.max_nodes,
            max_procs=self.max_procs,
            memory_per_node_bytes=self.memory_per_node_bytes,
            unix_start_time=self.unix_start_time,
            header=self.header,
            skipped=self.skipped,
            notes=self.notes,
        )
