"""The Slurm seam: one protocol for everything colocate asks of Slurm.

Backends (registered in ``BACKENDS``): ``cli`` (``squeue --json``, ``sinfo --json``,
``scontrol``; works with every Slurm since 21.08) and ``pyslurm`` (in-process; only where
pyslurm was built for the site's exact Slurm release).

Errors: ``SlurmUnavailable`` when Slurm does not answer (retry later);
``ConfigError`` when the backend cannot be used at all or a node is unknown (fix the setup).
"""

from __future__ import annotations

from typing import Protocol

from slurm_plugin.slurm.records import JobOnNode, NodeInfo, Parsed, ProcessEntry


class SlurmClient(Protocol):
    """What the monitor and the agent ask of Slurm. Implementations must not cache state
    that can change (job lists); they may cache what cannot (a running job's CPU ids)."""

    name: str

    def jobs_on_node(self, node: str) -> Parsed[JobOnNode]:
        """Jobs holding resources on ``node`` (running, suspended, completing)."""
        ...

    def node_info(self, node: str) -> NodeInfo:
        """Slurm's view of ``node``; ConfigError when Slurm does not know it."""
        ...

    def listpids(self, job_id: str, node: str | None = None) -> Parsed[ProcessEntry]:
        """Processes Slurm tracks for ``job_id`` on this host (empty when none); ``node``
        picks the slurmd where one host runs several (``slurmd -N``)."""
        ...

    def version(self) -> str:
        """Slurm's release, e.g. ``22.05.8``."""
        ...
