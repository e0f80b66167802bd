"""The exported series, as Prometheus would read them from a scrape."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

import colocate.metrics as metrics
from colocate.metrics import (
    ExecutorState,
    LeaseState,
    NodeCollector,
    NodeState,
    render,
)
from colocate.metrics.dashboard import expand, load_dashboard, panel_queries, template_variables
from colocate.metrics.state import snapshot_from_view
from monitors.snapshot import JobSnapshot, NodeSnapshot
from policies.model import JobView, NodeView, Offer, UsageSample
from policies.prices import GIB, Prices

ROOT = Path(__file__).resolve().parents[2]
Sample = tuple[str, dict[str, str], float]


def job(
    job_id: str, t: float, *, cpu_s: float, used: float = 0.5, uid: int | None = 1000
) -> JobSnapshot:
    return JobSnapshot(
        job_id=job_id,
        user="alice",
        cores_allocated=2,
        cpu_ids=(0, 1),
        cores_used=used,
        memory_allocated_bytes=4 * GIB,
        memory_used_bytes=GIB,
        memory_peak_bytes=2 * GIB,
        uid=uid,
        start_time=t - 100.0,
        cpu_seconds_total=cpu_s,
        cpu_pressure=12.5,
        memory_pressure=0.0,
    )


def state(
    t: float,
    *jobs: JobSnapshot,
    leases: tuple[LeaseState, ...] = (),
    executors: tuple[ExecutorState, ...] = (),
) -> NodeState:
    snap = NodeSnapshot(
        node="n1",
        t=t,
        cores_total=4,
        cpu_ids=(0, 1, 2, 3),
        memory_total_bytes=16 * GIB,
        cpu_pressure=30.0,
        memory_pressure=1.0,
        cores_unallocated=4 - 2 * len(jobs),
        memory_unallocated_bytes=16 * GIB - 4 * GIB * len(jobs),
        jobs=jobs,
    )
    return NodeState(
        snap, offer=Offer(frozenset({2, 3}), 6 * GIB), leases=leases, executors=executors
    )


def scrape(registry: CollectorRegistry) -> list[Sample]:
    out: list[Sample] = []
    for family in text_string_to_metric_families(render(registry).decode()):
        out.extend((s.name, dict(s.labels), s.value) for s in family.samples)
    return out


def value(samples: Iterable[Sample], name: str, **labels: str) -> float:
    found = [
        v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items())
    ]
    assert len(found) == 1, f"{name}{labels}: {len(found)} series"
    return found[0]


def names(samples: Iterable[Sample]) -> set[str]:
    return {n for n, _, _ in samples}


@pytest.fixture
def fed() -> tuple[CollectorRegistry, NodeCollector]:
    registry = CollectorRegistry()
    collector = NodeCollector(Prices(), registry=registry)
    lease = LeaseState("L1", cores=1, memory_bytes=GIB)
    for i in range(11):
        t = 1000.0 + i
        collector.update(
            state(
                t,
                job("7", t, cpu_s=50.0 + 0.5 * i),
                leases=(lease,),
                executors=(ExecutorState("e1", "L1", "busy", 0.8, GIB // 2),),
            )
        )
    return registry, collector


def test_node_states_add_up(fed: tuple[CollectorRegistry, NodeCollector]) -> None:
    s = scrape(fed[0])
    cores = {st: value(s, "colocate_node_cores", node="n1", state=st) for st in metrics.NODE_STATES}
    assert cores["allocated"] == pytest.approx(cores["used_by_jobs"] + cores["idle_allocated"])
    assert cores["total"] == pytest.approx(cores["allocated"] + cores["unallocated"])
    assert (cores["offered"], cores["leased"]) == (2, 1)
    assert cores["used_by_functions"] == pytest.approx(0.8)
    mem = {
        st: value(s, "colocate_node_memory_bytes", node="n1", state=st)
        for st in metrics.NODE_STATES
    }
    assert mem["allocated"] == mem["used_by_jobs"] + mem["idle_allocated"]
    assert mem["leased"] == GIB


def test_job_series_follow_jobstats_and_vanish_with_the_job(
    fed: tuple[CollectorRegistry, NodeCollector],
) -> None:
    registry, collector = fed
    s = scrape(registry)
    cpu_s = value(s, "colocate_job_cpu_seconds_total", job_id="7")
    elapsed = value(s, "colocate_job_elapsed_seconds", job_id="7")
    assert value(s, "colocate_job_cpu_efficiency_ratio", job_id="7") == pytest.approx(
        cpu_s / (elapsed * 2)
    )
    assert value(s, "colocate_job_memory_efficiency_ratio", job_id="7") == pytest.approx(0.5)
    assert value(s, "colocate_job_uid", job_id="7") == 1000  # uid is a value, not a label
    assert all("uid" not in labels for _, labels, _ in s)
    assert value(s, "colocate_job_cpu_pressure_ratio", job_id="7") == pytest.approx(0.125)
    # 10 s of 2 allocated cores, 0.5 CPU-s/s used: 15 idle core-seconds.
    assert value(s, "colocate_job_idle_core_seconds_total", job_id="7") == pytest.approx(15.0)
    assert value(
        s, "colocate_job_wasted_cost_total", job_id="7", resource="cores"
    ) == pytest.approx(15 / 3600 * 0.015)
    collector.update(state(1011.0))
    after = scrape(registry)
    assert not [n for n, labels, _ in after if labels.get("job_id") == "7"]
    assert value(after, "colocate_wasted_core_seconds_total", state="idle_allocated") >= 15.0


def test_money_prices_and_currency(fed: tuple[CollectorRegistry, NodeCollector]) -> None:
    s = scrape(fed[0])
    assert value(s, "colocate_price_info", currency="EUR", charging="resources") == 1
    assert value(s, "colocate_price_per_core_second") * 3600 == pytest.approx(0.015)
    assert value(s, "colocate_price_per_byte_second") * 3600 * GIB == pytest.approx(0.0015)
    assert value(s, "colocate_recovered_cost_total", resource="cores") == pytest.approx(
        10 / 3600 * 0.015
    )
    # 2 unallocated cores for 10 s
    assert value(
        s, "colocate_wasted_cost_total", resource="cores", state="unallocated"
    ) == pytest.approx(20 / 3600 * 0.015)


def test_unknown_states_and_reasons_cannot_grow_the_series(
    fed: tuple[CollectorRegistry, NodeCollector],
) -> None:
    registry, collector = fed
    before = len(scrape(registry))
    collector.update(
        state(
            2000.0,
            job("7", 2000.0, cpu_s=600.0),
            leases=(LeaseState("L9", 1, 0, state="zombie-17"),),
        )
    )
    events = collector.events("n1")
    events.record_eviction("cosmic_ray", 0.01)
    events.record_invocation("weird", 0.001)
    s = scrape(registry)
    assert len(s) == before
    assert value(s, "colocate_leases", state="other") == 1
    assert value(s, "colocate_evictions_total", reason="other") == 1
    assert value(s, "colocate_invocations_total", result="other") == 1


def test_histograms_count_every_observation() -> None:
    registry = CollectorRegistry()
    collector = NodeCollector(Prices(), registry=registry)
    events = collector.events("n1")
    durations = [0.00005, 0.0003, 0.002, 0.2, 99.0]
    for d in durations:
        events.record_invocation("ok", d)
    s = scrape(registry)
    assert value(s, "colocate_invocation_duration_seconds_count", node="n1") == len(durations)
    assert value(s, "colocate_invocation_duration_seconds_sum", node="n1") == pytest.approx(
        sum(durations)
    )
    assert value(s, "colocate_invocation_duration_seconds_bucket", node="n1", le="0.001") == 2
    assert value(s, "colocate_invocation_duration_seconds_bucket", node="n1", le="+Inf") == len(
        durations
    )


def test_the_global_registry_is_never_touched() -> None:
    NodeCollector(Prices(), registry=CollectorRegistry()).update(state(1.0))
    assert not [n for n in REGISTRY._names_to_collectors if n.startswith("colocate_")]


def test_names_follow_prometheus_conventions(fed: tuple[CollectorRegistry, NodeCollector]) -> None:
    text = render(fed[0]).decode()
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    for name, kind in types.items():
        assert name.startswith("colocate_")
        assert (kind == "counter") == name.endswith("_total"), name
        assert not re.search(
            r"(milli|micro|kilo|mega|giga)|_(ms|sec|kb|mb|gb|percent)(_|$)", name
        ), name


def test_a_policy_view_becomes_a_snapshot_the_collector_can_read() -> None:
    view = NodeView(
        node="n2",
        cpu_ids=frozenset(range(4)),
        memory_total_bytes=16 * GIB,
        memory_reserved_bytes=GIB,
        jobs=(
            JobView(
                "9",
                frozenset({0, 1}),
                4 * GIB,
                2 * GIB,
                (UsageSample(5.0, 1.25, GIB),),
                start_time=1.0,
            ),
        ),
    )
    snap = snapshot_from_view(view, now=5.0)
    assert (snap.cores_unallocated, snap.memory_unallocated_bytes) == (2, 11 * GIB)
    assert snap.jobs[0].cores_idle == pytest.approx(0.75)
    registry = CollectorRegistry()
    NodeCollector(Prices(), registry=registry).update(NodeState(snap))
    assert value(
        scrape(registry), "colocate_node_cores", node="n2", state="idle_allocated"
    ) == pytest.approx(0.75)


def test_every_dashboard_query_uses_only_exported_metrics(
    fed: tuple[CollectorRegistry, NodeCollector],
) -> None:
    registry, collector = fed
    collector.events("n1").record_invocation("ok", 0.001)
    exported = names(scrape(registry))
    dashboard = load_dashboard(ROOT / "deploy" / "grafana" / "colocate.json")
    queries = panel_queries(dashboard)
    assert len({q.panel for q in queries}) >= 15
    variables = set(template_variables(dashboard))
    for q in queries:
        used = set(re.findall(r"\bcolocate_[a-z_]+\b", q.expr))
        assert used, q
        assert used <= exported, f"{q.panel}: {used - exported}"
        for var in re.findall(r"\$(\w+)", q.expr):
            assert var in variables or var.startswith("__"), f"{q.panel}: undefined ${var}"
        assert "$" not in expand(q.expr)


def test_alert_rules_use_only_exported_metrics(
    fed: tuple[CollectorRegistry, NodeCollector],
) -> None:
    exported = names(scrape(fed[0]))
    rules = (ROOT / "deploy" / "prometheus" / "colocate-rules.yml").read_text()
    used = {m for m in re.findall(r"\bcolocate_[a-z_]+\b", rules)} - {"colocate_"}
    assert used and used <= exported, used - exported


def test_executor_counts_from_another_process_add_up() -> None:
    from colocate.metrics.events import INVOCATION_BUCKETS_S, LatencyHistogram

    registry = CollectorRegistry()
    collector = NodeCollector(Prices(), registry=registry)
    worker = LatencyHistogram(INVOCATION_BUCKETS_S)  # what an executor process keeps
    for d in (0.0002, 0.003, 7.0):
        worker.observe(d)
    events = collector.events("n1")
    events.record_invocation("ok", 0.0002)
    events.add_invocations({"ok": 2, "error": 1}, worker.counts())
    s = scrape(registry)
    assert value(s, "colocate_invocations_total", result="ok") == 3
    assert value(s, "colocate_invocation_duration_seconds_count") == 4
    assert value(s, "colocate_invocation_duration_seconds_bucket", le="0.00025") == 2
    assert value(s, "colocate_invocation_duration_seconds_bucket", le="5.0") == 3
    with pytest.raises(ValueError, match="bounds"):
        events.add_invocations({"ok": 1}, LatencyHistogram([1.0]).counts())


def test_public_api_is_locked() -> None:
    assert sorted(metrics.__all__) == sorted(
        [
            "AgentMetrics",
            "BrokerCollector",
            "CostAccount",
            "EXECUTOR_STATES",
            "ExecutorMeter",
            "ExecutorState",
            "InvocationResult",
            "LEASE_STATES",
            "LeaseState",
            "MetricsServer",
            "NODE_STATES",
            "NodeCollector",
            "NodeEvents",
            "NodeState",
            "cpu_efficiency",
            "memory_efficiency",
            "parse_listen",
            "render",
            "serve_metrics",
        ]
    )


def test_dashboard_layout_is_importable() -> None:
    dashboard = load_dashboard(ROOT / "deploy" / "grafana" / "colocate.json")
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    boxes = []
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24, p["title"]
        boxes.append((g["x"], g["y"], g["x"] + g["w"], g["y"] + g["h"], p["title"]))
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}", p["title"]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            overlap = a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
            assert not overlap, f"{a[4]} overlaps {b[4]}"
    assert {"datasource", "node", "job_id", "policy"} <= set(template_variables(dashboard))
    assert [p["title"] for p in panels if p["type"] == "row"] == ["Cluster overview", "Node", "Job"]


def test_an_executor_tally_reaches_the_node_counters_through_json() -> None:
    import json

    from colocate.metrics.events import InvocationTally

    registry = CollectorRegistry()
    events = NodeCollector(Prices(), registry=registry).events("n1")
    tally = InvocationTally()  # in the worker process
    for result, d in (("ok", 0.0001), ("ok", 0.002), ("error", 0.5)):
        tally.record(result, d)
    wire = json.loads(json.dumps(tally.drain()))  # as it crosses to the agent
    events.add_invocations(*InvocationTally.from_json(wire))
    events.add_invocations(
        *InvocationTally.from_json(json.loads(json.dumps(tally.drain())))
    )  # empty drain
    s = scrape(registry)
    assert value(s, "colocate_invocations_total", result="ok") == 2
    assert value(s, "colocate_invocations_total", result="error") == 1
    assert value(s, "colocate_invocation_duration_seconds_count") == 3
    assert value(s, "colocate_invocation_duration_seconds_sum") == pytest.approx(0.5021)
    with pytest.raises(ValueError, match="tally"):
        InvocationTally.from_json({"results": {"ok": -1}, "buckets": [], "count": 0, "sum": 0})
