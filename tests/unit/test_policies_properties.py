"""Safety properties every registered policy must keep, on random nodes (hypothesis).

Notation used in the assertions, per job ``j`` on the node:
- ``peak_j`` = max(reported peak, every history sample's memory); generated ``<= alloc_j``
  (Slurm's cgroup holds a job to its allocation);
- ``margin_j`` = max(limits.memory_margin_bytes, limits.memory_margin_ratio * alloc_j);
- a job *lends* when it allows colocation, has history and is at least
  ``limits.min_history_s`` old; ``protected_j`` = min(alloc_j, peak_j + margin_j) for a
  lending job, alloc_j otherwise.

Then, whatever the policy:
- memory offered <= total - reserved - sum_j protected_j (never below a job's peak plus margin);
- cores offered are node cores; none of a non-lending job; of a lending job at most
  len(cpus_j) - max(1, ceil(latest cores_used_j + core_margin - core_noise)), or the cores
  leases already hold on it if more (a lease keeps its cores until growth is confirmed);
- a job that keeps exactly k of its n cores busy (per-core shares) lends exactly its n - k
  idle cores; a steady job with noisy samples never loses its lease to ``cpu_growth``, and
  a job whose use stays above what it kept for ``cpu_growth_samples`` samples does;
- with the guard on and batch jobs on the node, at most ``max_function_share`` of its cores and memory;
- every lease not evicted is unexpired, sits on offered cores, and all of them fit the memory;
- the same inputs give the same decision.
"""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from policies import (
    POLICIES,
    EvictionReason,
    JobView,
    LeaseView,
    Limits,
    NodeView,
    UsageSample,
    get_policy,
)
from policies.headroom import cores_to_keep

GIB = 1024**3
NOW = 10_000.0
ALL = sorted(POLICIES)
LENDING = ["headroom", "predictive"]

limits_strategy = st.builds(
    Limits,
    memory_margin_ratio=st.sampled_from([0.0, 0.05, 0.1, 0.3]),
    memory_margin_bytes=st.sampled_from([0, 64 * 1024**2, 256 * 1024**2, GIB]),
    core_margin=st.sampled_from([0.0, 0.25, 1.0]),
    core_noise=st.sampled_from([0.0, 0.1, 0.2]),
    cpu_growth_samples=st.sampled_from([1, 2, 3]),
    history_window_s=st.sampled_from([10.0, 60.0, 300.0]),
    min_history_s=st.sampled_from([0.0, 30.0]),
    percentile=st.sampled_from([50.0, 95.0, 100.0]),
    pressure_grace_s=st.sampled_from([0.0, 5.0]),
    max_function_share=st.sampled_from([0.25, 0.5, 1.0]),
    guard=st.booleans(),
)


@st.composite
def samples(draw: st.DrawFn, cores: int, peak: int, least: int = 0) -> tuple[UsageSample, ...]:
    count = draw(st.integers(least, 6))
    times = sorted(draw(st.lists(st.floats(NOW - 400, NOW), min_size=count, max_size=count)))
    pressure = st.one_of(st.none(), st.floats(0, 100))
    return tuple(
        UsageSample(
            t,
            draw(st.floats(0, cores)),
            draw(st.integers(0, peak)),
            draw(pressure),
            draw(pressure),
        )
        for t in times
    )


