"""``growth_suspected``: when the agent takes the confirming sample of a job's growth sooner.

Pure: the same rule as ``growth_confirmed`` (issue 15), asked one sample early.
"""

from __future__ import annotations

from policies import EvictionReason, JobView, LeaseView, Limits, NodeView, UsageSample, get_policy
from policies.headroom import growth_suspected

GIB = 1024**3
NOW = 1000.0


def _history(*wanted: float, step: float = 1.0) -> tuple[UsageSample, ...]:
    """A minute at one busy core of two, then ``wanted`` cores, one sample each ``step`` s."""
    steady = tuple(
        UsageSample(NOW - 60 - len(wanted) * step + k, 0.98, GIB, None, None, ((0, 0.98), (1, 0.0)))
        for k in range(60)
    )
    tail = tuple(
        UsageSample(NOW - (len(wanted) - 1 - i) * step, w, GIB, None, None, ((0, 1.0), (1, w - 1)))
        for i, w in enumerate(wanted)
    )
    return steady + tail


def _node(history: tuple[UsageSample, ...], leased: bool = True, **job: object) -> NodeView:
    view = JobView("j", frozenset({0, 1}), 4 * GIB, GIB, history, True, NOW - 120)
    if job:
        view = JobView(**{**{f: getattr(view, f) for f in view.__slots__}, **job})  # type: ignore[arg-type]
    leases = (LeaseView("L", frozenset({1}), GIB, NOW - 60, NOW + 600),) if leased else ()
    return NodeView("n1", frozenset({0, 1}), 8 * GIB, (view,), leases)


def test_one_sample_over_the_margin_is_suspected_not_confirmed() -> None:
    node = _node(_history(1.6))
    assert growth_suspected(node, Limits(), NOW)
    # the policy's meaning is unchanged: one sample takes nothing back
    assert get_policy("headroom").decide(node, Limits(), NOW).evictions == ()


def test_the_confirming_sample_a_quarter_second_later_takes_the_core_back() -> None:
    node = _node(_history(1.6, 1.7, step=0.25))
    decision = get_policy("headroom").decide(node, Limits(), NOW)
    assert {e.lease_id: e.reason for e in decision.evictions} == {"L": EvictionReason.CPU_GROWTH}
    assert not growth_suspected(node, Limits(), NOW)  # confirmed: nothing left to suspect


def test_noise_within_the_margin_is_not_suspected() -> None:
    # 1.29 wanted with one core kept: under kept + cpu_growth_margin (1.3)
    assert not growth_suspected(_node(_history(1.29)), Limits(), NOW)
    # a reading over it that the next one did not confirm: back to steady, nothing suspected
    assert not growth_suspected(_node(_history(1.6, 1.0)), Limits(), NOW)


def test_only_jobs_whose_cores_leases_hold_are_watched() -> None:
    history = _history(1.6)
    assert not growth_suspected(_node(history, leased=False), Limits(), NOW)
    assert not growth_suspected(_node(history, colocate=False), Limits(), NOW)
    assert not growth_suspected(_node(history, start_time=NOW - 10), Limits(), NOW)  # too young
    # with a wider margin the same reading is noise
    assert not growth_suspected(_node(history), Limits(cpu_growth_margin=0.7), NOW)


def test_a_rule_of_three_samples_stays_suspected_until_the_third() -> None:
    limits = Limits(cpu_growth_samples=3)
    assert growth_suspected(_node(_history(1.6, 1.6, step=0.25)), limits, NOW)
    assert not growth_suspected(_node(_history(1.6, 1.6, 1.6, step=0.25)), limits, NOW)
