"""Lease accounting: which node offers what, which leases hold what, where a new lease goes.

Pure and deterministic (no I/O, no clock: ``now`` is an argument) so the broker, the node
agent's admission check and a trace replay all use the same book.

Soft state: the agents are the truth about their node. :meth:`LeaseBook.report` replaces a
node's offer and reconciles its leases with what the agent says runs there: leases the
agent reports are (re)learned, which is how a restarted broker finds the live leases again,
and confirmed leases the agent no longer reports are dropped as evicted. A lease the book
placed but the agent has not yet started (``generation is None``) survives reports, so a
report racing with a grant never frees cores twice; ``generation`` is the agent's change
counter, so a report older than the agent's answer to a start cannot drop the lease either.

Units: seconds (epoch, as given by the caller), bytes, cores; core ids are kernel CPU numbers.
"""

from __future__ import annotations

import bisect
import enum
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Literal

Placement = Literal["first_fit", "best_fit"]
PLACEMENTS: tuple[Placement, ...] = ("first_fit", "best_fit")


class LeaseEnd(enum.StrEnum):
    """Why a lease left the book (kept briefly so a late renew gets a precise error)."""

    RELEASED = "released"
    EXPIRED = "expired"
    EVICTED = "evicted"
    START_FAILED = "start_failed"


@dataclass(frozen=True, slots=True)
class NodeOffer:
    """What a node lets functions occupy now, its own leases included.

    ``reported_at`` is when the book last heard from the node's agent; ``url`` is the
    agent's control API (opaque here).
    """

    node: str
    url: str
    cpu_ids: frozenset[int]
    memory_bytes: int
    reported_at: float
    instance: str = ""  # changes when the agent restarts


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    """One lease. ``address`` is empty and ``generation`` None until the agent started it."""

    lease_id: str
    node: str
    cpu_ids: tuple[int, ...]
    memory_bytes: int
    granted_at: float
    expires_at: float
    address: str = ""
    generation: int | None = None

    @property
    def cores(self) -> int:
        return len(self.cpu_ids)


@dataclass(frozen=True, slots=True)
class Free:
    """Unleased capacity of one node: cores (ids) and bytes."""

    node: str
    cpu_ids: tuple[int, ...]
    memory_bytes: int

    @property
    def cores(self) -> int:
        return len(self.cpu_ids)


@dataclass(frozen=True, slots=True)
class Slot:
    """Where a new lease fits: the node and the cores it gets."""

    node: str
    cpu_ids: tuple[int, ...]
    memory_bytes: int


@dataclass(frozen=True, slots=True)
class ReportOutcome:
    """What a report changed: leases learned (unknown before) and leases dropped."""

    learned: tuple[str, ...]
    dropped: tuple[LeaseRecord, ...]


