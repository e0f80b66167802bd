"""The agent's decision record (slurm_plugin.agent.recorder): values survive the JSON round
trip unchanged, the file rotates, and replaying a record reproduces its decisions (and
catches a decision the policy would not make)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from policies import POLICIES
from policies.limits import Limits
from policies.model import JobView, LeaseView, NodeView, UsageSample
from slurm_plugin.agent.recorder import DecisionRecorder, decode, encode, read_log, replay_log

GIB = 1024**3


def view_at(t: float, busy: float, lease: LeaseView | None) -> NodeView:
    """A 6-core node with one 4-core job whose use follows ``busy`` over the last samples."""
    history = tuple(
        UsageSample(t - 5 + i, busy if i > 2 else 1.0, (1 + i % 2) * GIB // 2, 0.5, None)
        for i in range(6)
    )
    job = JobView("42", frozenset({0, 1, 2, 3}), 4 * GIB, GIB, history, True, 0.0)
    return NodeView("n1", frozenset(range(6)), 8 * GIB, (job,), (lease,) if lease else (), GIB)


def record_run(path: Path, policy: str, steps: int = 30, max_bytes: int = 1 << 30) -> Path:
    limits = Limits(min_history_s=1.0)
    recorder = DecisionRecorder(path, max_bytes, policy, limits)
    engine = POLICIES[policy]()
    state: object | None = None
    lease: LeaseView | None = None
    for i in range(steps):
        now = 100.0 + i
        busy = 3.5 if 10 <= i < 14 else 1.0  # the job grows into its lent cores for a while
        view = view_at(now, busy, lease)
        decision = engine.decide(view, limits, now, state)
        recorder.record(now, view, state, decision)
        state = decision.state
        if lease is not None and any(e.lease_id == lease.lease_id for e in decision.evictions):
            lease = None
        if lease is None and len(decision.offer.cpu_ids) >= 2:
            ids = frozenset(sorted(decision.offer.cpu_ids)[:2])  # inside the job when lent
            lease = LeaseView(f"l{i}", ids, GIB // 4, now, math.inf)
    recorder.close()
    return path


def test_values_round_trip_equal() -> None:
    view = view_at(10.0, 2.0, LeaseView("l1", frozenset({3}), GIB, 1.0, math.inf))
    again = decode(json.loads(json.dumps(encode(view))))
    assert again == view
    assert isinstance(again.cpu_ids, frozenset) and isinstance(again.jobs[0].history, tuple)
    assert again.leases[0].expires_at == math.inf


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_a_recorded_run_replays_identically(tmp_path: Path, policy: str) -> None:
    path = record_run(tmp_path / "decisions.jsonl", policy)
    result = replay_log(path)
    assert result.policy == policy
    assert result.decisions == 30
    assert result.identical == 30, result.mismatches
    _, _, records = read_log(path)
    assert any(r.view.leases for r in records)  # leases were held while deciding


def test_growth_evictions_are_recorded_and_replayed(tmp_path: Path) -> None:
    result = replay_log(record_run(tmp_path / "d.jsonl", "headroom"))
    assert result.evictions >= 1
    assert result.identical == result.decisions


def test_a_decision_the_policy_would_not_make_is_reported(tmp_path: Path) -> None:
    path = record_run(tmp_path / "d.jsonl", "headroom")
    lines = path.read_text().splitlines()
    doc = json.loads(lines[5])
    doc["offer"] = encode(decode(doc["offer"]).__class__(frozenset({0, 1, 2, 3}), 7))
    lines[5] = json.dumps(doc)
    path.write_text("\n".join(lines) + "\n")
    result = replay_log(path)
    assert result.identical == result.decisions - 1
    assert result.mismatches == ("line 6 (t=104.000): offer differ",)


def test_the_record_rotates_and_stays_bounded(tmp_path: Path) -> None:
    path = record_run(tmp_path / "d.jsonl", "headroom", steps=60, max_bytes=20_000)
    old = path.with_name("d.jsonl.1")
    assert old.exists()
    assert path.stat().st_size < 20_000 + 10_000 and old.stat().st_size < 20_000 + 10_000
    # each file starts with its header and replays on its own
    for part in (path, old):
        result = replay_log(part)
        assert result.decisions > 0 and result.identical == result.decisions


def test_a_line_cut_by_a_running_agent_is_ignored(tmp_path: Path) -> None:
    path = record_run(tmp_path / "d.jsonl", "unallocated", steps=5)
    text = path.read_text()
    path.write_text(text + text.splitlines()[1][:40])
    assert replay_log(path).decisions == 5


def test_cli_replays_a_record_and_names_a_bad_file_in_one_line(tmp_path: Path) -> None:
    path = record_run(tmp_path / "d.jsonl", "predictive", steps=8)
    cli = [sys.executable, "-m", "colocate", "replay", "--from-agent-log"]
    ok = subprocess.run([*cli, str(path), "--json"], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["identical"] == 8
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    out = subprocess.run([*cli, str(bad)], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    assert f"{bad}:1: bad header" in out.stderr
