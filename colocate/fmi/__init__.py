"""FMI: MPI-style message passing among the functions of a lease group.

Inside a function started with ``LeaseExecutor.spmd`` (or ``colocate.client.spmd.Group``)::

    def step(comm, x):
        total = comm.allreduce(x)          # SUM by default; MIN, MAX, PROD or any function
        return comm.rank, total

The vocabulary is mpi4py's (``comm.rank``, ``comm.size``, ``send``/``recv``,
``isend``/``irecv``, ``barrier``, ``bcast``, ``reduce``, ``allreduce``, ``gather``,
``allgather``, ``scatter``, ``scan``); see :mod:`colocate.fmi.comm`. Channels and the cost
model that picks them: :mod:`colocate.fmi.channels`; what runs on a rank:
:mod:`colocate.fmi.rank`.
"""

from __future__ import annotations

from colocate.fmi.comm import (
    ANY_SOURCE,
    ANY_TAG,
    MAX,
    MIN,
    PROD,
    SUM,
    Comm,
    GroupAborted,
    Op,
    Request,
)

__all__ = [
    "ANY_SOURCE",
    "ANY_TAG",
    "MAX",
    "MIN",
    "PROD",
    "SUM",
    "Comm",
    "GroupAborted",
    "Op",
    "Request",
]
