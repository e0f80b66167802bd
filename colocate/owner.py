"""Who a lease belongs to: the one value the broker, the agent and the executor share.

The broker fills it from the caller's authenticated identity (MUNGE or Slurm JWT) and the
site's account map; the agent passes it to the executor supervisor, which runs the lease's
workers as that uid and groups (or as a pool uid, by site choice). Standard library only:
the worker and the prolog path import it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Owner:
    """A POSIX identity with its Slurm account; ``uid`` 0 is never a lease owner's worker uid."""

    uid: int
    gid: int
    user: str
    account: str = ""

    def label(self) -> str:
        """``user(uid)`` or ``user(uid)/account`` for messages and logs."""
        base = f"{self.user}({self.uid})"
        return f"{base}/{self.account}" if self.account else base
