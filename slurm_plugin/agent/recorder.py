"""What the live agent saw and decided, written down so the replay can decide it again.

Off by default; ``agent.record_file`` turns it on. Each ``decide`` of the agent appends one
JSON line: the time, the node view it decided on (jobs with their usage history, leases),
the policy state it passed in, and the decision (offer, evictions, new state). Every file
starts with a header line naming the policy and its limits. When a file passes
``agent.record_max_bytes`` it is renamed to ``FILE.1`` (replacing the previous one) and a
new file begins, so the recording never holds more than about twice that on disk.

:func:`replay_log` calls the policy again on every recorded view and state and compares
offer, evictions and state with what the agent decided: the live agent and the replay share
one pure core (``policies``), so they must be equal.

Values are encoded as JSON with a type tag for the policy types (``UsageSample``, ``JobView``,
``LeaseView``, ``NodeView``, ``Offer``, ``Eviction``, ``GuardState``), tuples and frozensets
kept apart from lists so a decoded value compares equal to the original.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import math
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from colocate.errors import ConfigError
from policies import POLICIES
from policies.guard import GuardState
from policies.limits import Limits
from policies.model import (
    Decision,
    Eviction,
    EvictionReason,
    JobView,
    LeaseView,
    NodeView,
    Offer,
    UsageSample,
)

log = logging.getLogger(__name__)

FORMAT = "colocate-agent-log/1"
TYPES: dict[str, type] = {
    cls.__name__: cls
    for cls in (UsageSample, JobView, LeaseView, NodeView, Offer, Eviction, GuardState)
}
ENUMS: dict[str, type[enum.Enum]] = {"EvictionReason": EvictionReason}


def encode(value: Any) -> Any:
    """``value`` as JSON-able data that :func:`decode` turns back into an equal value."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"f": repr(value)}
    if isinstance(value, enum.Enum):
        return {"e": type(value).__name__, "v": value.value}
    if isinstance(value, tuple):
        return {"t": [encode(v) for v in value]}
    if isinstance(value, frozenset):
        return {"s": sorted((encode(v) for v in value), key=repr)}
    if isinstance(value, list):
        return [encode(v) for v in value]
    if dataclasses.is_dataclass(value) and type(value).__name__ in TYPES:
        fields = {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {"d": type(value).__name__, "v": fields}
    raise TypeError(f"cannot record a {type(value).__name__}")


def decode(data: Any) -> Any:
    """The value :func:`encode` wrote; ValueError on anything else."""
    if data is None or isinstance(data, bool | int | float | str):
        return data
    if isinstance(data, list):
        return [decode(v) for v in data]
    if isinstance(data, dict):
        if "t" in data:
            return tuple(decode(v) for v in data["t"])
        if "s" in data:
            return frozenset(decode(v) for v in data["s"])
        if "f" in data:
            return float(data["f"])
        if "e" in data:
            return ENUMS[data["e"]](data["v"])
        if "d" in data:
            cls = TYPES.get(data["d"])
            if cls is None:
                raise ValueError(f"unknown recorded type {data['d']!r}")
            return cls(**{k: decode(v) for k, v in data["v"].items()})
    raise ValueError(f"not a recorded value: {str(data)[:80]}")


class DecisionRecorder:
    """Appends the agent's decisions to ``path`` (rotating at ``max_bytes``); thread-safe.

    A write that fails (disk full, directory gone) is logged once and turns recording off:
    the agent keeps deciding.
    """

    def __init__(self, path: str | Path, max_bytes: int, policy: str, limits: Limits) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.policy = policy
        self.limits = limits
        self._lock = threading.Lock()
        self._fh: Any = None
        self._written = 0
        self.enabled = True
        try:
            self._open()
        except OSError as exc:
            raise ConfigError(
                f"cannot write the decision record {self.path} ({exc})", key="agent.record_file"
            ) from None

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self.path.open("w", encoding="utf-8")
        header = {"format": FORMAT, "policy": self.policy, "limits": self.limits.model_dump()}
        self._written = self._write(header)

    def _write(self, doc: dict[str, Any]) -> int:
        line = json.dumps(doc, separators=(",", ":")) + "\n"
        self._fh.write(line)
        self._fh.flush()
        return len(line)

    def record(self, now: float, view: NodeView, state: object | None, decision: Decision) -> None:
        """One ``decide``: its time, view, state passed in, and the decision."""
        if not self.enabled:
            return
        doc = {
            "now": now,
            "view": encode(view),
            "state": encode(state),
            "offer": encode(decision.offer),
            "evictions": encode(decision.evictions),
            "new_state": encode(decision.state),
        }
        with self._lock:
            try:
                if self._written >= self.max_bytes:
                    self._fh.close()
                    os.replace(self.path, self.path.with_name(self.path.name + ".1"))
                    self._open()
                self._written += self._write(doc)
            except (OSError, TypeError) as exc:
                log.warning("decision record %s: %s; recording stops", self.path, exc)
                self.enabled = False

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None
            self.enabled = False


@dataclass(frozen=True, slots=True)
class Recorded:
    """One recorded decision."""

    line: int
    now: float
    view: NodeView
    state: object | None
    offer: Offer
    evictions: tuple[Eviction, ...]
    new_state: object | None


def read_log(path: str | Path) -> tuple[str, Limits, Iterator[Recorded]]:
    """(policy name, limits, the decisions) of a record file; ValueError naming the line."""
    path = Path(path)
    fh = path.open(encoding="utf-8")
    first = fh.readline()
    try:
        header = json.loads(first)
        if header.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} file")
        policy = str(header["policy"])
        limits = Limits.model_validate(header["limits"])
    except (ValueError, KeyError, AttributeError) as exc:
        fh.close()
        raise ValueError(f"{path}:1: bad header: {exc}") from None

    def decisions() -> Iterator[Recorded]:
        with fh:
            for number, line in enumerate(fh, start=2):
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)
                    yield Recorded(
                        number,
                        float(doc["now"]),
                        decode(doc["view"]),
                        decode(doc["state"]),
                        decode(doc["offer"]),
                        decode(doc["evictions"]),
                        decode(doc["new_state"]),
                    )
                except (ValueError, KeyError, TypeError) as exc:
                    if not line.endswith("\n"):  # the agent was writing it when the file was read
                        return
                    raise ValueError(f"{path}:{number}: bad record: {exc}") from None

    return policy, limits, decisions()


