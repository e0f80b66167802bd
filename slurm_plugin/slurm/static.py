"""A Slurm backend that answers from memory: for tests, demos and the standalone agent.

It is a real ``SlurmClient``: set ``jobs`` and ``nodes``, flip ``available`` to make it
behave like a Slurm that does not answer. ``calls`` counts the questions it was asked.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from colocate.errors import ConfigError, SlurmUnavailable
from slurm_plugin.slurm.records import JobOnNode, NodeInfo, Parsed, ProcessEntry


class StaticSlurm:
    name = "static"

    def __init__(self, nodes: Iterable[NodeInfo] = (), jobs: Iterable[JobOnNode] = ()) -> None:
        self.nodes = {n.name: n for n in nodes}
        self.jobs = list(jobs)
        self.available = True
        self.calls: Counter[str] = Counter()

    def _ask(self, what: str) -> None:
        self.calls[what] += 1
        if not self.available:
            raise SlurmUnavailable(f"static Slurm switched off ({what})")

    def jobs_on_node(self, node: str) -> Parsed[JobOnNode]:
        self._ask("jobs_on_node")
        return Parsed(tuple(j for j in self.jobs if j.node == node and j.state.holds_resources))

    def node_info(self, node: str) -> NodeInfo:
        self._ask("node_info")
        try:
            return self.nodes[node]
        except KeyError:
            raise ConfigError(
                f"Slurm has no node {node!r} (known: {', '.join(sorted(self.nodes))})"
            ) from None

    def listpids(self, job_id: str, node: str | None = None) -> Parsed[ProcessEntry]:
        self._ask("listpids")
        return Parsed()

    def version(self) -> str:
        return "static"
