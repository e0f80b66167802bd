"""The interference guard over scripted time: grace, hysteresis, one eviction per cycle,
cooldown, no growth under pressure, minimum reclaim and the share cap."""

from __future__ import annotations

from policies import (
    Decision,
    EvictionReason,
    GuardState,
    HeadroomPolicy,
    InterferenceGuard,
    JobView,
    LeaseView,
    Limits,
    NodeView,
    UnallocatedPolicy,
    UsageSample,
    get_policy,
)

GIB = 1024**3
T0 = 1000.0
# Share cap off unless a test is about it, so offers are easy to reason about.
LIMITS = Limits(
    max_function_share=1.0, cpu_pressure_limit=20.0, pressure_grace_s=5.0, reoffer_cooldown_s=60.0
)


def lender(t: float, cpu_pressure: float = 0.0, job_id: str = "A") -> JobView:
    """4 cores (0-3) using 1.5 cores: headroom keeps 0-1 and lends 2-3; 16 GiB, peak 2 GiB."""
    history = tuple(UsageSample(s, 1.5, 2 * GIB) for s in range(0, int(t), 10))
    return JobView(
        job_id,
        frozenset(range(4)),
        16 * GIB,
        2 * GIB,
        (*history, UsageSample(t, 1.5, 2 * GIB, cpu_pressure, 0.0)),
    )


def node(*jobs: JobView, leases: tuple[LeaseView, ...] = (), reserved: int = 0) -> NodeView:
    return NodeView("n1", frozenset(range(8)), 64 * GIB, jobs, leases, reserved)


def lease(lease_id: str, cpus: set[int], granted: float = 900.0, memory: int = GIB) -> LeaseView:
    return LeaseView(lease_id, frozenset(cpus), memory, granted, 1e9)


def pressure_evictions(decision: Decision) -> list[str]:
    return [e.lease_id for e in decision.evictions if e.reason is EvictionReason.PRESSURE]


class Run:
    """Drives one guarded policy through time, carrying its state like the agent does."""

    def __init__(self, limits: Limits = LIMITS, name: str = "headroom") -> None:
        self.policy = get_policy(name)
        self.limits = limits
        self.state: object | None = None

    def at(self, t: float, view: NodeView) -> Decision:
        decision = self.policy.decide(view, self.limits, t, self.state)
        self.state = decision.state
        return decision


def test_pressure_evicts_only_after_the_grace_period_one_lease_per_cycle() -> None:
    run = Run()
    leases = (lease("on-job", {3}), lease("elsewhere", {6}))
    assert pressure_evictions(run.at(T0, node(lender(T0, 30.0), leases=leases))) == []
    assert pressure_evictions(run.at(T0 + 3, node(lender(T0 + 3, 30.0), leases=leases))) == []
    # 5 s of pressure: the lease sitting on the job's cores goes first, with a soft grace
    decision = run.at(T0 + 5, node(lender(T0 + 5, 30.0), leases=leases))
    assert pressure_evictions(decision) == ["on-job"]
    assert decision.evictions[0].grace_s == LIMITS.eviction_grace_s
    # the job is still under pressure, but the grace period starts again
    left = (leases[1],)
    assert pressure_evictions(run.at(T0 + 6, node(lender(T0 + 6, 30.0), leases=left))) == []
    assert pressure_evictions(run.at(T0 + 10, node(lender(T0 + 10, 30.0), leases=left))) == [
        "elsewhere"
    ]


def test_pressure_between_half_and_the_limit_keeps_the_grace_clock_running() -> None:
    leases = (lease("a", {3}),)
    held = Run()
    held.at(T0, node(lender(T0, 30.0), leases=leases))
    held.at(T0 + 3, node(lender(T0 + 3, 15.0), leases=leases))  # 15 % > half of 20 %
    assert pressure_evictions(held.at(T0 + 5, node(lender(T0 + 5, 30.0), leases=leases))) == ["a"]

    cleared = Run()
    cleared.at(T0, node(lender(T0, 30.0), leases=leases))
    cleared.at(T0 + 3, node(lender(T0 + 3, 5.0), leases=leases))  # 5 % < half: pressure gone
    assert pressure_evictions(cleared.at(T0 + 5, node(lender(T0 + 5, 30.0), leases=leases))) == []
    assert pressure_evictions(cleared.at(T0 + 10, node(lender(T0 + 10, 30.0), leases=leases))) == [
        "a"
    ]


def test_no_pressure_eviction_without_pressure_or_without_leases() -> None:
    run = Run(Limits(max_function_share=1.0, cpu_pressure_limit=20.0, pressure_grace_s=0.0))
    calm = run.at(T0, node(lender(T0, 19.0), leases=(lease("a", {3}),)))
    assert calm.evictions == ()
    pressured = run.at(T0 + 1, node(lender(T0 + 1, 90.0)))
    assert pressured.evictions == ()
    assert isinstance(pressured.state, GuardState)
    assert pressured.state.cooldown_until == ()  # nothing was evicted, so no cooldown


def test_after_a_pressure_eviction_the_job_lends_nothing_new_until_cooldown_and_calm() -> None:
    run = Run()
    leases = (lease("older", {2}, granted=800.0), lease("newer", {3}, granted=900.0))
    assert run.at(T0, node(lender(T0, 30.0), leases=leases)).offer.cpu_ids >= {2, 3}
    evicting = run.at(T0 + 5, node(lender(T0 + 5, 30.0), leases=leases))
    assert pressure_evictions(evicting) == ["newer"]
    # calm again, but within the cooldown: core 3 is not offered again; "older" keeps core 2
    survivor = (leases[0],)
    calm = run.at(T0 + 6, node(lender(T0 + 6, 0.0), leases=survivor))
    assert calm.evictions == ()
    assert calm.offer.cpu_ids & {0, 1, 2, 3} == {2}
    # cooldown over but pressure at 15 % (not below half the limit): still withheld
    mid = run.at(T0 + 66, node(lender(T0 + 66, 15.0), leases=survivor))
    assert mid.offer.cpu_ids & {0, 1, 2, 3} == {2}
    # cooldown over and calm: the job lends core 3 again
    back = run.at(T0 + 67, node(lender(T0 + 67, 0.0), leases=survivor))
    assert back.offer.cpu_ids & {0, 1, 2, 3} == {2, 3}


