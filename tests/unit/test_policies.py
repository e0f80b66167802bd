"""Example-based behaviour of each policy: what a node with known jobs gets offered and evicted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import policies
from policies import (
    POLICIES,
    EvictionReason,
    HeadroomPolicy,
    JobView,
    LeaseView,
    Limits,
    NodeView,
    PredictivePolicy,
    UnallocatedPolicy,
    UsageSample,
    get_policy,
)

GIB = 1024**3
NOW = 1000.0
# No guard, no margins to reason about beyond the ones each test sets.
BARE = Limits(guard=False)


def steady(
    cores: float, memory: int, since: float = 0.0, step: float = 10.0
) -> tuple[UsageSample, ...]:
    """Samples every ``step`` s from ``since`` to NOW at a constant usage."""
    count = int((NOW - since) / step) + 1
    return tuple(UsageSample(since + k * step, cores, memory) for k in range(count))


def job(
    job_id: str = "1",
    cpus: range = range(4),
    memory: int = 16 * GIB,
    history: tuple[UsageSample, ...] = (),
    peak: int = 0,
    colocate: bool = True,
    start: float = 0.0,
) -> JobView:
    return JobView(job_id, frozenset(cpus), memory, peak, history, colocate, start)


def node(*jobs: JobView, leases: tuple[LeaseView, ...] = ()) -> NodeView:
    """8 cores, 64 GiB, 2 GiB reserved for the OS."""
    return NodeView("n1", frozenset(range(8)), 64 * GIB, tuple(jobs), leases, 2 * GIB)


def lease(
    lease_id: str, cpus: set[int], memory: int, granted: float = 500.0, expires: float = 1e9
) -> LeaseView:
    return LeaseView(lease_id, frozenset(cpus), memory, granted, expires)


def reasons(decision: policies.Decision) -> dict[str, EvictionReason]:
    return {e.lease_id: e.reason for e in decision.evictions}


# --- registry ---------------------------------------------------------------------------


def test_registry_names_the_three_policies() -> None:
    assert set(POLICIES) == {"unallocated", "headroom", "predictive"}
    for name in POLICIES:
        assert get_policy(name).name == name


def test_unknown_policy_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="headroom"):
        get_policy("greedy")


def test_public_names_are_exported() -> None:
    for name in policies.__all__:
        assert hasattr(policies, name), name


# --- unallocated ------------------------------------------------------------------------


def test_unallocated_offers_only_what_slurm_did_not_allocate() -> None:
    busy = job(history=steady(0.5, GIB), peak=GIB)  # nearly idle, yet nothing of it is lent
    decision = UnallocatedPolicy().decide(node(busy), BARE, NOW)
    assert decision.offer.cpu_ids == frozenset(range(4, 8))
    assert decision.offer.memory_bytes == (64 - 2 - 16) * GIB


def test_unallocated_evicts_a_lease_when_a_job_takes_its_cores() -> None:
    decision = UnallocatedPolicy().decide(
        node(job(cpus=range(6)), leases=(lease("a", {5, 6}, GIB),)), BARE, NOW
    )
    assert reasons(decision) == {"a": EvictionReason.JOB_START}
    assert decision.evictions[0].grace_s == 0.0


# --- headroom ---------------------------------------------------------------------------


def test_headroom_lends_idle_cores_and_memory_above_peak_plus_margin() -> None:
    # 4 cores, at most 1.5 busy -> keeps ceil(1.5 + 0.25) = 2, lends cores 2 and 3;
    # 16 GiB allocated, peak 4 GiB, margin max(256 MiB, 1.6 GiB) -> lends 10.4 GiB.
    j = job(history=steady(1.5, 3 * GIB), peak=4 * GIB)
    decision = HeadroomPolicy().decide(node(j), BARE, NOW)
    assert decision.offer.cpu_ids == frozenset({2, 3, 4, 5, 6, 7})
    margin = int(0.1 * 16 * GIB)
    assert decision.offer.memory_bytes == (64 - 2 - 16) * GIB + 16 * GIB - 4 * GIB - margin


def test_headroom_sizes_cores_by_the_busiest_sample_of_the_window() -> None:
    # samples 10 s apart: the one at 3.2 cores stands for 10 s of use, not a spike
    history = tuple(UsageSample(s.t, 3.2, GIB) if s.t == NOW - 60 else s for s in steady(0.5, GIB))
    decision = HeadroomPolicy().decide(node(job(history=history)), BARE, NOW)
    assert decision.offer.cpu_ids & frozenset(range(4)) == frozenset()  # ceil(3.45) = 4
    # once the spike leaves the 300 s window, the cores come back
    later = HeadroomPolicy().decide(node(job(history=history)), BARE, NOW + 300)
    assert later.offer.cpu_ids & frozenset(range(4)) == frozenset({1, 2, 3})


def test_headroom_memory_uses_the_largest_sample_when_above_the_reported_peak() -> None:
    history = (*steady(1.0, GIB)[:-1], UsageSample(NOW, 1.0, 12 * GIB))
    decision = HeadroomPolicy().decide(node(job(history=history, peak=2 * GIB)), BARE, NOW)
    assert decision.offer.memory_bytes == (64 - 2 - 16) * GIB + 16 * GIB - 12 * GIB - int(1.6 * GIB)


@pytest.mark.parametrize(
    "young",
    [
        job(history=(), start=0.0),  # no history yet
        job(history=steady(0.0, 0, since=NOW - 10), start=NOW - 10),  # 10 s old < 30 s
        job(history=steady(0.0, 0), colocate=False),  # --colocate=deny
    ],
    ids=["no-history", "young", "deny"],
)
def test_headroom_lends_nothing_of_a_new_or_denying_job(young: JobView) -> None:
    decision = HeadroomPolicy().decide(node(young), BARE, NOW)
    assert decision.offer.cpu_ids == frozenset(range(4, 8))
    assert decision.offer.memory_bytes == (64 - 2 - 16) * GIB


def test_headroom_job_above_its_allocation_eats_unallocated_memory() -> None:
    over = job(history=steady(4.0, 20 * GIB), peak=20 * GIB)  # no cgroup limit enforced
    decision = HeadroomPolicy().decide(node(over), BARE, NOW)
    assert decision.offer.memory_bytes == 64 * GIB - 2 * GIB - 20 * GIB - int(1.6 * GIB)
    assert decision.offer.cpu_ids == frozenset(range(4, 8))


def test_headroom_evicts_a_lease_when_the_job_needs_its_cores_again() -> None:
    leases = (lease("low", {2}, GIB), lease("high", {3}, GIB))
    quiet = job(history=steady(1.0, GIB), peak=GIB)
    first = HeadroomPolicy().decide(node(quiet, leases=leases), BARE, NOW)
    assert first.evictions == ()
    # one sample at 2.5 cores is not a trend yet: the leases stay
    blip = job(history=(*steady(1.0, GIB), UsageSample(NOW + 1, 2.5, GIB)), peak=GIB)
    assert HeadroomPolicy().decide(node(blip, leases=leases), BARE, NOW + 1).evictions == ()
    # two in a row (cpu_growth_samples): ceil(2.5 - 0.1) = 3 cores kept, core 2 taken back first
    busier = job(history=(*blip.history, UsageSample(NOW + 2, 2.5, GIB)), peak=GIB)
    second = HeadroomPolicy().decide(node(busier, leases=leases), BARE, NOW + 2)
    assert reasons(second) == {"low": EvictionReason.CPU_GROWTH}
    assert second.evictions[0].grace_s == BARE.eviction_grace_s  # CPU can wait a moment


def test_headroom_evicts_the_newest_lease_when_memory_grows() -> None:
    quiet = job(history=steady(0.5, 2 * GIB), peak=2 * GIB)
    offered = HeadroomPolicy().decide(node(quiet), BARE, NOW).offer.memory_bytes
    leases = (
        lease("old", {6}, offered // 2, granted=100),
        lease("new", {7}, offered // 2, granted=200),
    )
    grown = job(history=(*quiet.history, UsageSample(NOW + 1, 0.5, 14 * GIB)), peak=14 * GIB)
    decision = HeadroomPolicy().decide(node(grown, leases=leases), BARE, NOW + 1)
    assert reasons(decision) == {"new": EvictionReason.MEMORY_GROWTH}
    assert decision.evictions[0].grace_s == 0.0  # memory cannot wait


def test_headroom_eviction_reasons_for_deny_start_and_expiry() -> None:
    deny = job("deny", cpus=range(0, 2), memory=4 * GIB, history=steady(0.0, 0), colocate=False)
    new = job("new", cpus=range(2, 4), memory=4 * GIB, history=(), start=NOW)
    leases = (
        lease("on-deny", {1}, 0),
        lease("on-new", {3}, 0),
        lease("expired", {7}, 0, expires=NOW),
        lease("fine", {6}, GIB),
    )
    decision = HeadroomPolicy().decide(node(deny, new, leases=leases), BARE, NOW)
    assert reasons(decision) == {
        "on-deny": EvictionReason.DENIED,
        "on-new": EvictionReason.JOB_START,
        "expired": EvictionReason.EXPIRED,
    }


# --- predictive -------------------------------------------------------------------------


def test_predictive_ignores_a_rare_spike_that_headroom_keeps_cores_for() -> None:
    history = list(steady(0.5, GIB))
    history[-5] = UsageSample(history[-5].t, 3.9, GIB)  # one spike in the window
    spiky = job(history=tuple(history), peak=GIB)
    headroom = HeadroomPolicy().decide(node(spiky), BARE, NOW).offer
    predictive = PredictivePolicy().decide(node(spiky), BARE, NOW).offer
    assert headroom.cpu_ids & frozenset(range(4)) == frozenset()
    assert predictive.cpu_ids & frozenset(range(4)) == frozenset({1, 2, 3})  # p95 ~ 0.5


def test_predictive_never_lends_cores_the_job_uses_right_now() -> None:
    history = (*steady(0.5, GIB)[:-1], UsageSample(NOW, 3.5, GIB))
    decision = PredictivePolicy().decide(node(job(history=history, peak=GIB)), BARE, NOW)
    assert decision.offer.cpu_ids & frozenset(range(4)) == frozenset()


def test_predictive_lends_less_memory_to_a_growing_job() -> None:
    # memory climbs 10 MiB/s: 60 s ahead it will use 600 MiB more than now
    growing = tuple(
        UsageSample(t, 1.0, GIB + int((t - 700) * 10 * 1024**2)) for t in range(700, 1001, 10)
    )
    g = job(history=growing, peak=0)
    headroom = HeadroomPolicy().decide(node(g), BARE, NOW).offer.memory_bytes
    predictive = PredictivePolicy().decide(node(g), BARE, NOW).offer.memory_bytes
    assert headroom - predictive == pytest.approx(600 * 1024**2, rel=0.01)


def test_predictive_never_offers_below_peak_plus_margin() -> None:
    # usage fell far below an old peak: percentiles say 1 GiB, the peak says 12 GiB
    history = (UsageSample(10.0, 1.0, 12 * GIB), *steady(1.0, GIB, since=500.0))
    decision = PredictivePolicy().decide(node(job(history=history)), BARE, NOW)
    assert decision.offer.memory_bytes == (64 - 2 - 16) * GIB + 16 * GIB - 12 * GIB - int(1.6 * GIB)


# --- determinism across processes -------------------------------------------------------

_SCRIPT = """
from policies import POLICIES, JobView, LeaseView, Limits, NodeView, UsageSample, get_policy
GIB = 1024**3
out = []
for name in sorted(POLICIES):
    policy, state = get_policy(name), None
    for step in range(6):
        t = 1000.0 + 10 * step
        jobs = tuple(
            JobView(f"job-{k}", frozenset(range(4 * k, 4 * k + 4)), 8 * GIB, GIB,
                    tuple(UsageSample(s, 1.0 + k, GIB, 30.0 * (step % 3 == k), 0.0)
                          for s in range(0, int(t) + 1, 50)))
            for k in range(2)
        )
        leases = tuple(LeaseView(f"lease-{i}", frozenset({3 + 4 * i}), GIB, 900.0 + i, 5000.0)
                       for i in range(2))
        d = policy.decide(NodeView("n", frozenset(range(8)), 64 * GIB, jobs, leases), Limits(pressure_grace_s=0), t, state)
        state = d.state
        out.append(repr((sorted(d.offer.cpu_ids), d.offer.memory_bytes, d.evictions, d.state)))
