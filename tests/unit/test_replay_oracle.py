"""Oracle for the replay's hot loop: ``traces.decisions.drive_policy`` (memo shared by equal
nodes, cached job views, interned states, events grouped per node and minute) against a plain
loop written for clarity, on the same inputs. Every decision point (minute, node) must get
the same offer, the same evictions and the same lease, and the totals must match.

The plain loop decides every (minute, node) with an event or a guard follow-up on its own,
builds each job's view from its steps every time, and keeps each node's state apart.
"""

from __future__ import annotations

import heapq
import math
import random
from bisect import bisect_right
from pathlib import Path

import numpy as np
import pytest

from policies import POLICIES
from policies.limits import Limits
from policies.model import JobView, LeaseView, NodeView, UsageSample
from traces import bundled
from traces import usage as usage_module
from traces.azure import read_azure2019
from traces.decisions import END, RISE, START, Drive, Piece, Record, drive_policy, piece_steps
from traces.demand import STEP_S
from traces.interference import InterferenceModel, cpu_pressure
from traces.placement import Cluster, job_memory, place
from traces.replay import Prepared, prepare
from traces.swf import read_swf
from traces.usage import UsageModel


def plain_view(p: Piece, now: float, lease_cores: int, cpn: int, window: float) -> JobView:
    seen = max(bisect_right(p.step_t, now), 1)
    latest_t = p.step_t[seen - 1]
    history = []
    for i in range(seen):
        # a sample is kept while it is in force at or after the window's start
        in_force_until = p.step_t[i + 1] if i + 1 < seen else math.inf
        if i == seen - 1 or in_force_until > latest_t - window:
            pressure = None
            if i == seen - 1 and lease_cores:
                pressure = cpu_pressure(p.sensitivity * lease_cores / cpn)
            history.append(UsageSample(p.step_t[i], p.step_cores[i], p.step_memory[i], pressure))
    peak = max(p.step_memory[:seen])
    return JobView(p.job_id, p.cpu_ids, p.memory_allocated, peak, tuple(history), True, p.start_t)


