"""One end-reason enum from the agent through to metrics: every way a lease ends is counted
under its own name, never as "other"."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from colocate.metrics.events import EVICTION_REASONS, NodeEvents
from policies.model import EvictionReason

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("reason", list(EvictionReason))
def test_every_end_reason_is_counted_under_its_own_name(reason: EvictionReason) -> None:
    events = NodeEvents()
    events.record_eviction(reason, 0.01)
    counts = events.counts().evictions
    assert counts[reason.value] == 1
    assert counts["other"] == 0


def test_agent_side_reasons_are_in_the_enum() -> None:
    for name in ("executor_lost", "agent_stopped", "revoked", "released"):
        assert EvictionReason(name).value in EVICTION_REASONS


def test_the_agent_names_end_reasons_by_the_enum_not_by_strings() -> None:
    """A string literal passed to ``revoke`` would bypass the enum (and be counted as
    "other" when it drifts from it)."""
    offences = []
    for path in sorted((ROOT / "slurm_plugin" / "agent").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "revoke"
            ):
                continue
            args = [*node.args[2:], *(k.value for k in node.keywords if k.arg == "reason")]
            if any(isinstance(a, ast.Constant) and isinstance(a.value, str) for a in args):
                offences.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offences, offences