@st.composite
def nodes(draw: st.DrawFn, max_leases: int = 2, lending: bool = False) -> NodeView:
    """A node with 0-3 jobs on disjoint cores and 0-``max_leases`` leases anywhere;
    ``lending``: every job allows colocation and has a long history (it may lend)."""
    n_cpus = draw(st.sampled_from([4, 8, 16]))
    total = draw(st.integers(4, 256)) * GIB
    reserved = draw(st.sampled_from([0, GIB]))
    free_cpus = list(range(n_cpus))
    memory_left = total - reserved
    jobs = []
    for k in range(draw(st.integers(0, 3))):
        if not free_cpus:
            break
        size = draw(st.integers(1, len(free_cpus)))
        cpus = frozenset(free_cpus[:size])
        free_cpus = free_cpus[size:]
        alloc = draw(st.integers(0, max(0, memory_left)))
        memory_left -= alloc
        peak = draw(st.integers(0, alloc))
        jobs.append(
            JobView(
                job_id=f"job{k}",
                cpu_ids=cpus,
                memory_allocated_bytes=alloc,
                memory_peak_bytes=peak,
                history=draw(samples(size, peak, least=int(lending))),
                colocate=lending or draw(st.booleans()),
                start_time=NOW
                - (1000.0 if lending else draw(st.sampled_from([0.0, 10.0, 100.0, 1000.0]))),
            )
        )
    leases = []
    for k in range(draw(st.integers(0, max_leases))):
        cpus = draw(st.frozensets(st.integers(0, n_cpus - 1), min_size=1, max_size=4))
        granted = NOW - draw(st.floats(0, 500))
        leases.append(
            LeaseView(
                f"lease{k}",
                cpus,
                draw(st.integers(0, 8)) * GIB // 2,
                granted,
                granted + draw(st.floats(1, 2000)),
            )
        )
    return NodeView(
        node="n1",
        cpu_ids=frozenset(range(n_cpus)),
        memory_total_bytes=total,
        jobs=tuple(jobs),
        leases=tuple(leases),
        memory_reserved_bytes=reserved,
    )


def observed_peak(job: JobView) -> int:
    return max([job.memory_peak_bytes, *(s.memory_used_bytes for s in job.history)])


def memory_margin(job: JobView, limits: Limits) -> int:
    return max(
        limits.memory_margin_bytes, int(limits.memory_margin_ratio * job.memory_allocated_bytes)
    )


def lends(job: JobView, limits: Limits, now: float) -> bool:
    return bool(job.colocate and job.history and now - job.start_time >= limits.min_history_s)


def protected(job: JobView, limits: Limits, now: float) -> int:
    if not lends(job, limits, now):
        return job.memory_allocated_bytes
    return min(job.memory_allocated_bytes, observed_peak(job) + memory_margin(job, limits))


FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("name", ALL)
@FAST
@given(node=nodes(), limits=limits_strategy)
def test_offer_never_exceeds_what_is_free(name: str, node: NodeView, limits: Limits) -> None:
    offer = get_policy(name).decide(node, limits, NOW).offer
    assert offer.cpu_ids <= node.cpu_ids
    free_memory = node.memory_total_bytes - node.memory_reserved_bytes
    assert offer.memory_bytes <= max(
        0, free_memory - sum(protected(j, limits, NOW) for j in node.jobs)
    )
    for job in node.jobs:
        lent = offer.cpu_ids & job.cpu_ids
        if not lends(job, limits, NOW):
            assert not lent, f"{job.job_id} may not lend but {sorted(lent)} were offered"
        else:
            used = job.history[-1].cores_used
            keep = max(1, math.ceil(used + limits.core_margin - limits.core_noise))
            held = job.cpu_ids & frozenset().union(*(lease.cpu_ids for lease in node.leases))
            assert len(lent) <= max(0, len(job.cpu_ids) - keep, len(held))
    if limits.guard and node.jobs:  # the share cap protects batch jobs; an idle node is whole
        assert offer.cores <= limits.max_function_share * len(node.cpu_ids) + 1e-9
        assert offer.memory_bytes <= limits.max_function_share * node.memory_total_bytes


@pytest.mark.parametrize("name", ALL)
@FAST
@given(node=nodes(), limits=limits_strategy)
def test_kept_leases_fit_inside_the_offer(name: str, node: NodeView, limits: Limits) -> None:
    decision = get_policy(name).decide(node, limits, NOW)
    evicted = [e.lease_id for e in decision.evictions]
    assert len(evicted) == len(set(evicted)), "a lease was evicted twice"
    kept = [lease for lease in node.leases if lease.lease_id not in evicted]
    for lease in kept:
        assert lease.expires_at > NOW
        assert lease.cpu_ids <= decision.offer.cpu_ids
    assert sum(lease.memory_bytes for lease in kept) <= decision.offer.memory_bytes
    for eviction in decision.evictions:
        if eviction.reason in (EvictionReason.JOB_START, EvictionReason.MEMORY_GROWTH):
            assert eviction.grace_s == 0.0


