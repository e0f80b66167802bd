"""The node agent: offers a node's idle cores and memory to the broker and runs the leases.

The loop (:class:`Agent`) is the same for every node source: :class:`StandaloneNode` offers a
fixed share of this machine (no Slurm: laptops, tests); the Slurm-integrated source plugs in
through :class:`NodeSource`.
"""

from __future__ import annotations

from slurm_plugin.agent.agent import Agent, ExecutorBackend, HeldLease
from slurm_plugin.agent.node_source import NodeSource, StandaloneNode

__all__ = ["Agent", "ExecutorBackend", "HeldLease", "NodeSource", "StandaloneNode"]