class LeaseBook:
    """Nodes' offers and the leases on them. Not thread-safe: one owner drives it.

    ``node_timeout_s``: a node silent for longer is not placed on (its leases stay until
    they expire or the agent reports again). ``tombstones``: how many ended leases to
    remember for error messages.
    """

    def __init__(self, node_timeout_s: float = 10.0, tombstones: int = 4096) -> None:
        self.node_timeout_s = node_timeout_s
        self._offers: dict[str, NodeOffer] = {}
        self._leases: dict[str, LeaseRecord] = {}
        self._ended: dict[str, LeaseEnd] = {}
        self._tombstones = tombstones
        # Indexes, so a report or a placement does not scan every lease (issue 13): the
        # leases of each node, each node's free capacity (dropped when the node's offer or
        # leases change) and the node names in order.
        self._by_node: dict[str, dict[str, LeaseRecord]] = {}
        self._free: dict[str, Free] = {}
        self._names: list[str] | None = None
        # The index of free capacity best_fit places from (no scan of every node): for each
        # count of free cores, the nodes with that many as (free memory, name), sorted; what
        # each node is indexed as; the nodes changed since (re-indexed before a placement).
        self._by_cores: dict[int, list[tuple[int, str]]] = {}
        self._indexed: dict[str, tuple[int, int]] = {}
        self._dirty: set[str] = set()

    def _changed(self, node: str) -> None:
        """``node``'s free capacity may have changed: drop the cache, re-index it later."""
        self._free.pop(node, None)
        self._dirty.add(node)

    def _reindex(self) -> None:
        for node in self._dirty:
            old = self._indexed.pop(node, None)
            if old is not None:
                bucket = self._by_cores[old[0]]
                del bucket[bisect.bisect_left(bucket, (old[1], node))]
                if not bucket:
                    del self._by_cores[old[0]]
            if node in self._offers:
                free = self.free(node)
                bisect.insort(self._by_cores.setdefault(free.cores, []), (free.memory_bytes, node))
                self._indexed[node] = (free.cores, free.memory_bytes)
        self._dirty.clear()

    def _put(self, record: LeaseRecord) -> None:
        old = self._leases.get(record.lease_id)
        if old is not None and old.node != record.node:
            self._by_node.get(old.node, {}).pop(record.lease_id, None)
            self._changed(old.node)
        self._leases[record.lease_id] = record
        self._by_node.setdefault(record.node, {})[record.lease_id] = record
        self._changed(record.node)

    def _pop(self, lease_id: str) -> LeaseRecord | None:
        record = self._leases.pop(lease_id, None)
        if record is not None:
            on_node = self._by_node.get(record.node)
            if on_node is not None:
                on_node.pop(lease_id, None)
                if not on_node:
                    del self._by_node[record.node]
            self._changed(record.node)
        return record

    def _sorted_names(self) -> list[str]:
        if self._names is None:
            self._names = sorted(self._offers)
        return self._names

    # --- reading -----------------------------------------------------------------------

    def nodes(self) -> list[NodeOffer]:
        return [self._offers[n] for n in self._sorted_names()]

    def node(self, node: str) -> NodeOffer | None:
        return self._offers.get(node)

    def leases(self, node: str | None = None) -> list[LeaseRecord]:
        """Leases, oldest grant first; only ``node``'s when given."""
        found = self._leases.values() if node is None else self._by_node.get(node, {}).values()
        return sorted(found, key=lambda r: (r.granted_at, r.lease_id))

    def lease(self, lease_id: str) -> LeaseRecord | None:
        return self._leases.get(lease_id)

    def ended(self, lease_id: str) -> LeaseEnd | None:
        """Why ``lease_id`` left the book, if it did recently."""
        return self._ended.get(lease_id)

    def is_alive(self, node: str, now: float) -> bool:
        offer = self._offers.get(node)
        return offer is not None and now - offer.reported_at <= self.node_timeout_s

    def free(self, node: str) -> Free:
        """Offered minus leased, for one node (zero for an unknown node).

        Leases beyond the offer (the offer shrank) make free memory zero, not negative.
        """
        cached = self._free.get(node)
        if cached is not None:
            return cached
        offer = self._offers.get(node)
        if offer is None:
            return Free(node, (), 0)
        used_cpus: set[int] = set()
        used_memory = 0
        for record in self._by_node.get(node, {}).values():
            used_cpus.update(record.cpu_ids)
            used_memory += record.memory_bytes
        free = Free(
            node, tuple(sorted(offer.cpu_ids - used_cpus)), max(0, offer.memory_bytes - used_memory)
        )
        self._free[node] = free
        return free

    def available(self, now: float) -> list[Free]:
        """Free capacity of every live node, by name."""
        timeout, offers = self.node_timeout_s, self._offers
        return [
            self.free(n) for n in self._sorted_names() if now - offers[n].reported_at <= timeout
        ]

    # --- placement ---------------------------------------------------------------------

    def place(
        self,
        cores: int,
        memory_bytes: int,
        now: float,
        placement: Placement = "best_fit",
        exclude: frozenset[str] = frozenset(),
    ) -> Slot | None:
        """A node and cores for a lease of ``cores`` and ``memory_bytes``, or None.

        ``first_fit``: the first live node by name that fits. ``best_fit``: the fitting node
        left with the fewest free cores, then the least free memory (packs leases, keeps
        whole nodes free for large requests). Within a node the lowest free core ids go.
        Nodes in ``exclude`` are skipped (e.g. one whose agent just failed to start a lease).
        """
        if cores < 1 or memory_bytes < 0:
            raise ValueError("a lease needs at least one core and non-negative memory")
        if placement == "best_fit":  # from the index: fewest free cores, then least memory
            self._reindex()
            for free_cores in sorted(k for k in self._by_cores if k >= cores):
                bucket = self._by_cores[free_cores]
                for i in range(bisect.bisect_left(bucket, (memory_bytes, "")), len(bucket)):
                    node = bucket[i][1]
                    if node not in exclude and self.is_alive(node, now):
                        return Slot(node, self.free(node).cpu_ids[:cores], memory_bytes)
            return None
        fitting = [
            f
            for f in self.available(now)
            if f.node not in exclude and f.cores >= cores and f.memory_bytes >= memory_bytes
        ]
        if placement != "first_fit":
            raise ValueError(f"unknown placement {placement!r}; known: {', '.join(PLACEMENTS)}")
        if not fitting:
            return None
        chosen = fitting[0]  # (first_fit scans the nodes by name)
        return Slot(chosen.node, chosen.cpu_ids[:cores], memory_bytes)

    def best_available(self, now: float) -> Free | None:
        """The live node with the most free cores (then memory): what a denial reports."""
        self._reindex()
        for free_cores in sorted(self._by_cores, reverse=True):
            for _, node in reversed(self._by_cores[free_cores]):
                if self.is_alive(node, now):
                    return self.free(node)
        return None

    # --- changing ----------------------------------------------------------------------

    def add(self, record: LeaseRecord) -> None:
        """Book a lease (the broker does this before asking the agent, so cores are taken).

        ValueError if the lease overlaps the cores of another lease on the node.
        """
        if record.lease_id in self._leases:
            raise ValueError(f"lease {record.lease_id} is already booked")
        taken = {c for r in self._by_node.get(record.node, {}).values() for c in r.cpu_ids}
        overlap = taken.intersection(record.cpu_ids)
        if overlap:
            raise ValueError(f"cores {sorted(overlap)} of node {record.node} are already leased")
        self._put(record)
        self._ended.pop(record.lease_id, None)

    def confirm(self, lease_id: str, address: str, generation: int) -> LeaseRecord | None:
        """The agent started the lease's executor at ``address``; None if the lease is gone."""
        record = self._leases.get(lease_id)
        if record is None:
            return None
        record = replace(record, address=address, generation=generation)
        self._put(record)
        return record

    def renew(self, lease_id: str, expires_at: float) -> LeaseRecord | None:
        record = self._leases.get(lease_id)
        if record is None:
            return None
        record = replace(record, expires_at=expires_at)
        self._put(record)
        return record

    def remove(self, lease_id: str, why: LeaseEnd) -> LeaseRecord | None:
        """Take a lease out of the book and remember why; None if it was not there."""
        record = self._pop(lease_id)
        if record is not None:
            self._remember(lease_id, why)
        return record

    def forget(self, lease_id: str, why: LeaseEnd) -> None:
        """Remember that ``lease_id``, never booked here (another broker granted it), ended:
        a later report of it is then answered as for a lease that ended here."""
        if lease_id not in self._leases:
            self._remember(lease_id, why)

    def expire(self, now: float) -> list[LeaseRecord]:
        """Drop and return the leases whose expiry is at or before ``now``."""
        gone = [r for r in self._leases.values() if r.expires_at <= now]
        for record in gone:
            self.remove(record.lease_id, LeaseEnd.EXPIRED)
        return gone

    def report(
        self,
        node: str,
        url: str,
        cpu_ids: Iterable[int],
        memory_bytes: int,
        leases: Iterable[LeaseRecord],
        generation: int,
        now: float,
        instance: str = "",
    ) -> ReportOutcome:
        """Replace ``node``'s offer and reconcile its leases with the agent's list.

        ``generation`` is the agent's change counter when it built the report. Reported
        leases are taken as they are (the agent knows their cores, address and expiry);
        booked leases missing from the report are dropped (as expired if past their expiry,
        else as evicted) only if the agent had confirmed them at a generation this report
        includes, or if the agent restarted (``instance`` changed: its counter started over
        and its executors are gone).
        """
        previous = self._offers.get(node)
        restarted = previous is not None and previous.instance != instance
        if previous is None:
            self._names = None
        self._offers[node] = NodeOffer(node, url, frozenset(cpu_ids), memory_bytes, now, instance)
        self._changed(node)
        reported = {r.lease_id: r for r in leases}
        learned: list[str] = []
        for lease_id, record in reported.items():
            record = replace(record, node=node)
            if lease_id not in self._leases:
                # Includes a lease released here while the report was in flight: it stays
                # booked (its cores are still taken) until the agent reports it gone.
                learned.append(lease_id)
            self._put(record)
            self._ended.pop(lease_id, None)
        dropped: list[LeaseRecord] = []
        for record in list(self._by_node.get(node, {}).values()):
            if record.lease_id in reported:
                continue
            if record.generation is not None and (restarted or record.generation <= generation):
                # Gone past its expiry: the agent expired it, not evicted it.
                why = LeaseEnd.EXPIRED if record.expires_at <= now else LeaseEnd.EVICTED
                self.remove(record.lease_id, why)
                dropped.append(record)
        return ReportOutcome(tuple(learned), tuple(dropped))

    def touch(self, node: str, instance: str, now: float) -> bool:
        """A heartbeat: the agent's offer and leases did not change since its last report.
        True when the book holds that report (same agent run): the node stays alive; False
        when the agent must send its full report (unknown node, or the agent restarted)."""
        offer = self._offers.get(node)
        if offer is None or offer.instance != instance:
            return False
        self._offers[node] = replace(offer, reported_at=now)  # free capacity is unchanged
        return True

    def forget_node(self, node: str) -> list[LeaseRecord]:
        """Remove a node and its leases (they end as evicted); returns the leases."""
        if self._offers.pop(node, None) is not None:
            self._names = None
        self._changed(node)
        gone = list(self._by_node.get(node, {}).values())
        for record in gone:
            self.remove(record.lease_id, LeaseEnd.EVICTED)
        return gone

    def _remember(self, lease_id: str, why: LeaseEnd) -> None:
        self._ended[lease_id] = why
        while len(self._ended) > self._tombstones:
            self._ended.pop(next(iter(self._ended)))