@pytest.mark.parametrize("name", ALL)
@FAST
@given(node=nodes(), limits=limits_strategy, now=st.floats(NOW, NOW + 100))
def test_same_inputs_same_decision(name: str, node: NodeView, limits: Limits, now: float) -> None:
    first = get_policy(name).decide(node, limits, now)
    second = get_policy(name).decide(node, limits, now)
    assert first == second
    # and with the state carried over, the next step is reproducible too
    assert get_policy(name).decide(node, limits, now + 1, first.state) == get_policy(name).decide(
        node, limits, now + 1, second.state
    )


def _deny(node: NodeView, job: JobView) -> NodeView:
    """The node as it would be had ``job`` asked --colocate=deny."""
    jobs = tuple(
        JobView(
            j.job_id,
            j.cpu_ids,
            j.memory_allocated_bytes,
            j.memory_peak_bytes,
            j.history,
            False,
            j.start_time,
        )
        if j is job
        else j
        for j in node.jobs
    )
    return NodeView(
        node.node,
        node.cpu_ids,
        node.memory_total_bytes,
        jobs,
        node.leases,
        node.memory_reserved_bytes,
    )


def _grow(job: JobView, t: float, samples: int = 1) -> JobView:
    """The job now uses all its cores and its whole allocation, for ``samples`` samples 1 s
    apart ending at ``t``."""
    grown = tuple(
        UsageSample(t - k, float(len(job.cpu_ids)), job.memory_allocated_bytes)
        for k in reversed(range(samples))
    )
    return JobView(
        job.job_id,
        job.cpu_ids,
        job.memory_allocated_bytes,
        job.memory_allocated_bytes,
        (*job.history, *grown),
        job.colocate,
        job.start_time,
    )


@pytest.mark.parametrize("name", LENDING)
@FAST
@given(node=nodes(max_leases=0, lending=True), limits=limits_strategy)
def test_growing_usage_evicts_the_lease_on_it(name: str, node: NodeView, limits: Limits) -> None:
    policy = get_policy(name)
    before = policy.decide(node, limits, NOW)
    lent = [j for j in node.jobs if before.offer.cpu_ids & j.cpu_ids and lends(j, limits, NOW + 1)]
    event(f"a job lent cores: {bool(lent)}")
    if not lent:
        return  # nothing lent from a job: nothing can grow into a lease
    job = lent[0]
    n = limits.cpu_growth_samples  # the job stays grown for that many samples
    # functions take every offered core of that job and all offered memory
    lease = LeaseView(
        "L", before.offer.cpu_ids & job.cpu_ids, before.offer.memory_bytes, NOW, NOW + 1e6
    )
    grown = NodeView(
        node.node,
        node.cpu_ids,
        node.memory_total_bytes,
        tuple(_grow(j, NOW + n, n) if j is job else j for j in node.jobs),
        (lease,),
        node.memory_reserved_bytes,
    )
    after = policy.decide(grown, limits, NOW + n, before.state)
    reasons = {e.lease_id: e.reason for e in after.evictions}
    assert reasons.get("L") == EvictionReason.CPU_GROWTH