@dataclass(frozen=True, slots=True)
class LogReplay:
    """How a record file replayed: decisions, how many matched, the first mismatches."""

    path: str
    policy: str
    decisions: int
    identical: int
    evictions: int
    mismatches: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def replay_log(path: str | Path, policy: str | None = None, keep: int = 10) -> LogReplay:
    """Decide every recorded view again (``policy``: the recorded one unless given) and
    compare offer, evictions and new state with the agent's."""
    recorded_policy, limits, decisions = read_log(path)
    name = policy or recorded_policy
    if name not in POLICIES:
        raise ValueError(f"{path}: unknown policy {name!r}; known: {', '.join(sorted(POLICIES))}")
    engine = POLICIES[name]()
    count = same = evictions = 0
    mismatches: list[str] = []
    for rec in decisions:
        count += 1
        evictions += len(rec.evictions)
        again = engine.decide(rec.view, limits, rec.now, rec.state)
        diffs = [
            what
            for what, live, replayed in (
                ("offer", rec.offer, again.offer),
                ("evictions", rec.evictions, again.evictions),
                ("state", rec.new_state, again.state),
            )
            if live != replayed
        ]
        if diffs:
            if len(mismatches) < keep:
                mismatches.append(f"line {rec.line} (t={rec.now:.3f}): {', '.join(diffs)} differ")
        else:
            same += 1
    return LogReplay(str(path), name, count, same, evictions, tuple(mismatches))
