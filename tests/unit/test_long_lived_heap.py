"""The broker's garbage-collection policy: survivors of a full collection are frozen (later
collections skip them), and handed back every thaw_s so dead cycles among them are found."""

from __future__ import annotations

import gc

from colocate.broker.service import LongLivedHeap


def test_full_collection_freezes_survivors_and_thaw_hands_them_back() -> None:
    now = [0.0]
    heap = LongLivedHeap(thaw_s=600.0, clock=lambda: now[0])
    kept = [[i] for i in range(1000)]  # long-lived objects
    try:
        with heap.installed():
            assert gc.get_freeze_count() >= len(kept)  # startup's heap frozen at once
            gc.unfreeze()
            gc.collect()  # a full collection: its survivors are frozen
            assert gc.get_freeze_count() >= len(kept)
            gc.collect(0)  # a young collection freezes nothing more
            frozen = gc.get_freeze_count()
            gc.collect(0)
            assert gc.get_freeze_count() == frozen
            now[0] = 601.0
            gc.collect()  # thaw due: everything back to the collector
            assert gc.get_freeze_count() == 0
            cycle: list[object] = []
            cycle.append(cycle)
            del cycle
            assert gc.collect() >= 1  # a cycle that died is collected again
            assert gc.get_freeze_count() > 0  # and the survivors frozen again
        assert heap not in gc.callbacks
        assert gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()
        del kept