print("\\n".join(out))
"""


def test_decisions_do_not_depend_on_the_process_hash_seed() -> None:
    runs = [
        subprocess.run(
            [sys.executable, "-c", _SCRIPT],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONHASHSEED": seed},
            cwd=Path(__file__).resolve().parents[2],
            check=True,
        ).stdout
        for seed in ("1", "2")
    ]
    assert "EvictionReason.PRESSURE" in runs[0]  # the script reaches the guard's eviction path
    assert runs[0] == runs[1]


# --- issue 15: what each core does (shipped defaults, guard on) ----------------------------


def _shapes(shares: dict[int, float], seconds: int = 60) -> tuple[UsageSample, ...]:
    """One sample a second of a job whose CPUs are busy by ``shares`` (the total their sum)."""
    busy = tuple(sorted(shares.items()))
    total = sum(shares.values())
    return tuple(
        UsageSample(NOW - seconds + 1 + k, total, GIB, 0.0, 0.0, busy) for k in range(seconds)
    )


def _two_core_node(
    history: tuple[UsageSample, ...], leases: tuple[LeaseView, ...] = ()
) -> NodeView:
    job = JobView("j", frozenset({0, 1}), 4 * GIB, GIB, history, True, NOW - 120)
    return NodeView("n1", frozenset({0, 1}), 8 * GIB, (job,), leases)


@pytest.mark.parametrize(
    ("shape", "shares", "lent"),
    [
        ("one busy core of two (the issue's job; was: nothing)", {0: 0.97, 1: 0.0}, {1}),
        ("the busy core is the highest id: the other one is lent", {0: 0.01, 1: 0.98}, {0}),
        ("one thread at 50 %", {0: 0.5, 1: 0.0}, {1}),
        ("threads floating over both cores at 1.0 in total", {0: 0.52, 1: 0.5}, {1}),
        ("both cores busy", {0: 0.95, 1: 0.9}, set()),
        ("1.4 cores floating", {0: 0.7, 1: 0.7}, set()),
    ],
)
def test_default_limits_lend_what_each_core_leaves_idle(
    shape: str, shares: dict[int, float], lent: set[int]
) -> None:
    decision = get_policy("headroom").decide(_two_core_node(_shapes(shares)), Limits(), NOW)
    assert decision.offer.cpu_ids == lent, shape


def test_without_per_core_shares_a_whole_busy_core_still_lends_the_other() -> None:
    history = steady(0.97, GIB, since=NOW - 60, step=1.0)  # cgroup v2 / process scan: total only
    decision = get_policy("headroom").decide(_two_core_node(history), Limits(), NOW)
    assert decision.offer.cpu_ids == {1}


def test_a_lease_keeps_its_core_while_the_job_floats_onto_it() -> None:
    # Floating threads at 1.0 run on the lent core now and then: no growth, the lease stays,
    # and the core it holds stays the lent one (not the one least busy this minute).
    history = _shapes({0: 0.3, 1: 0.7})
    leases = (lease("L", {0}, GIB),)
    decision = get_policy("headroom").decide(_two_core_node(history, leases), Limits(), NOW)
    assert decision.evictions == () and decision.offer.cpu_ids == {0}


def test_a_one_reading_spike_is_not_sized_for_but_a_held_level_is() -> None:
    # a job at 1 core whose start-up (or a forking shell) read 1.6 for one second
    spike = list(_shapes({0: 0.98, 1: 0.0}))
    spike[10] = UsageSample(spike[10].t, 1.6, GIB, 0.0, 0.0, ((0, 1.0), (1, 0.6)))
    decision = get_policy("headroom").decide(_two_core_node(tuple(spike)), Limits(), NOW)
    assert decision.offer.cpu_ids == {1}
    # two readings in a row at 1.6: that is use, the job keeps both cores
    spike[11] = UsageSample(spike[11].t, 1.6, GIB, 0.0, 0.0, ((0, 1.0), (1, 0.6)))
    decision = get_policy("headroom").decide(_two_core_node(tuple(spike)), Limits(), NOW)
    assert decision.offer.cpu_ids == frozenset()


def test_pressure_confirms_growth_at_the_first_sample() -> None:
    history = (
        *_shapes({0: 0.98, 1: 0.0}),
        UsageSample(NOW + 1, 1.5, GIB, 30.0, 0.0, ((0, 1.0), (1, 0.5))),
    )
    leases = (lease("L", {1}, GIB),)
    decision = get_policy("headroom").decide(_two_core_node(history, leases), Limits(), NOW + 1)
    assert reasons(decision) == {"L": EvictionReason.CPU_GROWTH}
