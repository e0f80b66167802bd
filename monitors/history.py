"""A short usage history per job, oldest first: what the policies see as ``JobView.history``."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from policies.model import UsageSample


class UsageHistory:
    """Keeps each job's samples of the last ``horizon_s`` seconds (at most ``max_samples``).

    Jobs that leave the node are forgotten at the next ``retain``.
    """

    def __init__(self, horizon_s: float = 600.0, max_samples: int = 1200) -> None:
        self.horizon_s = horizon_s
        self.max_samples = max_samples
        self._jobs: dict[str, deque[UsageSample]] = {}

    def add(self, job_id: str, sample: UsageSample) -> None:
        samples = self._jobs.setdefault(job_id, deque(maxlen=self.max_samples))
        samples.append(sample)
        cutoff = sample.t - self.horizon_s
        while samples and samples[0].t < cutoff:
            samples.popleft()

    def retain(self, job_ids: Iterable[str]) -> None:
        """Forget every job not in ``job_ids``."""
        keep = set(job_ids)
        for job_id in [j for j in self._jobs if j not in keep]:
            del self._jobs[job_id]

    def samples(self, job_id: str) -> tuple[UsageSample, ...]:
        return tuple(self._jobs.get(job_id, ()))

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._jobs

    def __len__(self) -> int:
        return len(self._jobs)
