"""Lease accounting: placement, capacity, expiry and soft-state reconciliation."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.leasebook import LeaseBook, LeaseEnd, LeaseRecord

GiB = 1024**3
NOW = 1_000_000.0


def book_with(*nodes: tuple[str, int, int], timeout: float = 10.0) -> LeaseBook:
    book = LeaseBook(node_timeout_s=timeout)
    for name, cores, memory in nodes:
        book.report(name, f"http://{name}", range(cores), memory, [], generation=0, now=NOW)
    return book


def grant(
    book: LeaseBook, lease_id: str, cores: int, memory: int, placement: str = "best_fit"
) -> LeaseRecord:
    slot = book.place(cores, memory, NOW, placement)  # type: ignore[arg-type]
    assert slot is not None, f"{lease_id} should fit"
    record = LeaseRecord(lease_id, slot.node, slot.cpu_ids, memory, NOW, NOW + 60)
    book.add(record)
    return record


def test_best_fit_packs_onto_the_tightest_node_first_fit_takes_the_first() -> None:
    # "a" has room for 4 cores, "b" only for 2: a 2-core lease fits both.
    best = book_with(("a", 4, 8 * GiB), ("b", 2, 8 * GiB))
    first = book_with(("a", 4, 8 * GiB), ("b", 2, 8 * GiB))
    assert grant(best, "l1", 2, GiB, "best_fit").node == "b"
    assert grant(first, "l1", 2, GiB, "first_fit").node == "a"
    # Afterwards best fit can still serve a 4-core request; first fit cannot.
    assert best.place(4, GiB, NOW, "best_fit") is not None
    assert first.place(4, GiB, NOW, "first_fit") is None


def test_excluded_nodes_are_skipped() -> None:
    book = book_with(("a", 4, 8 * GiB), ("b", 2, 8 * GiB))
    slot = book.place(1, GiB, NOW, "best_fit", exclude=frozenset({"b"}))
    assert slot is not None and slot.node == "a"
    assert book.place(1, GiB, NOW, "first_fit", exclude=frozenset({"a", "b"})) is None


def test_best_fit_breaks_core_ties_by_leftover_memory() -> None:
    book = book_with(("a", 2, 8 * GiB), ("b", 2, 2 * GiB))
    assert grant(book, "l1", 1, GiB).node == "b"


def test_leases_get_distinct_lowest_cores_and_capacity_runs_out() -> None:
    book = book_with(("a", 3, 3 * GiB))
    assert grant(book, "l1", 2, GiB).cpu_ids == (0, 1)
    assert grant(book, "l2", 1, GiB).cpu_ids == (2,)
    assert book.place(1, 0, NOW) is None
    free = book.free("a")
    assert free.cores == 0 and free.memory_bytes == GiB


def test_memory_limits_placement_even_with_free_cores() -> None:
    book = book_with(("a", 4, 2 * GiB))
    grant(book, "l1", 1, 2 * GiB)
    assert book.place(1, 1, NOW) is None
    best = book.best_available(NOW)
    assert best is not None and (best.cores, best.memory_bytes) == (3, 0)


def test_release_frees_cores_and_remembers_why() -> None:
    book = book_with(("a", 1, GiB))
    grant(book, "l1", 1, GiB)
    assert book.place(1, GiB, NOW) is None
    assert book.remove("l1", LeaseEnd.RELEASED) is not None
    assert book.ended("l1") is LeaseEnd.RELEASED
    assert book.place(1, GiB, NOW) is not None


def test_expiry_drops_only_leases_past_their_end() -> None:
    book = book_with(("a", 2, 2 * GiB))
    grant(book, "short", 1, GiB)
    book.renew("short", NOW + 5)
    grant(book, "long", 1, GiB)
    assert [r.lease_id for r in book.expire(NOW + 4.9)] == []
    assert [r.lease_id for r in book.expire(NOW + 5)] == ["short"]
    assert book.ended("short") is LeaseEnd.EXPIRED
    assert [r.lease_id for r in book.leases()] == ["long"]


def test_silent_node_is_not_placed_on() -> None:
    book = book_with(("a", 2, GiB), timeout=10)
    assert book.place(1, 0, NOW + 10) is not None
    assert book.place(1, 0, NOW + 10.1) is None
    assert book.best_available(NOW + 11) is None


def test_restarted_book_learns_live_leases_from_reports() -> None:
    live = LeaseRecord("l1", "a", (0, 1), GiB, NOW - 30, NOW + 60, "tcp://a:1", generation=3)
    book = LeaseBook()
    outcome = book.report("a", "http://a", range(4), 4 * GiB, [live], generation=5, now=NOW)
    assert outcome.learned == ("l1",)
    assert book.lease("l1") == live
    slot = book.place(2, GiB, NOW)
    assert slot is not None and slot.cpu_ids == (2, 3)
    assert book.place(3, 0, NOW) is None


def test_report_drops_confirmed_lease_the_agent_no_longer_runs() -> None:
    book = book_with(("a", 2, GiB))
    grant(book, "l1", 1, GiB)
    book.confirm("l1", "tcp://a:1", generation=4)
    # A report built before the start (generation 3) must not drop it.
    assert book.report("a", "http://a", range(2), GiB, [], generation=3, now=NOW).dropped == ()
    outcome = book.report("a", "http://a", range(2), GiB, [], generation=4, now=NOW)
    assert [r.lease_id for r in outcome.dropped] == ["l1"]
    assert book.ended("l1") is LeaseEnd.EVICTED


def test_lease_the_agent_dropped_after_its_expiry_counts_as_expired() -> None:
    book = book_with(("a", 2, GiB))
    record = grant(book, "l1", 1, GiB)
    book.confirm("l1", "tcp://a:1", generation=1)
    book.report("a", "http://a", range(2), GiB, [], generation=2, now=record.expires_at + 0.1)
    assert book.ended("l1") is LeaseEnd.EXPIRED


def test_restarted_agent_counter_starting_over_still_drops_its_old_leases() -> None:
    book = LeaseBook()
    book.report("a", "http://a", range(2), GiB, [], generation=0, now=NOW, instance="first")
    grant(book, "l1", 1, GiB)
    book.confirm("l1", "tcp://a:1", generation=40)
    book.report("a", "http://a", range(2), GiB, [], generation=39, now=NOW, instance="first")
    assert book.lease("l1") is not None  # same agent, older report: kept
    outcome = book.report(
        "a", "http://a:2", range(2), GiB, [], generation=1, now=NOW, instance="second"
    )
    assert [r.lease_id for r in outcome.dropped] == ["l1"]
    assert book.ended("l1") is LeaseEnd.EVICTED


def test_report_keeps_a_lease_still_being_started() -> None:
    book = book_with(("a", 2, GiB))
    grant(book, "pending", 1, GiB)
    book.report("a", "http://a", range(2), GiB, [], generation=99, now=NOW)
    assert book.lease("pending") is not None
    assert book.free("a").cpu_ids == (1,)


def test_shrunk_offer_never_shows_negative_memory() -> None:
    book = book_with(("a", 2, 2 * GiB))
    grant(book, "l1", 1, 2 * GiB)
    book.report("a", "http://a", range(2), GiB, book.leases(), generation=0, now=NOW)
    assert book.free("a").memory_bytes == 0


def test_overlapping_lease_is_refused() -> None:
    book = book_with(("a", 2, GiB))
    grant(book, "l1", 1, 0)
    with pytest.raises(ValueError, match="already leased"):
        book.add(LeaseRecord("l2", "a", (0,), 0, NOW, NOW + 1))


def test_bad_request_shapes_are_refused() -> None:
    book = book_with(("a", 2, GiB))
    with pytest.raises(ValueError):
        book.place(0, 0, NOW)
    with pytest.raises(ValueError, match="unknown placement"):
        book.place(1, 0, NOW, "worst_fit")  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(
    nodes=st.lists(st.tuples(st.integers(1, 8), st.integers(0, 16)), min_size=1, max_size=5),
    requests=st.lists(st.tuples(st.integers(1, 4), st.integers(0, 8), st.booleans()), max_size=30),
    placement=st.sampled_from(["first_fit", "best_fit"]),
)
def test_never_overcommits(
    nodes: list[tuple[int, int]], requests: list[tuple[int, int, bool]], placement: str
) -> None:
    book = LeaseBook()
    for i, (cores, memory) in enumerate(nodes):
        book.report(f"n{i}", "", range(cores), memory * GiB, [], generation=0, now=NOW)
    for i, (cores, memory, release_one) in enumerate(requests):
        slot = book.place(cores, memory * GiB, NOW, placement)  # type: ignore[arg-type]
        fits_somewhere = any(
            f.cores >= cores and f.memory_bytes >= memory * GiB for f in book.available(NOW)
        )
        assert (slot is not None) == fits_somewhere
        if slot is not None:
            book.add(LeaseRecord(f"l{i}", slot.node, slot.cpu_ids, memory * GiB, NOW, NOW + 1))
        if release_one and book.leases():
            book.remove(book.leases()[0].lease_id, LeaseEnd.RELEASED)
        for j, (cores_n, memory_n) in enumerate(nodes):
            held = book.leases(f"n{j}")
            cpus = [c for r in held for c in r.cpu_ids]
            assert len(cpus) == len(set(cpus)) and set(cpus) <= set(range(cores_n))
            assert sum(r.memory_bytes for r in held) <= memory_n * GiB
