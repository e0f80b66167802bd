"""Serverless process state on a real directory store, in this interpreter (no worker): what
commits, what an aborted call leaves, what a restore after a cut log brings back."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from colocate.process import runtime
from colocate.process.client import pickle_function
from colocate.process.runtime import Call
from colocate.process.store import DirStore


@pytest.fixture
def root(tmp_path: Path) -> Iterator[str]:
    yield str(tmp_path)
    runtime._swap_out()
    runtime._live.clear()


def call(root: str, name: str, fn: Any, *args: Any, call_id: str = "") -> tuple[Any, list[str]]:
    return Call(root, name, pickle_function(fn))(call_id, *args)


def add(state: Any, n: int) -> int:
    state["total"] = state.get("total", 0) + n
    state.setdefault("seen", []).append(n)  # changed in place: still committed
    return int(state["total"])


def add_then_fail(state: Any, n: int) -> None:
    state["total"] = state.get("total", 0) + n
    state["seen"].append(n)
    raise RuntimeError("boom")


def read(state: Any) -> tuple[int, list[int]]:
    return state.get("total", 0), list(state.get("seen", []))


def swap_out_and_forget(root: str) -> None:
    runtime._swap_out()
    runtime._live.clear()


def test_commits_survive_a_swap_out_and_an_aborted_call_leaves_nothing(root: str) -> None:
    for i in range(1, 201):
        assert call(root, "p", add, i)[0] == i * (i + 1) // 2
    with pytest.raises(RuntimeError):
        call(root, "p", add_then_fail, 1000)
    assert call(root, "p", read)[0] == (20100, list(range(1, 201)))  # in memory, after the abort
    swap_out_and_forget(root)
    (total, seen), notes = call(root, "p", read)
    assert (total, seen) == (20100, list(range(1, 201)))
    assert notes == []


def test_restore_is_lazy_and_a_cut_log_restores_the_last_whole_update_and_says_so(
    root: str,
) -> None:
    call(root, "p", add, 1)
    call(root, "p", lambda s: s.__setitem__("big", os.urandom(3 << 20)))  # one big record
    swap_out_and_forget(root)
    store = DirStore(root, "p")
    log = max((f for f in os.listdir(store.path) if f.startswith("log-")), key=len)
    path = os.path.join(store.path, log)
    os.truncate(path, os.path.getsize(path) - 1000)  # the worker died mid-write
    (total, seen), notes = call(root, "p", read)
    assert (total, seen) == (1, [1])
    assert len(notes) == 1 and "did not reach the store" in notes[0] and "update 1" in notes[0]
    proc = runtime._live[(root, "p")]
    assert "big" not in proc.where
    assert proc.values.keys() == {"total", "seen"}  # only what was touched was loaded


def test_snapshot_then_more_updates_restore_in_order(root: str) -> None:
    for i in range(1, 11):
        call(root, "p", add, i)
    info = Call(root, "p", b"", "snapshot")()[0]
    assert info["seq"] == 10 and info["keys"] == 2
    for i in range(11, 21):
        call(root, "p", add, i)
    swap_out_and_forget(root)
    assert call(root, "p", read)[0] == (210, list(range(1, 21)))
    files = sorted(os.listdir(DirStore(root, "p").path))
    assert [f for f in files if f.startswith(("snap-", "log-"))] == ["log-10.bin", "snap-10.bin"]


def test_messages_wait_in_the_store_for_a_swapped_out_receiver(root: str) -> None:
    call(root, "b", lambda s: None)
    swap_out_and_forget(root)  # b is swapped out
    call(root, "a", lambda s: s.send("b", {"x": 1}))
    call(root, "a", lambda s: s.send("b", {"x": 2}))

    def take_then_fail(s: Any) -> None:
        s.recv()
        raise ValueError("not taken")

    with pytest.raises(ValueError):
        call(root, "b", take_then_fail)
    assert call(root, "b", lambda s: [s.recv(), s.recv()])[0] == [{"x": 1}, {"x": 2}]
    with pytest.raises(TimeoutError):
        call(root, "b", lambda s: s.recv(timeout=0.05))


def test_bad_names_and_keys_get_one_clear_error(root: str) -> None:
    from colocate.errors import ConfigError

    with pytest.raises(ConfigError, match="process name"):
        DirStore(root, "a/b/c")
    with pytest.raises(TypeError, match="keys are str"):
        call(root, "p", lambda s: s.__setitem__(1, 2))


def test_a_retried_call_that_had_committed_returns_its_result_and_applies_once(root: str) -> None:
    assert call(root, "p", add, 5, call_id="c1")[0] == 5
    swap_out_and_forget(root)  # the lease went before the client heard back; a new one
    assert call(root, "p", add, 5, call_id="c1")[0] == 5  # the retry: the kept result
    assert call(root, "p", read)[0] == (5, [5])  # applied once
    assert call(root, "p", add, 5, call_id="c2")[0] == 10  # another call with the same args
    assert call(root, "p", lambda s: sorted(s))[0] == ["seen", "total"]  # call ids are hidden
    big = call(root, "p", lambda s: s.__setitem__("x", 1) or b"r" * (1 << 20), call_id="c3")[0]
    assert len(big) == 1 << 20
    with pytest.raises(runtime.ResultNotKept, match="not run twice"):
        call(root, "p", lambda s: s.__setitem__("x", 2), call_id="c3")
    assert call(root, "p", lambda s: s["x"])[0] == 1
    with pytest.raises(KeyError, match="NUL"):
        call(root, "p", lambda s: s.__setitem__("\x00calls", {}))


def test_a_process_live_in_another_lease_names_that_lease(root: str) -> None:
    holder = DirStore(root, "p")
    holder.open(1.0, "lease-a")
    try:
        with pytest.raises(runtime.ProcessLiveElsewhere) as err:
            Call(root, "p", pickle_function(read), wait_s=0.05)("")
        assert err.value.lease_id == "lease-a"
        import pickle

        again = pickle.loads(pickle.dumps(err.value))  # as the client receives it
        assert isinstance(again, runtime.ProcessLiveElsewhere) and again.lease_id == "lease-a"
    finally:
        holder.close()
    assert call(root, "p", read)[0] == (0, [])


def test_a_process_is_reached_by_its_owner_only() -> None:
    import pwd

    from colocate.errors import ConfigError, Forbidden
    from colocate.process.store import own_name

    me = pwd.getpwuid(os.getuid()).pw_name
    assert own_name(f"{me}/counter") == own_name("counter") == "counter"
    other = next(p.pw_name for p in pwd.getpwall() if p.pw_uid != os.getuid())
    with pytest.raises(Forbidden, match=f"belongs to {other}: only {other}'s leases"):
        own_name(f"{other}/counter")
    for bad in ("", "a/b/c", "/x", "x/", "..", "x" * 201):
        with pytest.raises(ConfigError, match="process name"):
            own_name(bad)


def test_the_store_root_is_made_at_first_use_and_a_shared_root_must_be_sticky(
    tmp_path: Path,
) -> None:
    from colocate.errors import ConfigError

    fresh = tmp_path / "new" / "store"  # made at first use, the owner's directory 0700
    call(str(fresh), "p", add, 1)
    mine = fresh / str(os.getuid())
    assert (mine.stat().st_mode & 0o777) == 0o700 and mine.stat().st_uid == os.getuid()
    swap_out_and_forget(str(fresh))
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(ConfigError, match=r"without the sticky bit.*chmod 1733"):
        call(str(shared), "p", add, 1)
    shared.chmod(0o1733)
    assert call(str(shared), "p", add, 1)[0] == 1
    swap_out_and_forget(str(shared))


def test_a_snapshot_copies_nothing_while_the_log_is_mostly_live_and_compacts_when_not(
    root: str,
) -> None:
    blobs = {f"b{i}": os.urandom(256 << 10) for i in range(4)}  # written as themselves
    for key, blob in blobs.items():
        call(root, "p", lambda s, k, v: s.__setitem__(k, v), key, blob)
    info = Call(root, "p", b"", "snapshot")("")[0]
    assert info["keys"] == 4 and info["bytes"] >= 4 * (256 << 10)
    path = DirStore(root, "p").path
    assert not [f for f in os.listdir(path) if f.startswith("snap-")]  # left in the log
    for _ in range(3):  # overwrite: the old values become garbage
        call(root, "p", lambda s: s.__setitem__("b0", os.urandom(256 << 10)))
    call(root, "p", lambda s: s.__setitem__("b1", b"small"))
    Call(root, "p", b"", "snapshot")("")
    files = sorted(f for f in os.listdir(path) if f.startswith(("snap-", "log-")))
    assert files[0].startswith("log-") and files[1].startswith("snap-")  # copied, old log gone
    assert len(files) == 2
    swap_out_and_forget(root)
    got = call(root, "p", lambda s: {k: s[k] for k in ("b1", "b2", "b3")})[0]
    assert got == {"b1": b"small", "b2": blobs["b2"], "b3": blobs["b3"]}


def test_a_live_receiver_gets_messages_directly_and_keeps_untaken_ones_at_swap_out(
    root: str,
) -> None:
    call(root, "b", lambda s: None)  # b is live (listening on its socket)
    inbox = os.path.join(DirStore(root, "b").path, "inbox")
    call(root, "a", lambda s: s.send("b", "one"))
    call(root, "a", lambda s: s.send("b", "two"))
    assert os.listdir(inbox) == []  # not through the store
    assert call(root, "b", lambda s: s.recv())[0] == "one"
    assert Call(root, "b", b"", "stats")("")[0]["messages_direct"] == 2
    swap_out_and_forget(root)  # "two" was received, not taken: it goes to the inbox
    assert len(os.listdir(inbox)) == 1
    assert call(root, "b", lambda s: s.recv())[0] == "two"
    with pytest.raises(TimeoutError):
        call(root, "b", lambda s: s.recv(timeout=0.05))


def test_a_damaged_large_value_is_refused_not_returned(root: str) -> None:
    from colocate.process.store import StateCorrupt

    blob = os.urandom(1 << 20)  # stored as itself, read back without unpickling
    call(root, "p", lambda s, b: s.__setitem__("blob", b), blob)
    swap_out_and_forget(root)
    assert call(root, "p", lambda s: s["blob"])[0] == blob
    swap_out_and_forget(root)
    path = DirStore(root, "p").path
    log = next(
        f
        for f in os.listdir(path)
        if f.startswith("log-") and os.path.getsize(os.path.join(path, f))
    )
    with open(os.path.join(path, log), "r+b") as f:
        f.seek(-4096, os.SEEK_END)
        byte = f.read(1)
        f.seek(-4096, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(StateCorrupt, match="damaged"):
        call(root, "p", lambda s: s["blob"])