@pytest.mark.parametrize("name", LENDING)
@FAST
@given(node=nodes(max_leases=0, lending=True), limits=limits_strategy)
def test_growing_memory_evicts_the_lease_holding_it(
    name: str, node: NodeView, limits: Limits
) -> None:
    # no share cap: a capped offer may leave room for the job to grow without evicting
    limits = limits.model_copy(update={"max_function_share": 1.0})
    policy = get_policy(name)
    before = policy.decide(node, limits, NOW)
    # the job that lends memory: withholding it shrinks the offer
    job = next(
        (
            j
            for j in node.jobs
            if lends(j, limits, NOW + 1)
            and policy.decide(_deny(node, j), limits, NOW).offer.memory_bytes
            < before.offer.memory_bytes
        ),
        None,
    )
    event(f"a job lent memory: {job is not None}")
    if job is None or before.offer.memory_bytes == 0:
        return
    # a lease holding all offered memory, on no core at all jobs could want back
    spare = sorted(before.offer.cpu_ids - frozenset().union(*(j.cpu_ids for j in node.jobs)))
    event(f"spare core for the lease: {bool(spare)}")
    if not spare:
        return
    lease = LeaseView("L", frozenset(spare[:1]), before.offer.memory_bytes, NOW, NOW + 1e6)
    grown = NodeView(
        node.node,
        node.cpu_ids,
        node.memory_total_bytes,
        tuple(_grow(j, NOW + 1) if j is job else j for j in node.jobs),
        (lease,),
        node.memory_reserved_bytes,
    )
    after = policy.decide(grown, limits, NOW + 1, before.state)
    reasons = {e.lease_id: e.reason for e in after.evictions}
    young = any(
        not j.history or NOW + 1 - j.start_time < limits.min_history_s
        for j in node.jobs
        if j.colocate
    )
    assert reasons.get("L") == (EvictionReason.JOB_START if young else EvictionReason.MEMORY_GROWTH)


@pytest.mark.parametrize("name", ALL)
@FAST
@given(node=nodes(max_leases=0), limits=limits_strategy)
def test_a_job_starting_on_leased_cores_evicts_the_lease(
    name: str, node: NodeView, limits: Limits
) -> None:
    policy = get_policy(name)
    before = policy.decide(node, limits, NOW)
    event(f"cores offered: {bool(before.offer.cpu_ids)}")
    if not before.offer.cpu_ids:
        return
    lease = LeaseView("L", before.offer.cpu_ids, before.offer.memory_bytes, NOW, NOW + 1e6)
    taken = frozenset(sorted(before.offer.cpu_ids)[:1]) | (
        before.offer.cpu_ids - frozenset().union(*(j.cpu_ids for j in node.jobs))
    )
    others = tuple(
        JobView(
            j.job_id,
            j.cpu_ids - taken,
            j.memory_allocated_bytes,
            j.memory_peak_bytes,
            j.history,
            j.colocate,
            j.start_time,
        )
        for j in node.jobs
    )
    newcomer = JobView("new", taken, 0, start_time=NOW + 1)
    started = NodeView(
        node.node,
        node.cpu_ids,
        node.memory_total_bytes,
        (*others, newcomer),
        (lease,),
        node.memory_reserved_bytes,
    )
    after = policy.decide(started, limits, NOW + 1, before.state)
    reasons = {e.lease_id: e.reason for e in after.evictions}
    assert reasons.get("L") == EvictionReason.JOB_START
    assert not after.offer.cpu_ids & taken


@st.composite
def timelines(draw: st.DrawFn) -> list[tuple[float, NodeView]]:
    """A node seen every few seconds: jobs keep their ids, usage and leases change."""
    base = draw(nodes())
    steps = []
    t = NOW
    for _ in range(draw(st.integers(2, 8))):
        t += draw(st.sampled_from([1.0, 5.0, 30.0]))
        fresh = draw(nodes())
        jobs = tuple(
            JobView(
                j.job_id,
                j.cpu_ids,
                j.memory_allocated_bytes,
                j.memory_peak_bytes,
                (
                    *j.history,
                    UsageSample(
                        t,
                        draw(st.floats(0, len(j.cpu_ids))),
                        j.memory_peak_bytes,
                        draw(st.floats(0, 100)),
                        draw(st.floats(0, 20)),
                    ),
                ),
                j.colocate,
                j.start_time,
            )
            for j in base.jobs
        )
        steps.append(
            (
                t,
                NodeView(
                    base.node,
                    base.cpu_ids,
                    base.memory_total_bytes,
                    jobs,
                    fresh.leases,
                    base.memory_reserved_bytes,
                ),
            )
        )
        base = steps[-1][1]
    return steps


