"""Interference limits and margins: the knobs of every policy, with their defaults."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Limits(BaseModel):
    """Defaults follow published harvesting controllers (see ARCHITECTURE.md, "Lending cores")."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    memory_margin_ratio: float = Field(
        0.10, ge=0, le=1, description="margin above a job's peak, as a share of its allocation"
    )
    memory_margin_bytes: int = Field(
        256 * 1024**2, ge=0, description="minimum margin above a job's peak, bytes"
    )
    core_margin: float = Field(
        0.0,
        ge=0,
        description="cores kept free above a job's observed use, beyond the noise allowance (0: the growth rule and PSI protect the job)",
    )
    core_noise: float = Field(
        0.15,
        ge=0,
        lt=1,
        description="demand within this of whole cores counts as those cores (rate jitter, wake-up latency, the job's own daemons): a job at 1.1 keeps 1 core",
    )
    cpu_spike_s: float = Field(
        5.0,
        ge=0,
        description="demand seen in fewer than cpu_growth_samples readings this close together is a spike (a shell forking, a start-up): not sized for",
    )
    cpu_growth_margin: float = Field(
        0.3,
        ge=0,
        description="a job grows into its lent cores when it wants more than the cores it kept plus this",
    )
    idle_core_busy: float = Field(
        0.2,
        ge=0,
        le=1,
        description="a core a job kept below this busy share over the window (per-core accounting) is idle and lent first",
    )
    cpu_growth_samples: int = Field(
        2,
        ge=1,
        description="a job's use must stay above what it kept for this many consecutive samples before its lent cores are taken back",
    )
    history_window_s: float = Field(
        300.0, gt=0, description="usage history a policy looks at, seconds"
    )
    min_history_s: float = Field(
        30.0, ge=0, description="a job younger than this offers nothing of its own"
    )
    percentile: float = Field(
        95.0, ge=0, le=100, description="predictive: usage percentile sized for"
    )
    cpu_pressure_limit: float = Field(
        5.0, ge=0, le=100, description="PSI cpu some avg10 (%) that triggers eviction"
    )
    memory_pressure_limit: float = Field(
        5.0, ge=0, le=100, description="PSI memory some avg10 (%) that triggers eviction"
    )
    pressure_grace_s: float = Field(
        5.0, ge=0, description="pressure must last this long before eviction"
    )
    reoffer_cooldown_s: float = Field(
        60.0, ge=0, description="after a pressure eviction, offer nothing of that job for this long"
    )
    eviction_grace_s: float = Field(
        1.0, ge=0, description="soft evictions: executor grace period, seconds"
    )
    max_function_share: float = Field(
        0.5, ge=0, le=1, description="cap on the share of node cores and memory functions may hold"
    )
    slowdown_budget: float = Field(
        0.05, ge=0, description="tolerated batch slowdown (replay reports exceedance)"
    )
    guard: bool = Field(True, description="wrap the policy in the interference guard")
    trend_horizon_s: float = Field(
        60.0,
        ge=0,
        description="predictive: how far ahead a job's memory trend is extrapolated, seconds",
    )
    min_reclaim_bytes: int = Field(
        64 * 1024**2,
        ge=0,
        description="guard: the memory offer grows back only in steps of at least this, bytes",
    )
    min_reclaim_cores: int = Field(
        1,
        ge=1,
        description="guard: the core offer grows back only in steps of at least this many cores",
    )
    reoffer_backoff: float = Field(
        2.0,
        ge=1,
        description="guard: each further pressure eviction of a job multiplies its cooldown by this",
    )
    reoffer_cooldown_max_s: float = Field(
        3600.0, ge=0, description="guard: the longest re-offer cooldown, seconds"
    )
