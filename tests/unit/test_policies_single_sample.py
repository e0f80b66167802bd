"""Oracle for the lending policies' one-sample shortcut (the replay's common case).

A job whose history holds one sample skips the window search (``policies.headroom.harvest``);
the plain path is what the same job gets when an older sample, outside the window, comes
before that one: the search then leaves the same single sample, and every decision must be
the same either way. A window of one sample skips the peak pass (``sustained_peak``): it
must give what the sample wants, used plus waiting.
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from policies import POLICIES, JobView, LeaseView, Limits, NodeView, UsageSample
from policies.headroom import sustained_peak

GIB = 1024**3
NOW = 10_000.0
CORES = 8


def _sample(rng: random.Random, t: float, cpus: list[int]) -> UsageSample:
    busy = tuple((c, round(rng.random(), 2)) for c in cpus) if rng.random() < 0.3 else ()
    pressured = rng.random() < 0.2
    return UsageSample(
        t,
        round(rng.uniform(0.0, len(cpus)), 2),
        rng.randrange(0, 4 * GIB),
        rng.uniform(0.0, 60.0) if pressured else None,
        None,
        busy,
        rng.choice([0.0, 0.0, 0.5, 2.0]),
    )


def _nodes(rng: random.Random, limits: Limits) -> tuple[NodeView, NodeView]:
    """A node whose jobs have one sample each, and the same node with an older sample
    before each (outside the window): the shortcut's input and the plain path's."""
    free = list(range(CORES))
    rng.shuffle(free)
    short, plain = [], []
    for j in range(rng.randint(1, 3)):
        n = rng.randint(1, max(1, len(free) - (2 - j)))
        cpus, free = free[:n], free[n:]
        t = NOW - rng.choice([0.0, 5.0, 30.0, 2 * limits.history_window_s])
        latest = _sample(rng, t, cpus)
        old = UsageSample(
            t - limits.history_window_s - 1.0, 0.0, latest.memory_used_bytes, None, None, (), 0.0
        )
        job = JobView(
            f"j{j}",
            frozenset(cpus),
            4 * GIB,
            rng.randrange(0, 4 * GIB),
            (latest,),
            rng.random() < 0.9,
            NOW - rng.choice([10.0, 100.0, 5000.0]),
        )
        short.append(job)
        plain.append(replace(job, history=(old, latest)))
        if not free:
            break
    leases: tuple[LeaseView, ...] = ()
    if rng.random() < 0.5:
        lent = frozenset(rng.sample(range(CORES), rng.randint(1, 3)))
        leases = (LeaseView("l1", lent, rng.randrange(0, GIB), NOW - 100.0, NOW + 600.0),)
    node = NodeView("n", frozenset(range(CORES)), 16 * GIB, tuple(short), leases, GIB)
    return node, NodeView("n", node.cpu_ids, 16 * GIB, tuple(plain), leases, GIB)


@pytest.mark.parametrize("name", ["headroom", "predictive"])
@pytest.mark.parametrize("samples", [1, 2, 3])
def test_one_sample_shortcut_decides_as_the_plain_path(name: str, samples: int) -> None:
    rng = random.Random(f"{name}-{samples}")
    limits = Limits(cpu_growth_samples=samples, history_window_s=60.0, min_history_s=30.0)
    policy = POLICIES[name]()
    lent = 0
    for _ in range(400):
        short, plain = _nodes(rng, limits)
        got = policy.decide(short, limits, NOW, None)
        assert got == policy.decide(plain, limits, NOW, None)
        # and again with the state carried, as a driver does
        assert policy.decide(short, limits, NOW + 1, got.state) == policy.decide(
            plain, limits, NOW + 1, got.state
        )
        lent += bool(got.offer.cpu_ids - (short.cpu_ids - _allocated(short)))
    assert lent > 40  # the lending path ran, not only the unallocated one


def _allocated(node: NodeView) -> frozenset[int]:
    return frozenset().union(*(job.cpu_ids for job in node.jobs))


@pytest.mark.parametrize("samples", [1, 2, 3])
def test_sustained_peak_of_one_sample_is_what_it_wants(samples: int) -> None:
    limits = Limits(cpu_growth_samples=samples)
    rng = random.Random(samples)
    for _ in range(200):
        s = _sample(rng, NOW, [0, 1, 2, 3])
        assert sustained_peak((s,), limits) == s.cores_used + s.cores_waiting
