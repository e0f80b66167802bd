"""The replay: money identities, hand-computed scenarios, determinism and the report contract."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from policies import POLICIES
from policies.limits import Limits
from policies.prices import GIB, Prices
from traces import bundled
from traces.azure import FaasTrace, read_azure2019
from traces.placement import Cluster
from traces.replay import ReplayResult, replay
from traces.report import report_dict
from traces.swf import read_swf
from traces.usage import UsageModel

MIB = 1024**2
FLAT = UsageModel(time_shapes="flat")  # hand-computed scenarios: constant use
CONTRACT = {
    "recovered_core_hours",
    "recovered_memory_gib_hours",
    "wasted_cost",
    "recovered_cost",
    "faas_invocations_total",
    "faas_invocations_served",
    "faas_invocations_rejected",
    "evictions",
    "interference_violation_hours",
    "replay_seconds",
}


def swf(tmp_path: Path, rows: list[tuple[int, int, int, int, float, int]]) -> Path:
    """SWF lines from (id, start s, run s, cores, cpu time per core s, used KB per core)."""
    body = "\n".join(
        f"{i} {start} 0 {run} {cores} {cpu} {mem} {cores} {run} -1 1 1 1 -1 1 1 -1 -1"
        for i, start, run, cores, cpu, mem in rows
    )
    path = tmp_path / "jobs.swf"
    path.write_text("; UnixStartTime: 1000020\n; MaxNodes: 1\n; MaxProcs: 8\n" + body + "\n")
    return path


def faas(per_minute: int, duration_s: float, memory_bytes: float) -> FaasTrace:
    return FaasTrace(
        path="synthetic",
        format="azure2019",
        function_ids=("f",),
        invocations=np.array([[per_minute]], dtype=np.int64),
        duration_s=np.array([duration_s]),
        memory_bytes=np.array([memory_bytes]),
    )


@pytest.fixture(scope="module")
def bundled_result() -> ReplayResult:
    return replay(
        read_swf(bundled.HPC2N_EXCERPT),
        read_azure2019(bundled.AZURE2019),
        Cluster(bundled.HPC2N_NODES, bundled.HPC2N_CORES_PER_NODE, bundled.HPC2N_MEMORY_PER_NODE),
        seed=11,
    )


def test_every_registered_policy_is_replayed(bundled_result: ReplayResult) -> None:
    assert set(bundled_result.policies) == set(POLICIES)
    for series in bundled_result.policies.values():
        assert set(series.summary) >= CONTRACT
        assert series.offered_cores.shape == bundled_result.t.shape


def test_recovered_never_exceeds_wasted(bundled_result: ReplayResult) -> None:
    r = bundled_result
    wasted_cores = r.cluster.cores - r.used_cores
    for name, s in r.policies.items():
        assert np.all(s.harvested_cores <= s.offered_cores + 1e-6), name
        # A job that grows into lent cores gets them back once the next sample confirms the
        # growth (a minute later in the replay): only those minutes may offer a busy core.
        over = np.maximum(s.offered_cores - wasted_cores, 0.0)
        assert over.sum() <= 0.02 * s.offered_cores.sum(), name
        assert np.all(s.recovered_cost <= r.wasted_cost + 1e-9), name
        assert s.summary["recovered_cost"] <= s.summary["wasted_cost"]
        served, rejected = (
            s.summary["faas_invocations_served"],
            s.summary["faas_invocations_rejected"],
        )
        assert served + rejected == pytest.approx(s.summary["faas_invocations_total"])


def test_lending_inside_jobs_offers_at_least_what_is_unallocated(
    bundled_result: ReplayResult,
) -> None:
    plain = bundled_result.policies["unallocated"].summary
    for name in ("headroom", "predictive"):
        if name not in bundled_result.policies:
            continue
        s = bundled_result.policies[name].summary
        assert s["offered_memory_gib_hours"] > plain["offered_memory_gib_hours"]
        assert s["offered_core_hours"] >= plain["offered_core_hours"]
        assert s["recovered_cost"] >= plain["recovered_cost"]


def test_same_seed_same_figures() -> None:
    args = (
        read_swf(bundled.HPC2N_EXCERPT).head(400),
        read_azure2019(bundled.AZURE2019),
        Cluster(bundled.HPC2N_NODES, bundled.HPC2N_CORES_PER_NODE, bundled.HPC2N_MEMORY_PER_NODE),
        ["unallocated"],
    )
    a, b = replay(*args, seed=4), replay(*args, seed=4)
    for name in a.policies:
        sa = {k: v for k, v in a.policies[name].summary.items() if k != "replay_seconds"}
        sb = {k: v for k, v in b.policies[name].summary.items() if k != "replay_seconds"}
        assert sa == sb


def test_one_job_one_node_by_hand(tmp_path: Path) -> None:
    """4 of 8 cores busy for 10 h, 2 GiB used of 8 GiB; functions want 2 cores, 200 MiB."""
    jobs = read_swf(swf(tmp_path, [(1, 0, 36000, 4, 36000.0, 512 * 1024)]))
    result = replay(
        jobs,
        faas(120, 1.0, 100 * MIB),
        Cluster(1, 8, 16 * GIB),
        ["unallocated"],
        limits=Limits(guard=False),
        usage=UsageModel(ramp_max_s=1800, time_shapes="flat"),
    )
    s = result.policies["unallocated"].summary
    minutes = 601  # minutes 0..600; the job ends at minute 600
    hours = minutes / 60
    assert s["recovered_core_hours"] == pytest.approx(2 * hours)
    assert s["recovered_memory_gib_hours"] == pytest.approx(200 / 1024 * hours)
    assert s["recovered_cost"] == pytest.approx(2 * hours * 0.015 + 200 / 1024 * hours * 0.0015)
    assert s["faas_invocations_served"] == s["faas_invocations_total"] == 120 * minutes
    assert s["evictions"] == 0
    assert result.policies["unallocated"].offered_cores[:600].tolist() == [4.0] * 600
    # wasted: 4 unallocated cores and 8 GiB for 600 min, all 8 cores and 16 GiB in minute 600;
    # inside the job, memory idle is 8 - 1 GiB during the 30-min start-up, 8 - 2 GiB after
    unallocated = (4 * 600 + 8) / 60 * 0.015 + (8 * 600 + 16) / 60 * 0.0015
    idle_inside = (7 * 30 + 6 * 570) / 60 * 0.0015
    assert s["wasted_cost"] == pytest.approx(unallocated + idle_inside)


def test_headroom_lends_the_memory_a_busy_job_does_not_use(tmp_path: Path) -> None:
    if "headroom" not in POLICIES:
        pytest.skip("headroom policy not registered")
    jobs = read_swf(swf(tmp_path, [(1, 0, 36000, 4, 36000.0, 512 * 1024)]))
    result = replay(
        jobs,
        faas(0, 1.0, MIB),
        Cluster(1, 8, 16 * GIB),
        ["unallocated", "headroom"],
        usage=FLAT,
        limits=Limits(guard=False),
    )
    plain = result.policies["unallocated"].offered_memory_bytes[100]
    lent = result.policies["headroom"].offered_memory_bytes[100] - plain
    # 8 GiB allocated, 2 GiB used, margin max(256 MiB, 10 % of 8 GiB)
    assert lent == pytest.approx(8 * GIB - 2 * GIB - 0.8 * GIB, rel=1e-6)
    assert result.policies["headroom"].offered_cores[100] == 4  # busy cores are not lent


def test_a_job_taking_leased_cores_evicts_the_lease(tmp_path: Path) -> None:
    jobs = read_swf(
        swf(tmp_path, [(1, 0, 3600, 1, 3600.0, 1024), (2, 7200, 3600, 2, 3600.0, 1024)])
    )
    result = replay(
        jobs,
        faas(600, 1.0, MIB),
        Cluster(1, 2, 4 * GIB),
        ["unallocated"],
        usage=FLAT,
        limits=Limits(guard=False),
    )
    s = result.policies["unallocated"].summary
    assert s["evictions"] == 1  # job 2 starts on the cores functions held since job 1 ended
    assert s["evicted_function_cores"] == 2
    assert result.policies["unallocated"].evictions[120] == 1


def test_report_json_contract(bundled_result: ReplayResult) -> None:
    from policies.limits import Limits as L
    from traces.interference import InterferenceModel

    report = report_dict(
        bundled_result,
        jobs_path="jobs",
        jobs_format="swf",
        faas_path="faas",
        faas_format="azure2019",
        prices=Prices(),
        limits=L(),
        usage=FLAT,
        interference=InterferenceModel(),
    )
    assert {"cluster", "jobs_trace", "faas_trace", "policies"} <= set(report)
    for summary in report["policies"].values():
        assert set(summary) >= CONTRACT
    mm = report["measured_vs_modelled"]
    assert (
        mm["cpu_use_measured_jobs"] + mm["cpu_use_modelled_jobs"]
        == report["jobs_trace"]["jobs_placed"]
    )
    assert any("repeated" in a for a in report["assumptions"])


def test_node_charging_bills_the_larger_share_of_a_node(tmp_path: Path) -> None:
    jobs = read_swf(swf(tmp_path, [(1, 0, 36000, 4, 36000.0, 512 * 1024)]))
    prices = Prices(charging="node", node_hour=1.0)
    result = replay(
        jobs,
        faas(120, 1.0, 100 * MIB),
        Cluster(1, 8, 16 * GIB),
        ["unallocated"],
        usage=FLAT,
        limits=Limits(guard=False),
        prices=prices,
    )
    s = result.policies["unallocated"].summary
    assert s["recovered_cost"] == pytest.approx(
        2 / 8 * 601 / 60
    )  # 2 of 8 cores > 200 MiB of 16 GiB
    assert s["recovered_cost"] <= s["wasted_cost"]


def test_azure2021_records_replay_end_to_end(tmp_path: Path) -> None:
    from traces.azure import read_azure2021

    records = tmp_path / "a21.csv"
    rows = [f"app,f{i % 3},{60.0 * i + 30},{5.0 + i % 7}" for i in range(120)]
    records.write_text("app,func,end_timestamp,duration\n" + "\n".join(rows) + "\n")
    jobs = read_swf(swf(tmp_path, [(1, 0, 7200, 2, 7200.0, 1024)]))
    result = replay(
        jobs, read_azure2021(records), Cluster(1, 8, 16 * GIB), ["unallocated"], usage=FLAT
    )
    s = result.policies["unallocated"].summary
    assert s["faas_invocations_total"] == pytest.approx(121)  # 120 records, tiled over 121 minutes
    assert s["faas_invocations_served"] == pytest.approx(s["faas_invocations_total"])


def test_the_guard_gets_ticks_to_act_on_pressure(tmp_path: Path) -> None:
    """Functions on a job's idle core slow it down: with a low pressure limit the guard takes
    the lease back after its grace period and keeps the core for the job during its cooldown,
    so the job spends far less time above its slowdown budget."""
    from traces.interference import InterferenceModel

    if "headroom" not in POLICIES:
        pytest.skip("headroom policy not registered")
    # 4 cores allocated, 2 busy: headroom lends 1 core (2 + 0.25 margin rounds up to 3)
    jobs = read_swf(swf(tmp_path, [(1, 0, 36000, 4, 18000.0, 1024)]))
    sensitive = InterferenceModel(memory_bound_fraction=1.0, memory_bound_range=(0.2, 0.2))
    runs = {}
    for guard in (False, True):
        limits = Limits(
            guard=guard, cpu_pressure_limit=5.0, pressure_grace_s=5.0, reoffer_cooldown_s=600.0
        )
        result = replay(
            jobs,
            faas(6000, 1.0, MIB),
            Cluster(1, 4, 4 * GIB),
            ["headroom"],
            usage=FLAT,
            limits=limits,
            interference=sensitive,
        )
        runs[guard] = result.policies["headroom"].summary
    # without the guard: functions on 1 of 4 cores from minute 1 on, 0.2 x 0.25 / 0.5 = 10 %
    assert runs[False]["interference_violation_hours"] == pytest.approx(10.0 - 1 / 60, abs=0.05)
    assert runs[False]["evictions"] == 0
    assert runs[True]["evictions"] >= 10  # evicted, cooled down, re-offered, evicted again
    assert (
        runs[True]["interference_violation_hours"]
        < 0.5 * runs[False]["interference_violation_hours"]
    )
    assert runs[True]["decisions"] > runs[False]["decisions"]  # the ticks it needed


def _faults_to_fill_twice(megabytes: int) -> int:
    """Minor page faults of filling a fresh ``megabytes`` array after freeing one as large."""
    import resource

    np.ones(megabytes << 17).sum()  # allocated, touched, freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    np.ones(megabytes << 17).sum()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(
    not hasattr(__import__("ctypes").CDLL(None), "mallopt"), reason="glibc's mallopt only"
)
def test_heap_kept_reuses_freed_blocks_without_page_faults() -> None:
    """The replay's big numpy temporaries: under ``heap_kept`` a freed 64 MiB block is
    reused as it is (no new zeroed pages from the kernel); outside, and again after it
    (defaults restored, also after a nested use), each pass faults its pages in."""
    from traces.decisions import heap_kept

    least = (64 << 20) // (2 << 20)  # a fault per page, at most 2 MiB (huge) each
    assert _faults_to_fill_twice(64) >= least  # glibc default: mmap/munmap per block
    with heap_kept():
        with heap_kept():
            pass
        _faults_to_fill_twice(64)  # the heap grows once
        assert _faults_to_fill_twice(64) < least // 4
    assert _faults_to_fill_twice(64) >= least
