"""The lease book's indexes (leases per node, cached free capacity, sorted names) never
disagree with the leases themselves, whatever order reports, grants and ends come in."""

from __future__ import annotations

import random

import pytest

from policies.leasebook import Free, LeaseBook, LeaseEnd, LeaseRecord

GIB = 1024**3


def brute_free(book: LeaseBook, node: str) -> Free:
    offer = book.node(node)
    if offer is None:
        return Free(node, (), 0)
    held = [r for r in book.leases() if r.node == node]
    cpus = set(offer.cpu_ids) - {c for r in held for c in r.cpu_ids}
    return Free(
        node, tuple(sorted(cpus)), max(0, offer.memory_bytes - sum(r.memory_bytes for r in held))
    )


def brute_place(book: LeaseBook, cores: int, memory: int, now: float) -> str | None:
    fitting = [
        brute_free(book, o.node) for o in book.nodes() if now - o.reported_at <= book.node_timeout_s
    ]
    fitting = [f for f in fitting if f.cores >= cores and f.memory_bytes >= memory]
    if not fitting:
        return None
    return min(fitting, key=lambda f: (f.cores - cores, f.memory_bytes - memory, f.node)).node


@pytest.mark.parametrize("seed", range(20))
def test_indexes_agree_with_the_leases(seed: int) -> None:
    rng = random.Random(seed)
    book = LeaseBook(node_timeout_s=5.0)
    nodes = [f"n{i}" for i in range(6)]
    now = 100.0
    serial = 0
    for _ in range(300):
        now += rng.uniform(0, 1.5)
        op = rng.random()
        node = rng.choice(nodes)
        mine = book.leases(node)
        if op < 0.06:  # a heartbeat: nothing changed on the node
            book.touch(node, "", now)
        elif op < 0.3:  # the agent reports: some of its leases, perhaps one the book never saw
            kept = [r for r in mine if rng.random() < 0.8]
            free_cpus = sorted(set(range(4)) - {c for r in kept for c in r.cpu_ids})
            if free_cpus and rng.random() < 0.2:
                serial += 1
                kept.append(
                    LeaseRecord(
                        f"r{serial}", node, (free_cpus[0],), GIB // 4, now, now + 20, "tcp://a", 1
                    )
                )
            gen = max([r.generation or 0 for r in mine] + [0]) + rng.randint(0, 1)
            book.report(
                node,
                f"http://{node}",
                range(rng.choice([2, 4])),
                rng.choice([2, 8]) * GIB,
                kept,
                gen,
                now,
            )
        elif op < 0.55:
            slot = book.place(rng.randint(1, 2), rng.choice([0, GIB]), now)
            if slot is not None:
                serial += 1
                book.add(
                    LeaseRecord(
                        f"l{serial}",
                        slot.node,
                        slot.cpu_ids,
                        slot.memory_bytes,
                        now,
                        now + rng.uniform(1, 30),
                    )
                )
        elif op < 0.7 and mine:
            r = rng.choice(mine)
            book.confirm(r.lease_id, "tcp://a", rng.randint(0, 3))
        elif op < 0.8 and mine:
            book.remove(rng.choice(mine).lease_id, LeaseEnd.RELEASED)
        elif op < 0.88 and mine:
            book.renew(rng.choice(mine).lease_id, now + rng.uniform(1, 30))
        elif op < 0.95:
            book.expire(now)
        else:
            book.forget_node(node)
        for n in nodes:
            assert book.free(n) == brute_free(book, n)
        assert [o.node for o in book.nodes()] == sorted(o.node for o in book.nodes())
        for cores, memory in ((1, 0), (2, GIB), (3, 4 * GIB)):
            slot = book.place(cores, memory, now)
            assert (slot.node if slot else None) == brute_place(book, cores, memory, now)
        live = [brute_free(book, o.node) for o in book.nodes() if book.is_alive(o.node, now)]
        best = max(live, key=lambda f: (f.cores, f.memory_bytes, f.node)) if live else None
        assert book.best_available(now) == best
