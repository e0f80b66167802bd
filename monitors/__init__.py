"""Node monitoring: what each running batch job was given and what it really uses.

::

    from monitors import Sampler, default_source, node_view
    from slurm_plugin.slurm import make_slurm

    sampler = Sampler("n1", make_slurm("cli"), default_source())
    snapshot = sampler.sample()                      # NodeSnapshot (JSON: snapshot.to_json())
    view = node_view(snapshot, sampler.history)      # policies.model.NodeView

Modules: ``snapshot`` (the contract), ``sampler``, ``usage`` (the source protocol),
``cgroup_v1``, ``cgroup_v2``, ``procscan`` (psutil fallback), ``psi``, ``history``, ``view``.
Names are imported lazily so ``import monitors.snapshot`` stays cheap (the prolog hook).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Backoff": "monitors.sampler",
    "CgroupV1Source": "monitors.cgroup_v1",
    "CgroupV2Source": "monitors.cgroup_v2",
    "FallbackSource": "monitors.procscan",
    "JobSnapshot": "monitors.snapshot",
    "JobUsage": "monitors.usage",
    "MonitoredNode": "monitors.view",
    "NodeSnapshot": "monitors.snapshot",
    "ProcessScanSource": "monitors.procscan",
    "Sampler": "monitors.sampler",
    "UsageHistory": "monitors.history",
    "UsageReading": "monitors.usage",
    "UsageSource": "monitors.usage",
    "default_source": "monitors.sampler",
    "node_view": "monitors.view",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'monitors' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