@pytest.mark.parametrize("name", ALL)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(timeline=timelines())
def test_guard_over_time_stays_inside_the_policy_and_evicts_one_per_cycle(
    name: str, timeline: list[tuple[float, NodeView]]
) -> None:
    limits = Limits(pressure_grace_s=5.0)
    guarded = get_policy(name)
    bare = get_policy(name)
    state: object | None = None
    for now, node in timeline:
        decision = guarded.decide(node, limits, now, state)
        inner = bare.decide(node, limits.model_copy(update={"guard": False}), now)
        assert decision.offer.cpu_ids <= inner.offer.cpu_ids
        assert decision.offer.memory_bytes <= inner.offer.memory_bytes
        pressure = [e for e in decision.evictions if e.reason is EvictionReason.PRESSURE]
        assert len(pressure) <= 1
        evicted = {e.lease_id for e in decision.evictions}
        kept = [lease for lease in node.leases if lease.lease_id not in evicted]
        for lease in kept:
            assert lease.cpu_ids <= decision.offer.cpu_ids
        assert sum(lease.memory_bytes for lease in kept) <= decision.offer.memory_bytes
        state = decision.state


# --- lending what is really idle, and keeping it (issue 15) ---------------------------------

BARE_CAP = {"max_function_share": 1.0, "min_history_s": 30.0}


@st.composite
def busy_series(
    draw: st.DrawFn, cpus: tuple[int, ...], busy: frozenset[int], steps: int
) -> tuple[UsageSample, ...]:
    """Samples every second up to NOW of a job that keeps ``busy`` of its ``cpus`` busy: each
    busy core 0.9..1.0, each idle one 0..0.05 (its daemons); the total is their sum, as
    cpuacct reports it. (Busier contention, every busy core read near 0.75 for the whole
    window, is indistinguishable from threads floating over one core more: the total then
    lends that core and the guard's PSI rule is what protects the job.)"""
    out = []
    for k in range(steps):
        shares = tuple(
            (cpu, draw(st.floats(0.9, 1.0) if cpu in busy else st.floats(0.0, 0.05)))
            for cpu in cpus
        )
        total = sum(share for _, share in shares)
        out.append(UsageSample(NOW - steps + 1 + k, total, GIB, None, None, shares))
    return tuple(out)


@pytest.mark.parametrize("name", LENDING)
@FAST
@given(data=st.data(), n=st.sampled_from([2, 4, 8]))
def test_a_job_keeping_k_of_n_cores_busy_lends_its_n_minus_k_idle_ones(
    name: str, data: st.DataObject, n: int
) -> None:
    cpus = tuple(range(n))
    k = data.draw(st.integers(1, n))
    busy = frozenset(data.draw(st.permutations(cpus))[:k])  # any k cores, not the lowest ids
    job = JobView("j", frozenset(cpus), 8 * GIB, GIB, data.draw(busy_series(cpus, busy, 20)))
    node = NodeView("n1", frozenset(cpus), 64 * GIB, (job,))
    limits = Limits(**BARE_CAP)
    offer = get_policy(name).decide(node, limits, NOW).offer
    assert offer.cpu_ids == frozenset(cpus) - busy


def noisy_steady(seed: int, level: float, steps: int) -> tuple[float, ...]:
    """A steady job's ``cores_used`` as a 1 s window reads it on a shared machine: mostly a
    little below its level (other work takes the core), one reading in ten above it by 0.3 to
    0.6 core (a preempted sampler, a burst of its daemons), never two such in a row."""
    rng = random.Random(seed)
    values: list[float] = []
    for _ in range(steps):
        spike = rng.random() < 0.1 and not (values and values[-1] > level)
        values.append(level + (rng.uniform(0.31, 0.6) if spike else -rng.uniform(0, 0.2)))
    return tuple(values)


