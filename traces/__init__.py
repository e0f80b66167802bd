"""Trace readers, usage and interference models, and the replay that drives policies/.

The public API::

    from traces import read_jobs, read_faas, Cluster, replay
    result = replay(read_jobs("jobs.swf.gz"), read_faas("azure2019/"), Cluster(1024, 8, 12 * 2**30))
    result.policies["headroom"].summary["recovered_cost"]
"""

from traces import compiled

compiled.guard()  # before the first import of the replay's loop (traces.decisions)

from traces.azure import FaasTrace  # noqa: E402
from traces.formats import read_faas, read_jobs  # noqa: E402
from traces.interference import InterferenceModel  # noqa: E402
from traces.jobs import JobTrace  # noqa: E402
from traces.placement import Cluster  # noqa: E402
from traces.replay import PolicySeries, ReplayResult, replay  # noqa: E402
from traces.usage import UsageModel  # noqa: E402

__all__ = [
    "Cluster",
    "FaasTrace",
    "InterferenceModel",
    "JobTrace",
    "PolicySeries",
    "ReplayResult",
    "UsageModel",
    "read_faas",
    "read_jobs",
    "replay",
]