def plain_drive(
    name: str, prep: Prepared, cluster: Cluster, limits: Limits, seed: int
) -> tuple[Drive, Record]:
    policy = POLICIES[name]()
    t_ev, node_ev, piece_ev, kind_ev = (a.tolist() for a in prep.events)
    at: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for t, n, p, k in zip(t_ev, node_ev, piece_ev, kind_ev, strict=True):
        at.setdefault((t, n), []).append((p, k))
    todo = list(at)
    heapq.heapify(todo)
    demand_c, demand_m = prep.demand.cores.tolist(), prep.demand.memory_bytes.tolist()
    minutes = len(demand_c)
    cpn = cluster.cores_per_node
    salt = random.Random(seed).randrange(1 << 30)
    grace = max(1, math.ceil(limits.pressure_grace_s / STEP_S))
    cooldown = max(1, math.ceil(limits.reoffer_cooldown_s / STEP_S))
    limit = limits.cpu_pressure_limit
    pressure_slowdown = limit / (100.0 - limit) if limit < 100.0 else math.inf
    running: list[dict[int, Piece]] = [{} for _ in range(cluster.nodes)]
    state: list[object | None] = [None] * cluster.nodes
    lease: list[tuple[LeaseView, int, bool] | None] = [None] * cluster.nodes
    offer_c, offer_m = [0] * cluster.nodes, [0] * cluster.nodes
    since = [0.0] * cluster.nodes
    cooling = [False] * cluster.nodes
    total_c = total_m = 0
    offered: dict[int, tuple[int, int]] = {}  # minute -> the cluster's offer at its end
    evict_t: list[int] = []
    decisions = 0
    violation_s = 0.0
    evicted_cores = 0
    reasons: list[str] = []
    record: Record = []
    done: set[tuple[int, int]] = set()
    serial = 0
    while todo:
        minute, node = heapq.heappop(todo)
        if (minute, node) in done:
            continue
        here = at.pop((minute, node), [])
        for p, k in here:
            if k == START:
                running[node][p] = prep.pieces(p)
            elif k == END:
                del running[node][p]
        done.add((minute, node))
        now = prep.placement.t0 + minute * STEP_S
        held = lease[node]
        if held is not None:
            violation_s += (now - since[node]) * held[1]
        lease_cores = len(held[0].cpu_ids) if held else 0
        jobs = list(running[node].values())
        views = tuple(plain_view(p, now, lease_cores, cpn, limits.history_window_s) for p in jobs)
        view = NodeView(
            str(node),
            frozenset(range(cpn)),
            cluster.memory_per_node_bytes,
            views,
            (held[0],) if held else (),
            cluster.memory_reserved_bytes,
        )
        decision = policy.decide(view, limits, now, state[node])
        decisions += 1
        state[node] = decision.state
        evicted = held is not None and any(
            e.lease_id == held[0].lease_id for e in decision.evictions
        )
        if evicted and held is not None:
            evict_t.append(minute)
            evicted_cores += len(held[0].cpu_ids)
            reasons.append(
                next(str(e.reason) for e in decision.evictions if e.lease_id == held[0].lease_id)
            )
            if limits.guard and any(e.reason.name == "PRESSURE" for e in decision.evictions):
                cooling[node] = True
        oc, om = len(decision.offer.cpu_ids), decision.offer.memory_bytes
        if (oc, om) != (offer_c[node], offer_m[node]):
            total_c += oc - offer_c[node]
            total_m += om - offer_m[node]
            offer_c[node], offer_m[node] = oc, om
        offered[minute] = (total_c, total_m)  # the last point of the minute has the last word
        cores = 0
        if oc and om and total_c > 0:
            first = jobs[0].signature[0] if jobs else -1
            draw = ((minute * 1_000_003 + first * 7919 + salt) * 2_654_435_761 % 2**32) / 2**32
            cores = int(oc * min(1.0, demand_c[minute] / total_c) + draw)
        if cores > 0:
            memory = int(om * (min(1.0, demand_m[minute] / total_m) if total_m > 0 else 0.0))
            serial += 1
            share = cores / cpn
            ids = frozenset(sorted(decision.offer.cpu_ids)[-cores:])
            lease[node] = (
                LeaseView(f"plain-{serial}", ids, memory, now, math.inf),
                sum(1 for p in jobs if p.sensitivity * share > limits.slowdown_budget),
                any(p.sensitivity * share >= pressure_slowdown for p in jobs),
            )
            cooling[node] = False
            if lease[node][2] and limits.guard and minute + grace < minutes:  # type: ignore[index]
                heapq.heappush(todo, (minute + grace, node))
        else:
            lease[node] = None
            if cooling[node] and minute + cooldown < minutes:
                heapq.heappush(todo, (minute + cooldown, node))
        # a rise's echo (its confirming sample a minute later) is decided on where a lease
        # held the node at the rise or holds it now; elsewhere the next decision sees it
        rose = any(k == RISE for _, k in here)
        if rose and (held is not None or lease[node] is not None) and minute + 1 < minutes:
            heapq.heappush(todo, (minute + 1, node))
        since[node] = now
        now_lease = lease[node]
        record.append(
            (
                minute,
                node,
                oc,
                om,
                evicted,
                len(now_lease[0].cpu_ids) if now_lease else 0,
                now_lease[0].memory_bytes if now_lease else 0,
            )
        )
    end = prep.placement.t0 + minutes * STEP_S
    for n in range(cluster.nodes):
        held = lease[n]
        if held is not None:
            violation_s += (end - since[n]) * held[1]
    drive = Drive(
        sorted(offered),
        [offered[m][0] for m in sorted(offered)],
        [offered[m][1] for m in sorted(offered)],
        evict_t,
        violation_s / 3600.0,
        evicted_cores,
        decisions,
        reasons,
    )
    return drive, record


