"""Serverless processes (PraaS): named state that survives a lease's eviction.

Client side: :class:`Process` (``Client.process(name)``). Worker side: ``runtime`` (live
state, transactions, write-through, swap-out). Storage: ``store`` (directory store).
"""

from colocate.process.client import Process, StateRolledBack

__all__ = ["Process", "StateRolledBack"]
