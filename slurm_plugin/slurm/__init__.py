"""The Slurm seam: everything colocate asks of Slurm goes through a ``SlurmClient``.

>>> slurm = make_slurm("cli")
>>> slurm.jobs_on_node("n1").items   # doctest: +SKIP
(JobOnNode(job_id='5', user='root', uid=0, node='n1', state=<JobState.RUNNING>, cores=2, ...),)
"""

from __future__ import annotations

from collections.abc import Callable

from colocate.errors import ConfigError
from slurm_plugin.slurm.cli import CliSlurm, CommandRunner, subprocess_runner
from slurm_plugin.slurm.client import SlurmClient
from slurm_plugin.slurm.hostlist import expand_hostlist, format_cpu_ids, parse_cpu_ids
from slurm_plugin.slurm.pyslurm_backend import PyslurmSlurm
from slurm_plugin.slurm.records import JobOnNode, NodeInfo, Parsed, ProcessEntry
from slurm_plugin.slurm.states import JobState, NodeState, job_state, node_state
from slurm_plugin.slurm.static import StaticSlurm

BACKENDS: dict[str, Callable[[], SlurmClient]] = {
    "cli": CliSlurm,
    "pyslurm": PyslurmSlurm,
}


def make_slurm(backend: str = "cli") -> SlurmClient:
    """The Slurm client named ``backend`` (``cli`` or ``pyslurm``); ConfigError otherwise."""
    try:
        factory = BACKENDS[backend]
    except KeyError:
        raise ConfigError(
            f"unknown Slurm backend {backend!r}; choose one of {', '.join(BACKENDS)}",
            key="slurm.backend",
        ) from None
    return factory()


__all__ = [
    "BACKENDS",
    "CliSlurm",
    "CommandRunner",
    "JobOnNode",
    "JobState",
    "NodeInfo",
    "NodeState",
    "Parsed",
    "ProcessEntry",
    "PyslurmSlurm",
    "SlurmClient",
    "StaticSlurm",
    "expand_hostlist",
    "format_cpu_ids",
    "job_state",
    "make_slurm",
    "node_state",
    "parse_cpu_ids",
    "subprocess_runner",
]