def test_a_job_evicted_again_waits_twice_as_long() -> None:
    run = Run(Limits(max_function_share=1.0, pressure_grace_s=0.0, reoffer_cooldown_s=60.0))
    lent = {2, 3}
    on_job = (lease("a", {3}),)
    assert pressure_evictions(run.at(T0, node(lender(T0, 30.0), leases=on_job))) == ["a"]
    assert run.at(T0 + 61, node(lender(T0 + 61, 0.0))).offer.cpu_ids >= lent  # 60 s cooldown
    assert pressure_evictions(run.at(T0 + 62, node(lender(T0 + 62, 30.0), leases=on_job))) == ["a"]
    assert not run.at(T0 + 123, node(lender(T0 + 123, 0.0))).offer.cpu_ids & lent  # now 120 s
    assert run.at(T0 + 183, node(lender(T0 + 183, 0.0))).offer.cpu_ids >= lent


def test_the_offer_does_not_grow_while_a_job_is_under_pressure() -> None:
    other = JobView("B", frozenset({4, 5}), 8 * GIB, GIB, (UsageSample(T0, 2.0, GIB),))
    run = Run(name="unallocated")
    before = run.at(T0, node(lender(T0, 30.0), other))
    assert before.offer.cpu_ids == {6, 7}
    # job B ends while A is under pressure: its cores and memory are not offered yet
    during = run.at(T0 + 1, node(lender(T0 + 1, 30.0)))
    assert during.offer == before.offer
    # A calms down (below half its limit): the offer grows
    after = run.at(T0 + 2, node(lender(T0 + 2, 5.0)))
    assert after.offer.cpu_ids == {4, 5, 6, 7}
    assert after.offer.memory_bytes == before.offer.memory_bytes + 8 * GIB


def test_memory_offer_grows_back_only_in_minimum_reclaim_steps() -> None:
    run = Run(name="unallocated")
    first = run.at(T0, node(reserved=2 * GIB)).offer.memory_bytes
    # 32 MiB more free: below the 64 MiB step, held back
    assert run.at(T0 + 1, node(reserved=2 * GIB - 32 * 1024**2)).offer.memory_bytes == first
    # 96 MiB more: granted in full
    grown = run.at(T0 + 2, node(reserved=2 * GIB - 96 * 1024**2)).offer.memory_bytes
    assert grown == first + 96 * 1024**2
    # shrinking is never held back
    assert run.at(T0 + 3, node(reserved=3 * GIB)).offer.memory_bytes == 61 * GIB


def test_share_cap_trims_the_offer_keeping_held_leases_and_evicts_the_newest_beyond() -> None:
    limits = Limits(max_function_share=0.5)
    run = Run(limits, name="unallocated")
    small = JobView("S", frozenset({0}), 16 * GIB, GIB, (UsageSample(T0, 1.0, GIB),))
    capped = run.at(T0, node(small))
    assert capped.offer.cpu_ids == {4, 5, 6, 7}  # 7 free cores, capped at half of 8: highest ids
    assert capped.offer.memory_bytes == 32 * GIB  # 48 GiB free, capped at half of 64
    leases = (
        lease("first", {1, 2}, granted=100.0),
        lease("second", {3}, granted=200.0),
        lease("third", {4, 5}, granted=300.0),
    )
    decision = run.at(T0 + 1, node(small, leases=leases))
    assert decision.offer.cpu_ids == {1, 2, 3, 7}
    assert {e.lease_id: e.reason for e in decision.evictions} == {"third": EvictionReason.SHARE_CAP}


def test_share_cap_leaves_a_node_without_batch_jobs_whole() -> None:
    run = Run(Limits(max_function_share=0.5), name="unallocated")
    idle = run.at(T0, node())
    assert idle.offer.cpu_ids == frozenset(range(8))
    assert idle.offer.memory_bytes == 64 * GIB


def test_guard_off_gives_the_bare_policy_decision() -> None:
    limits = Limits(guard=False)
    view = node(lender(T0, 90.0), leases=(lease("a", {3}),))
    assert InterferenceGuard(HeadroomPolicy()).decide(view, limits, T0) == HeadroomPolicy().decide(
        view, limits, T0
    )
    # and a state left by the guarded run is accepted when the guard is switched off
    guarded = InterferenceGuard(UnallocatedPolicy()).decide(view, LIMITS, T0)
    bare = InterferenceGuard(UnallocatedPolicy()).decide(view, limits, T0 + 1, guarded.state)
    assert bare == UnallocatedPolicy().decide(view, limits, T0 + 1)


def test_guard_state_forgets_jobs_that_ended() -> None:
    run = Run()
    run.at(T0, node(lender(T0, 30.0), leases=(lease("a", {3}),)))
    run.at(T0 + 5, node(lender(T0 + 5, 30.0), leases=(lease("a", {3}),)))
    state = run.state
    assert isinstance(state, GuardState) and state.cooldown_until and state.pressure_since
    assert state.strikes == (("A", 1),)
    run.at(T0 + 6, node())
    state = run.state
    assert isinstance(state, GuardState)
    assert state.cooldown_until == () and state.pressure_since == () and state.strikes == ()
