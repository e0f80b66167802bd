"""Prices and the money arithmetic shared by the replay and the live metrics (pure)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

GIB = 1024**3


class Prices(BaseModel):
    """Defaults: Wageningen University HPC tariff (EUR 0.015 per core-hour, 0.0015 per GB-hour).

    ``charging="node"`` bills whole node-hours (CSCS, NERSC) at ``node_hour``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    currency: str = "EUR"
    charging: Literal["resources", "node"] = "resources"
    core_hour: float = Field(0.015, ge=0)
    gib_hour: float = Field(0.0015, ge=0)
    node_hour: float = Field(0.0, ge=0)

    def resource_cost(self, core_seconds: float, memory_byte_seconds: float) -> float:
        """Cost of cores and memory held for some time, in ``currency``."""
        return (
            core_seconds / 3600.0 * self.core_hour
            + memory_byte_seconds / GIB / 3600.0 * self.gib_hour
        )

    def idle_cost(
        self,
        core_seconds: float,
        memory_byte_seconds: float,
        node_cores: int,
        node_memory_bytes: int,
    ) -> float:
        """Cost of idle cores and memory; in node charging, the larger share of a node-hour."""
        if self.charging == "node":
            share = max(
                core_seconds / max(node_cores, 1), memory_byte_seconds / max(node_memory_bytes, 1)
            )
            return share / 3600.0 * self.node_hour
        return self.resource_cost(core_seconds, memory_byte_seconds)
