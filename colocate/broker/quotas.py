"""Quotas per user and per account (pure: the broker hands in the current use).

Like Slurm's association limits (GrpTRES, MaxJobs, MaxWall, GrpTRESMins), a lease request is
checked against the user's limits and the account's: cores and memory held at once,
concurrent leases, lease duration, core-hours since midnight UTC. The first limit a request
would pass is named with the current use in a :class:`QuotaExceeded`.
"""

from __future__ import annotations

from dataclasses import dataclass

from colocate.config import Quota, QuotaConfig
from colocate.errors import QuotaExceeded


@dataclass(frozen=True, slots=True)
class Use:
    """What a user or an account holds now, and has used today."""

    cores: int = 0
    memory_bytes: int = 0
    leases: int = 0
    core_seconds_today: float = 0.0


def quota_for(config: QuotaConfig, *, user: str | None = None, account: str | None = None) -> Quota:
    if user is not None:
        return config.users.get(user, config.default_user)
    assert account is not None
    return config.accounts.get(account, config.default_account)


def check(
    quota: Quota,
    use: Use,
    who: str,
    *,
    cores: int,
    memory_bytes: int,
    duration_s: float,
    new_lease: bool = True,
) -> None:
    """Raise QuotaExceeded when granting ``cores``/``memory_bytes`` for ``duration_s`` would pass
    a limit of ``quota``; ``who`` is e.g. ``"user alice"`` or ``"account physics"``.
    ``new_lease`` False checks a renewal (only duration and core-hours)."""
    gib = 1024**3
    if quota.duration_s is not None and duration_s > quota.duration_s:
        raise QuotaExceeded(
            f"{who}: lease of {duration_s:g}s exceeds the limit of {quota.duration_s:g}s per lease; ask for less",
            limit="duration_s",
            used=0,
            wanted=duration_s,
            allowed=quota.duration_s,
        )
    if new_lease and quota.leases is not None and use.leases + 1 > quota.leases:
        raise QuotaExceeded(
            f"{who}: holds {use.leases} leases, one more would pass the limit of {quota.leases} at once; release one first",
            limit="leases",
            used=use.leases,
            wanted=1,
            allowed=quota.leases,
        )
    if new_lease and quota.cores is not None and use.cores + cores > quota.cores:
        raise QuotaExceeded(
            f"{who}: holds {use.cores} cores, {cores} more would pass the limit of {quota.cores}",
            limit="cores",
            used=use.cores,
            wanted=cores,
            allowed=quota.cores,
        )
    if new_lease and quota.memory is not None and use.memory_bytes + memory_bytes > quota.memory:
        raise QuotaExceeded(
            f"{who}: holds {use.memory_bytes / gib:.2f} GiB, {memory_bytes / gib:.2f} GiB more would pass "
            f"the limit of {quota.memory / gib:.2f} GiB",
            limit="memory",
            used=use.memory_bytes,
            wanted=memory_bytes,
            allowed=quota.memory,
        )
    if quota.core_hours_per_day is not None:
        used_h = use.core_seconds_today / 3600.0
        wanted_h = cores * duration_s / 3600.0
        if used_h + wanted_h > quota.core_hours_per_day:
            raise QuotaExceeded(
                f"{who}: used {used_h:.2f} core-hours today, {wanted_h:.2f} more would pass the limit of "
                f"{quota.core_hours_per_day:g} per day (resets at 00:00 UTC)",
                limit="core_hours_per_day",
                used=used_h,
                wanted=wanted_h,
                allowed=quota.core_hours_per_day,
            )
