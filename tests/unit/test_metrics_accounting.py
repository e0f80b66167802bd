"""Wasted and recovered money: the integral between samples, as an operator would check it by hand."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from colocate.metrics.accounting import CostAccount, cpu_efficiency, memory_efficiency
from monitors.snapshot import JobSnapshot, NodeSnapshot
from policies.prices import GIB, Prices

PRICES = Prices()  # 0.015 per core-hour, 0.0015 per GiB-hour


def job(
    cpu_s: float | None,
    *,
    cores: int = 2,
    used: float = 0.5,
    mem_alloc: int = 4 * GIB,
    mem_used: int = 1 * GIB,
    job_id: str = "42",
) -> JobSnapshot:
    return JobSnapshot(
        job_id=job_id,
        user="alice",
        cores_allocated=cores,
        cpu_ids=tuple(range(cores)),
        cores_used=used,
        memory_allocated_bytes=mem_alloc,
        memory_used_bytes=mem_used,
        memory_peak_bytes=mem_used,
        start_time=0.0,
        cpu_seconds_total=cpu_s,
    )


def node(
    t: float, *jobs: JobSnapshot, unalloc_cores: int = 2, unalloc_mem: int = 8 * GIB
) -> NodeSnapshot:
    return NodeSnapshot(
        node="n1",
        t=t,
        cores_total=4,
        cpu_ids=(0, 1, 2, 3),
        memory_total_bytes=16 * GIB,
        cores_unallocated=unalloc_cores,
        memory_unallocated_bytes=unalloc_mem,
        jobs=jobs,
    )


def test_idle_job_cost_is_allocation_minus_cpu_time_at_the_core_hour_price() -> None:
    account = CostAccount(PRICES)
    # 100 samples, 1 s apart; the job burns 0.5 CPU-s per second of its 2 cores.
    for i in range(101):
        account.advance(node(1000.0 + i, job(0.5 * i)), 0, 0, now=1000.0 + i)
    elapsed = 100.0
    idle_core_s = 2 * elapsed - 0.5 * elapsed
    idle_mem_bs = (4 - 1) * GIB * elapsed
    acc = account.jobs["42"]
    assert acc.idle_core_seconds == pytest.approx(idle_core_s)
    assert acc.idle_memory_byte_seconds == pytest.approx(idle_mem_bs)
    assert acc.wasted_cost["cores"] == pytest.approx(idle_core_s / 3600 * 0.015)
    assert acc.wasted_cost["memory"] == pytest.approx(3 * elapsed / 3600 * 0.0015)
    assert account.wasted_cost[("cores", "unallocated")] == pytest.approx(
        2 * elapsed / 3600 * 0.015
    )
    assert account.wasted_cost[("memory", "unallocated")] == pytest.approx(
        8 * elapsed / 3600 * 0.0015
    )
    # CPU efficiency over what was observed agrees with the waste: 0.5 of 2 cores.
    assert cpu_efficiency(acc.cpu_seconds, acc.observed_s, 2) == pytest.approx(0.25)


def test_without_cumulative_cpu_time_the_rate_is_integrated() -> None:
    account = CostAccount(PRICES)
    for i in range(11):
        account.advance(node(float(i), job(None, used=1.5)), 0, 0, now=float(i))
    assert account.jobs["42"].idle_core_seconds == pytest.approx((2 - 1.5) * 10)


def test_memory_use_is_averaged_between_samples() -> None:
    account = CostAccount(PRICES)
    account.advance(node(0.0, job(0.0, mem_used=0)), 0, 0, now=0.0)
    account.advance(node(10.0, job(0.0, mem_used=2 * GIB)), 0, 0, now=10.0)
    assert account.jobs["42"].idle_memory_byte_seconds == pytest.approx((4 - 1) * GIB * 10)


def test_leased_resources_are_recovered_money() -> None:
    account = CostAccount(PRICES)
    for i in range(61):
        account.advance(node(float(i), job(0.0)), 1, 2 * GIB, now=float(i))
    assert account.recovered_core_seconds == pytest.approx(60.0)
    assert account.recovered_cost["cores"] == pytest.approx(60 / 3600 * 0.015)
    assert account.recovered_cost["memory"] == pytest.approx(2 * 60 / 3600 * 0.0015)


def test_a_gap_longer_than_max_gap_is_not_charged() -> None:
    account = CostAccount(PRICES, max_gap_s=30)
    account.advance(node(0.0, job(0.0)), 0, 0, now=0.0)
    account.advance(node(10.0, job(5.0)), 0, 0, now=10.0)
    charged = account.jobs["42"].idle_core_seconds
    account.advance(node(600.0, job(300.0)), 0, 0, now=600.0)  # agent paused 590 s
    assert account.jobs["42"].idle_core_seconds == charged
    assert account.skipped_s == pytest.approx(590.0)
    assert account.accounted_s == pytest.approx(10.0)


def test_repeated_or_older_samples_change_nothing() -> None:
    account = CostAccount(PRICES)
    account.advance(node(10.0, job(0.0)), 0, 0, now=10.0)
    account.advance(node(20.0, job(5.0)), 0, 0, now=20.0)
    before = dict(account.wasted_cost)
    account.advance(node(20.0, job(5.0)), 0, 0, now=20.0)
    account.advance(node(15.0, job(2.0)), 0, 0, now=15.0)
    assert account.wasted_cost == before


def test_an_ended_job_leaves_the_per_job_accounts_but_not_the_node_total() -> None:
    account = CostAccount(PRICES)
    account.advance(node(0.0, job(0.0)), 0, 0, now=0.0)
    account.advance(node(10.0, job(5.0)), 0, 0, now=10.0)
    idle_total = account.wasted_core_seconds["idle_allocated"]
    account.advance(node(20.0), 0, 0, now=20.0)
    assert "42" not in account.jobs
    assert account.wasted_core_seconds["idle_allocated"] >= idle_total > 0


def test_node_charging_bills_the_larger_share_of_a_node_hour() -> None:
    prices = Prices(charging="node", node_hour=2.0)
    account = CostAccount(prices, max_gap_s=7200)
    # Only unallocated resources, for one hour: 1 of 4 cores (25 %), 12 of 16 GiB (75 %).
    account.advance(node(0.0, unalloc_cores=1, unalloc_mem=12 * GIB), 0, 0, now=0.0)
    account.advance(node(3600.0, unalloc_cores=1, unalloc_mem=12 * GIB), 0, 0, now=3600.0)
    assert set(account.recovered_cost) == {"node"}
    assert account.wasted_cost[("node", "unallocated")] == pytest.approx(0.75 * 2.0)


def test_efficiencies_follow_jobstats_and_seff() -> None:
    assert cpu_efficiency(3600.0, 3600.0, 4) == pytest.approx(0.25)
    assert cpu_efficiency(10.0, 0.0, 4) is None
    assert memory_efficiency(GIB, 4 * GIB) == pytest.approx(0.25)
    assert memory_efficiency(GIB, 0) is None


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.floats(0.01, 20.0),  # interval, seconds
            st.floats(0.0, 3.0),  # cores used (may exceed the allocation)
            st.integers(0, 6 * GIB),  # memory used (may exceed the allocation)
        ),
        min_size=1,
        max_size=40,
    )
)
def test_waste_never_decreases_and_never_exceeds_the_allocation(
    steps: list[tuple[float, float, int]],
) -> None:
    account = CostAccount(PRICES)
    t, cpu = 0.0, 0.0
    account.advance(node(t, job(cpu)), 0, 0, now=t)
    last = 0.0
    for dt, used, mem in steps:
        t += dt
        cpu += used * dt
        account.advance(node(t, job(cpu, used=used, mem_used=mem)), 0, 0, now=t)
        total = sum(account.wasted_cost.values())
        assert total >= last
        last = total
    acc = account.jobs["42"]
    assert acc.idle_core_seconds <= 2 * t + 1e-6
    assert acc.idle_memory_byte_seconds <= 4 * GIB * t + 1e-3


PURE = ["accounting.py", "events.py", "state.py", "openmetrics.py", "replay_adapter.py"]
NO_IO = {
    "os",
    "time",
    "socket",
    "psutil",
    "prometheus_client",
    "subprocess",
    "pathlib",
    "http",
    "urllib",
    "httpx",
}


@pytest.mark.parametrize("name", PURE)
def test_the_accounting_side_does_no_io_and_reads_no_clock(name: str) -> None:
    import ast
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "colocate" / "metrics" / name
    imported: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module.split(".")[0])
    assert not imported & NO_IO, f"{name} imports {imported & NO_IO}"


def test_the_same_snapshot_handed_in_again_is_not_accrued_twice() -> None:
    # the agent's prolog/epilog decide without sampling and hand the last snapshot in again
    account = CostAccount(PRICES)
    account.advance(node(0.0, job(0.0)), 0, 0, now=0.0)
    account.advance(node(0.0, job(0.0)), 0, 0, now=0.3)
    account.advance(node(0.5, job(0.25)), 0, 0, now=0.5)
    assert account.accounted_s == pytest.approx(0.5)
    assert account.jobs["42"].idle_core_seconds == pytest.approx(2 * 0.5 - 0.25)
