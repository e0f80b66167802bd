"""Runners for replay sweeps: the same trials on local processes, a Slurm job array or Dask.

The engine (what a trial is and how one runs) is :mod:`traces.sweep`; each runner here only
moves trials' JSON to where they run and the rows back, so a sweep's rows are identical
whichever runner ran them.
"""

from __future__ import annotations

from colocate.sweep.runners import RUNNERS, DaskRunner, LocalRunner, Runner, SlurmArrayRunner

__all__ = ["RUNNERS", "DaskRunner", "LocalRunner", "Runner", "SlurmArrayRunner"]
