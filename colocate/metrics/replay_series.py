"""Reading a replay's per-interval time series from disk, for the OpenMetrics export.

Format (``colocate-replay-series/1``, JSON)::

    {"format": "colocate-replay-series/1", "node": "replay", "currency": "EUR",
     "charging": "resources",
     "policies": {"headroom": [
        {"t": 1700000000, "cores": {"total": 64, "idle_allocated": 12.5, ...},
         "memory_bytes": {...}, "wasted_cost": {"cores:idle_allocated": 0.01, ...},
         "recovered_cost": {"cores": 0.002}, "evictions": {"pressure": 1},
         "invocations": {"ok": 100}, "cold_starts": 2, "leases": 3}, ...]}}

Gauges (``cores``, ``memory_bytes``, ``leases``) are values at ``t``; the others are
increments over the interval ending at ``t``. :func:`save_replay_series` writes it from a
``traces.replay.ReplayResult``. ``wasted_cost`` keys are ``resource:state``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from colocate.errors import TraceFormatError
from colocate.metrics.openmetrics import ReplaySample
from colocate.metrics.replay_adapter import ReplayResultLike, replay_samples
from policies.prices import Prices

FORMAT = "colocate-replay-series/1"
#: The file name ``colocate metrics openmetrics --replay-out DIR`` looks for in DIR.
SERIES_FILE = "metrics-series.json"

__all__ = [
    "FORMAT",
    "SERIES_FILE",
    "ReplaySeries",
    "load_replay_series",
    "save_replay_series",
    "series_to_json",
]


@dataclass(frozen=True, slots=True)
class ReplaySeries:
    """Every policy's samples of one replay, and the money conventions they were costed in."""

    node: str
    currency: str
    charging: str
    policies: dict[str, list[ReplaySample]]


def _numbers(raw: Any, where: str, path: str, i: int) -> dict[str, float]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(isinstance(v, int | float) for v in raw.values()):
        raise TraceFormatError(
            "expected an object of numbers",
            path=path,
            field=f"{where}[{i}]",
            expected_format=FORMAT,
        )
    return {str(k): float(v) for k, v in raw.items()}


def _sample(raw: Any, path: str, i: int, policy: str) -> ReplaySample:
    where = f"policies.{policy}"
    if not isinstance(raw, dict) or not isinstance(raw.get("t"), int | float):
        raise TraceFormatError(
            "each sample needs a numeric 't'",
            path=path,
            field=f"{where}[{i}].t",
            expected_format=FORMAT,
        )
    wasted: dict[tuple[str, str], float] = {}
    for key, value in _numbers(raw.get("wasted_cost"), f"{where}.wasted_cost", path, i).items():
        resource, sep, state = key.partition(":")
        if not sep:
            raise TraceFormatError(
                f"wasted_cost key {key!r} must be 'resource:state'",
                path=path,
                field=f"{where}[{i}].wasted_cost",
                expected_format=FORMAT,
            )
        wasted[(resource, state)] = value
    leases = raw.get("leases")
    return ReplaySample(
        t=float(raw["t"]),
        cores=_numbers(raw.get("cores"), f"{where}.cores", path, i),
        memory_bytes=_numbers(raw.get("memory_bytes"), f"{where}.memory_bytes", path, i),
        wasted_cost=wasted,
        recovered_cost=_numbers(raw.get("recovered_cost"), f"{where}.recovered_cost", path, i),
        evictions=_numbers(raw.get("evictions"), f"{where}.evictions", path, i),
        invocations=_numbers(raw.get("invocations"), f"{where}.invocations", path, i),
        leases=float(leases) if isinstance(leases, int | float) else None,
        cold_starts=float(cold)
        if isinstance(cold := raw.get("cold_starts", 0.0), int | float)
        else 0.0,
    )


def load_replay_series(path: str | Path) -> ReplaySeries:
    """Read a series file; TraceFormatError naming the file and field when it is wrong."""
    where = str(path)
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise TraceFormatError(
            "file not found; run colocate replay with --out first", path=where
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TraceFormatError(
            f"not valid JSON ({exc})", path=where, expected_format=FORMAT
        ) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise TraceFormatError(
            f"not a replay series file (format must be {FORMAT!r})", path=where, field="format"
        )
    policies = data.get("policies")
    if not isinstance(policies, dict):
        raise TraceFormatError(
            "expected an object of policy -> samples", path=where, field="policies"
        )
    out: dict[str, list[ReplaySample]] = {}
    for policy, samples in policies.items():
        if not isinstance(samples, list):
            raise TraceFormatError(
                "expected a list of samples", path=where, field=f"policies.{policy}"
            )
        out[str(policy)] = [_sample(s, where, i, str(policy)) for i, s in enumerate(samples)]
    return ReplaySeries(
        node=str(data.get("node", "replay")),
        currency=str(data.get("currency", "EUR")),
        charging=str(data.get("charging", "resources")),
        policies=out,
    )


def series_to_json(series: ReplaySeries) -> dict[str, Any]:
    """The JSON form :func:`load_replay_series` reads (for writers of series files)."""
    return {
        "format": FORMAT,
        "node": series.node,
        "currency": series.currency,
        "charging": series.charging,
        "policies": {
            policy: [
                {
                    "t": s.t,
                    "cores": dict(s.cores),
                    "memory_bytes": dict(s.memory_bytes),
                    "wasted_cost": {f"{r}:{st}": v for (r, st), v in s.wasted_cost.items()},
                    "recovered_cost": dict(s.recovered_cost),
                    "evictions": dict(s.evictions),
                    "invocations": dict(s.invocations),
                    "cold_starts": s.cold_starts,
                    **({"leases": s.leases} if s.leases is not None else {}),
                }
                for s in samples
            ]
            for policy, samples in series.policies.items()
        },
    }


def save_replay_series(
    result: ReplayResultLike,
    prices: Prices,
    directory: str | Path,
    *,
    node: str = "replay",
    step_s: float | None = None,
) -> Path:
    """Write ``directory/metrics-series.json`` from a ``traces.replay.ReplayResult``.

    The replay's ``--out`` directory then works with ``colocate metrics openmetrics
    --replay-out DIR``. ``step_s`` as in :func:`replay_samples` (default: at most 2000
    points per series). Returns the path written.
    """
    series = ReplaySeries(
        node, prices.currency, prices.charging, replay_samples(result, prices, step_s=step_s)
    )
    path = Path(directory) / SERIES_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(series_to_json(series)))
    tmp.replace(path)
    return path