CASES = {
    "default": (Limits(), InterferenceModel()),
    # sensitive jobs and a low pressure limit: the guard evicts, cools down, re-offers
    "guard busy": (
        Limits(cpu_pressure_limit=2.0, pressure_grace_s=60.0, reoffer_cooldown_s=180.0),
        InterferenceModel(memory_bound_fraction=0.6, memory_bound_range=(0.2, 0.4)),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_fast_loop_decides_exactly_as_the_plain_loop(name: str, case: str) -> None:
    limits, interference = CASES[case]
    cluster = Cluster(
        bundled.HPC2N_NODES, bundled.HPC2N_CORES_PER_NODE, bundled.HPC2N_MEMORY_PER_NODE
    )
    jobs = read_swf(bundled.HPC2N_EXCERPT).head(700)
    faas = read_azure2019(bundled.AZURE2019)
    seed = 5
    prep = prepare(jobs, faas, cluster, limits, UsageModel(), interference, seed, 1.0)
    fast_record: Record = []
    fast = drive_policy(
        name,
        prep.placement,
        prep.pieces,
        prep.events,
        cluster,
        limits,
        prep.demand,
        seed,
        record=fast_record,
    )
    plain, plain_record = plain_drive(name, prep, cluster, limits, seed)
    assert len(fast_record) > 1000  # a real workload, not a few idle nodes
    assert fast_record == plain_record
    assert fast.offer_t == plain.offer_t
    assert fast.offer_c == plain.offer_c
    assert fast.offer_m == plain.offer_m
    assert fast.evict_t == plain.evict_t
    assert fast.evict_reason == plain.evict_reason
    assert len(fast.evict_jobs) == len(fast.evict_t)
    assert all(fast.evict_jobs)  # every eviction is for some job
    assert fast.evicted_cores == plain.evicted_cores
    assert fast.violation_hours == pytest.approx(plain.violation_hours, rel=1e-9)
    assert fast.decisions <= plain.decisions  # equal nodes share a decision
    if case == "guard busy":
        assert plain.evict_t, "the guard case must exercise evictions"


def test_bundled_usage_shapes_make_steps(tmp_path: Path) -> None:
    """The oracle runs on jobs whose use changes over their run (not flat)."""
    cluster = Cluster(
        bundled.HPC2N_NODES, bundled.HPC2N_CORES_PER_NODE, bundled.HPC2N_MEMORY_PER_NODE
    )
    prep = prepare(
        read_swf(bundled.HPC2N_EXCERPT).head(700),
        read_azure2019(bundled.AZURE2019),
        cluster,
        Limits(),
        UsageModel(),
        InterferenceModel(),
        5,
        1.0,
    )
    steps_per_piece = (prep.steps.offsets[1:] - prep.steps.offsets[:-1]).max()
    assert steps_per_piece > 3
    # rises confirmed a minute later: their echo is a sample without an event, decided on
    # (a decision point with no event) only where a lease held the node
    assert prep.steps.echo.any()
    assert (prep.events[3] == RISE).sum() == prep.steps.echo.sum()
    record: Record = []
    drive_policy(
        "headroom", prep.placement, prep.pieces, prep.events, cluster, Limits(), prep.demand, 5,
        record=record,
    )  # fmt: skip
    with_events = set(zip(prep.events[0].tolist(), prep.events[1].tolist(), strict=True))
    echo_minutes = {
        (int(m), int(n))
        for m, n in zip(
            prep.steps.minute[prep.steps.echo],
            prep.placement.node[
                np.repeat(np.arange(prep.placement.node.size), np.diff(prep.steps.offsets))
            ][prep.steps.echo],
            strict=True,
        )
    }
    echo_decided = [(m, n) for m, n, *_ in record if (m, n) in echo_minutes - with_events]
    assert echo_decided, "echo follow-ups on leased nodes must be exercised"


def test_steps_made_a_chunk_at_a_time_equal_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """``piece_steps`` works through the job classes a chunk at a time (to spare fresh memory
    on large traces): chunks of a few steps give every piece exactly the steps of one pass."""
    cluster = Cluster(
        bundled.HPC2N_NODES, bundled.HPC2N_CORES_PER_NODE, bundled.HPC2N_MEMORY_PER_NODE
    )
    jobs = read_swf(bundled.HPC2N_EXCERPT).head(700)
    memory = job_memory(jobs, cluster)
    placement = place(jobs, cluster, memory)
    usage = UsageModel().sample(jobs, memory, 5)
    one = piece_steps(placement, usage)
    monkeypatch.setattr(usage_module, "CHUNK_STEPS", 7)
    chunked = piece_steps(placement, usage)
    assert one.minute.size > 1000
    for field in ("offsets", "minute", "cores", "memory", "echo"):
        assert np.array_equal(getattr(one, field), getattr(chunked, field)), field
