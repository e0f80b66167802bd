"""A replayed history written as OpenMetrics: parseable, cumulative, in the live names."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from colocate.errors import TraceFormatError
from colocate.metrics.openmetrics import ReplaySample, write_openmetrics
from colocate.metrics.replay_adapter import auto_step_s, replay_samples
from colocate.metrics.replay_series import (
    ReplaySeries,
    load_replay_series,
    save_replay_series,
    series_to_json,
)
from policies.prices import Prices


def samples(n: int, t0: float = 1_600_000_000.0) -> list[ReplaySample]:
    return [
        ReplaySample(
            t=t0 + 300 * i,
            cores={"total": 64, "idle_allocated": 10 + i % 3, "leased": 4},
            memory_bytes={"total": 2**38, "idle_allocated": 2**36},
            wasted_cost={("cores", "idle_allocated"): 0.05, ("cores", "unallocated"): 0.01},
            recovered_cost={"cores": 0.02},
            evictions={"pressure": i % 2, "cosmic": 1},
            invocations={"ok": 10},
            leases=4,
        )
        for i in range(n)
    ]


def parse(text: str) -> dict[str, list[tuple[dict[str, str], float, float]]]:
    out: dict[str, list[tuple[dict[str, str], float, float]]] = {}
    for family in text_string_to_metric_families(text):  # type: ignore[no-untyped-call]
        for s in family.samples:
            assert s.timestamp is not None
            out.setdefault(s.name, []).append((dict(s.labels), s.value, float(s.timestamp)))
    return out


def test_counters_accumulate_per_policy_and_gauges_keep_their_values() -> None:
    buf = io.StringIO()
    write_openmetrics({"headroom": samples(12), "unallocated": samples(12)}, buf)
    text = buf.getvalue()
    assert text.endswith("# EOF\n")
    parsed = parse(text)  # the reference parser rejects malformed OpenMetrics
    wasted = [
        v
        for labels, v, _ in parsed["colocate_wasted_cost_total"]
        if labels
        == {"node": "replay", "policy": "headroom", "resource": "cores", "state": "idle_allocated"}
    ]
    assert wasted == pytest.approx([0.05 * (i + 1) for i in range(12)])
    other = [
        v
        for labels, v, _ in parsed["colocate_evictions_total"]
        if labels["reason"] == "other" and labels["policy"] == "headroom"
    ]
    assert other[-1] == 12  # unknown reasons are folded into 'other'
    idle = [
        v
        for labels, v, _ in parsed["colocate_node_cores"]
        if labels["state"] == "idle_allocated" and labels["policy"] == "unallocated"
    ]
    assert idle == [10 + i % 3 for i in range(12)]
    assert parsed["colocate_price_info"][0][0]["currency"] == "EUR"


def test_time_shift_moves_every_timestamp_and_stale_samples_are_dropped() -> None:
    s = samples(3)
    s.insert(2, ReplaySample(t=s[0].t))  # out of order: must be dropped
    buf = io.StringIO()
    write_openmetrics({"p": s}, buf, time_shift_s=1000.0)
    stamps = sorted({t for _, _, t in parse(buf.getvalue())["colocate_node_cores"]})
    assert stamps == [x.t + 1000.0 for x in samples(3)]


def test_cli_writes_openmetrics_from_a_series_file(tmp_path: Path) -> None:
    path = tmp_path / "metrics-series.json"
    path.write_text(
        json.dumps(
            series_to_json(ReplaySeries("daint", "CHF", "resources", {"headroom": samples(5)}))
        )
    )
    assert (
        load_replay_series(path).policies["headroom"][0].wasted_cost[("cores", "unallocated")]
        == 0.01
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "colocate",
            "metrics",
            "openmetrics",
            "--replay-out",
            str(tmp_path),
            "--end-at",
            "2000000000",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    parsed = parse(proc.stdout)
    assert max(t for _, _, t in parsed["colocate_node_cores"]) == 2_000_000_000
    assert parsed["colocate_price_info"][0][0] == {
        "node": "daint",
        "policy": "headroom",
        "charging": "resources",
        "currency": "CHF",
    }


@pytest.mark.parametrize(
    ("content", "field"),
    [
        ("not json", None),
        ('{"format": "something-else"}', "format"),
        (
            '{"format": "colocate-replay-series/1", "policies": {"p": [{"t": "x"}]}}',
            "policies.p[0].t",
        ),
        (
            '{"format": "colocate-replay-series/1", "policies": {"p": [{"t": 1, "wasted_cost": {"cores": 1}}]}}',
            "policies.p[0].wasted_cost",
        ),
    ],
)
def test_a_bad_series_file_is_a_clear_one_line_error(
    tmp_path: Path, content: str, field: str | None
) -> None:
    path = tmp_path / "s.json"
    path.write_text(content)
    with pytest.raises(TraceFormatError) as err:
        load_replay_series(path)
    assert err.value.field == field
    proc = subprocess.run(
        [sys.executable, "-m", "colocate", "metrics", "openmetrics", "--from-replay", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and str(path) in proc.stderr


@dataclass
class _Cluster:
    nodes: int = 2
    cores_per_node: int = 4
    memory_per_node_bytes: int = 8 * 2**30
    memory_reserved_bytes: int = 0


@dataclass
class _Policy:
    offered_cores: np.ndarray
    offered_memory_bytes: np.ndarray
    harvested_cores: np.ndarray
    harvested_memory_bytes: np.ndarray
    recovered_cost: np.ndarray
    invocations_served: np.ndarray
    evictions: np.ndarray
    cold_starts: np.ndarray


@dataclass
class _Result:
    """The shape of traces.replay.ReplayResult (minute series), small enough to check by hand."""

    t: np.ndarray
    step_s: float
    cluster: _Cluster
    allocated_cores: np.ndarray
    used_cores: np.ndarray
    allocated_memory_bytes: np.ndarray
    used_memory_bytes: np.ndarray
    wasted_idle_cost: np.ndarray
    wasted_unallocated_cost: np.ndarray
    policies: dict[str, _Policy]


def _result(minutes: int) -> _Result:
    ones = np.ones(minutes)
    return _Result(
        t=1_600_000_000.0 + 60.0 * np.arange(minutes),
        step_s=60.0,
        cluster=_Cluster(),
        allocated_cores=6 * ones,
        used_cores=2 * ones,
        allocated_memory_bytes=12 * 2**30 * ones,
        used_memory_bytes=3 * 2**30 * ones,
        wasted_idle_cost=np.zeros(minutes),  # not used with resource charging
        wasted_unallocated_cost=np.zeros(minutes),
        policies={
            "headroom": _Policy(
                3 * ones,
                2**30 * ones,
                2 * ones,
                2**29 * ones,
                np.zeros(minutes),
                100 * ones,
                (np.arange(minutes) % 10 == 0) * 1.0,
                0.5 * ones,
            )
        },
    )


def test_a_replay_result_becomes_samples_with_money_at_the_given_prices() -> None:
    prices = Prices()
    samples = replay_samples(_result(120), prices, step_s=600)  # 2 h of minutes, 10-minute samples
    s = samples["headroom"]
    assert len(s) == 12 and s[0].t == 1_600_000_000.0 + 600
    assert s[0].cores["idle_allocated"] == 4 and s[0].cores["unallocated"] == 2
    assert s[0].memory_bytes["idle_allocated"] == 9 * 2**30
    # 10 minutes of 4 idle cores at 0.015 per core-hour; of 2 harvested cores likewise.
    assert s[0].wasted_cost[("cores", "idle_allocated")] == pytest.approx(4 * 600 / 3600 * 0.015)
    assert s[0].recovered_cost["cores"] == pytest.approx(2 * 600 / 3600 * 0.015)
    assert sum(x.evictions["other"] for x in s) == 12
    assert s[0].invocations["ok"] == 1000
    assert auto_step_s(_result(5000)) == 180.0  # at most 2000 points


def test_save_replay_series_round_trips(tmp_path: Path) -> None:
    path = save_replay_series(_result(30), Prices(), tmp_path, node="hpc2n")
    loaded = load_replay_series(path)
    assert loaded.node == "hpc2n" and list(loaded.policies) == ["headroom"]
    assert loaded.policies["headroom"] == replay_samples(_result(30), Prices())["headroom"]
