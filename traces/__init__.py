"""Trace readers, usage and interference models, and the replay that drives policies/.

The public API::

    from traces import read_jobs, read_faas, Cluster, replay
    result = replay(read_jobs("jobs.swf.gz"), read_faas("azure2019/"), Cluster(1024, 8, 12 * 2**30))
    result.policies["headroom"].summary["recovered_cost"]
"""

from traces.azure import FaasTrace
from traces.formats import read_faas, read_jobs
from traces.interference import InterferenceModel
from traces.jobs import JobTrace
from traces.placement import Cluster
from traces.replay import PolicySeries, ReplayResult, replay
from traces.usage import UsageModel

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
