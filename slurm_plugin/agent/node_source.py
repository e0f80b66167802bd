"""Where the agent learns what its node has: the seam between the agent loop and the node.

A :class:`NodeSource` describes the node (cores, memory, running batch jobs) as a
:class:`~policies.model.NodeView` without leases; the agent adds its leases and asks the
policy what may be offered. The standalone source offers a fixed share of this machine and
has no jobs; the Slurm-integrated source (a later issue) fills ``jobs`` from Slurm and the
monitors, and the same loop then runs the headroom policy over it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Protocol

import psutil

from colocate.errors import ConfigError
from policies.model import NodeView

if TYPE_CHECKING:
    from monitors.snapshot import NodeSnapshot


class NodeSource(Protocol):
    """Describes one node at ``now`` (seconds since the epoch). Leases are left empty.

    The agent samples with ``view`` outside its lock, then decides on ``recent_view`` under
    it, so a prolog (which decides on ``recent_view`` alone) never waits for a sample.
    """

    node: str

    def view(self, now: float) -> NodeView:
        """Sample the node now (may take a while: cgroups, Slurm) and describe it."""
        ...

    def recent_view(self, now: float) -> NodeView:
        """The latest sample with what was learned since (a prolog, an epilog), without
        sampling: fast. Samples when there is no sample yet."""
        ...

    @property
    def last_snapshot(self) -> NodeSnapshot | None:
        """The monitor's latest snapshot, for metrics; None without a monitor."""
        ...


class StandaloneNode:
    """This machine without Slurm: ``cpu_ids`` and ``memory_bytes`` are offered as they are."""

    def __init__(self, node: str, cpu_ids: frozenset[int], memory_bytes: int) -> None:
        if not cpu_ids:
            raise ConfigError("a standalone agent must offer at least one core")
        self.node = node
        self.cpu_ids = cpu_ids
        self.memory_bytes = memory_bytes

    @classmethod
    def from_machine(
        cls, node: str, cores: int | None = None, memory_bytes: int | None = None
    ) -> StandaloneNode:
        """Offer the first ``cores`` CPUs this process may run on (default all of them) and
        ``memory_bytes`` (default half of the machine's RAM). ConfigError if more is asked
        than the machine has."""
        allowed = sorted(os.sched_getaffinity(0))
        total = psutil.virtual_memory().total
        if cores is not None and not 1 <= cores <= len(allowed):
            raise ConfigError(
                f"--cores {cores}: this machine lets the agent use {len(allowed)} cores; offer 1..{len(allowed)}"
            )
        if memory_bytes is not None and not 0 <= memory_bytes <= total:
            raise ConfigError(
                f"--memory {memory_bytes} bytes: this machine has {total} bytes of RAM; offer less"
            )
        chosen = frozenset(allowed[: cores or len(allowed)])
        return cls(node, chosen, total // 2 if memory_bytes is None else memory_bytes)

    def view(self, now: float) -> NodeView:
        return NodeView(node=self.node, cpu_ids=self.cpu_ids, memory_total_bytes=self.memory_bytes)

    def recent_view(self, now: float) -> NodeView:
        return self.view(now)  # nothing to sample: as fast as a recent view

    @property
    def last_snapshot(self) -> NodeSnapshot | None:
        return None