@pytest.mark.parametrize("name", LENDING)
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32), level=st.sampled_from([0.5, 1.0, 3.0]))
def test_a_steady_noisy_job_never_loses_its_lease_to_cpu_growth(
    name: str, seed: int, level: float
) -> None:
    """The guard driven like the agent drives it, 240 one-second decisions with the state
    carried over, over a noisy steady series, with a lease on the job's last core (granted
    when it was quieter): no ``cpu_growth`` eviction, ever. (benchmarks/lending.py shows the
    same on the live cluster.)"""
    n = 4
    limits = Limits(**BARE_CAP, history_window_s=60.0)
    policy = get_policy(name)
    start = NOW - 400
    history: tuple[UsageSample, ...] = ()
    state: object | None = None
    leases = (LeaseView("L", frozenset({n - 1}), GIB, start, start + 1e6),)
    for step, used in enumerate(noisy_steady(seed, level, 240)):
        t = start + step
        history = (*history, UsageSample(t, used, GIB))[-60:]
        job = JobView("j", frozenset(range(n)), 8 * GIB, GIB, history, True, start - 60)
        node = NodeView("n1", frozenset(range(n)), 64 * GIB, (job,), leases)
        decision = policy.decide(node, limits, t, state)
        state = decision.state
        assert decision.evictions == (), (
            f"step {step}: {used:.2f} cores after {[round(x.cores_used, 2) for x in history[-4:-1]]}"
        )


@pytest.mark.parametrize("name", LENDING)
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**32), at=st.integers(5, 100))
def test_a_job_that_turns_its_lent_core_on_gets_it_back_in_cpu_growth_samples(
    name: str, seed: int, at: int
) -> None:
    """The same noisy job at 1 core of 2, lease on the other; from step ``at`` on it uses
    both: the lease goes (``cpu_growth``) within ``cpu_growth_samples`` samples."""
    limits = Limits(**BARE_CAP, history_window_s=60.0)
    policy = get_policy(name)
    start = NOW - 400
    history: tuple[UsageSample, ...] = ()
    state: object | None = None
    leases = (LeaseView("L", frozenset({1}), GIB, start, start + 1e6),)
    values = noisy_steady(seed, 1.0, at)
    for step in range(at + 10):
        t = start + step
        used = values[step] if step < at else 1.5  # its 2nd thread shares the lent core
        history = (*history, UsageSample(t, used, GIB))[-60:]
        job = JobView("j", frozenset({0, 1}), 8 * GIB, GIB, history, True, start - 60)
        decision = policy.decide(
            NodeView("n1", frozenset({0, 1}), 64 * GIB, (job,), leases), limits, t, state
        )
        state = decision.state
        if decision.evictions:
            assert [e.reason for e in decision.evictions] == [EvictionReason.CPU_GROWTH]
            # never before it grew, at most cpu_growth_samples - 1 samples after (sooner
            # when a noise spike happened to come right before the growth)
            assert at <= step <= at + limits.cpu_growth_samples - 1
            return
    raise AssertionError("the lease on the core the job took back was never evicted")


@st.composite
def one_core_samples(draw: st.DrawFn, cpu: int) -> tuple[UsageSample, ...]:
    """1-6 samples of a one-core job: any use, waiting time, pressure and per-core share."""
    times = sorted(draw(st.lists(st.floats(NOW - 400, NOW), min_size=1, max_size=6)))
    share = st.floats(0, 1)
    return tuple(
        UsageSample(
            t,
            draw(share),
            GIB,
            draw(st.one_of(st.none(), st.floats(0, 100))),
            None,
            draw(st.sampled_from([(), ((cpu, 0.0),), ((cpu, 1.0),), ((cpu, 0.15),)])),
            draw(st.sampled_from([0.0, 0.1, 0.5, 3.0])),
        )
        for t in times
    )


@FAST
@given(
    cpu=st.integers(0, 7),
    data=st.data(),
    used=st.floats(0, 4),
    limits=limits_strategy,
    idle_core_busy=st.sampled_from([0.0, 0.2, 0.9]),
)
def test_a_one_core_job_keeps_its_core_unless_a_lease_holds_it(
    cpu: int, data: st.DataObject, used: float, limits: Limits, idle_core_busy: float
) -> None:
    """Oracle for ``harvest``'s shortcut: a one-core job with no leased core keeps its core
    without ``cores_to_keep`` being asked (most decisions of nodes full of serial jobs; the
    sizer still runs, for memory). The general rule must say the same for any samples
    (with and without per-core shares), use and limits: at least one core, none to lend."""
    recent = data.draw(one_core_samples(cpu))
    tuned = Limits(**{**limits.model_dump(), "idle_core_busy": idle_core_busy})
    assert cores_to_keep(recent, used, frozenset({cpu}), frozenset(), tuned) >= 1
