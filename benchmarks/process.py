"""Serverless processes (PraaS, issue 10): state in the process against Redis and local files,
warm invocation against a raw TCP ping-pong, swap-out/restore against a plain copy. One run.

    .venv/bin/python benchmarks/process.py [--n 2000] [--rounds 30] [--quick]

- Reduction: N=8 calls each add a partial result (float64 array of 1 KiB, 64 KiB, 1 MiB), one
  call reads the total; through (a) the process's state, (b) a real Redis (a private
  ``redis-server`` on a loopback port, ``redis`` client in the worker), (c) files on local disk.
  Every leg runs its functions on the same leased worker through the same invoke path; we
  report the whole reduction seen by the client and the storage time inside the functions.
  The executor runs without its network sandbox here, since a sandboxed worker cannot reach a
  Redis on this host's loopback (it is built not to).
- Reduction in the workers (the issue's wording, ``reduction_in_workers``): a lease of every
  core with one worker per core (``workers=W``); N=8 contributions submitted at once, each
  computing its partial in the worker (a deterministic float64 array of the size) and adding
  it: to the process's state (its own key, committed when it returns), to Redis (SET), to a
  file (write + rename); then one call reads the total. Timed from the first submit to the
  total in the client's hands. The client-shipped leg above stays as ``reduction``.
- Warm invoke p50 of a process call that reads a key, vs a stateless invoke of the same echo
  and a raw TCP ping-pong of 64 bytes (``benchmarks/invoke.py``'s), pinned the same way.
- Swap-out (snapshot of the whole state, fsynced) and restore (index + every value loaded) of
  1, 100, 1000 MiB, with the worker's code (``runtime.LiveProcess``) in this process, against
  writing + fsyncing / reading the same bytes as one file in the same store directory.
  Restore means: from the process opened on a new lease (its lock taken, manifest and log
  index read) to every value of the state in memory (read, CRC-checked, unpickled), from a
  cold page cache; the plain copy is the same bytes read cold from one file.

Writes ``benchmarks/results/process.json``. Needs root (the executor's cgroups).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from invoke import SECRET, Lease, echo, pct, stats_us, tcp_pingpong, timed

from colocate.config import ExecutorConfig
from colocate.executor import ExecutorSupervisor
from colocate.process import runtime
from colocate.process.client import pickle_function
from colocate.process.runtime import Call
from colocate.process.store import SET, encode_value
from tests.integration.leasing import private_redis

RESULTS = Path(__file__).resolve().parent / "results"
NODE = "bench"
PARTIALS = 8
MiB = 1 << 20


# -- functions run in the worker ----------------------------------------------------------------
def state_add(state: Any, partial: bytes) -> float:
    import time as _t

    import numpy as np

    t = _t.perf_counter()
    part = np.frombuffer(partial, dtype=np.float64)
    acc = state.get("acc")
    state["acc"] = part.copy() if acc is None else acc + part
    return _t.perf_counter() - t  # the commit (pickle + log write) follows, timed by the client


def state_total(state: Any) -> tuple[float, float]:
    import time as _t

    t = _t.perf_counter()
    total = float(state["acc"].sum())
    del state["acc"]
    return total, _t.perf_counter() - t


_redis: Any = None


def redis_add(port: int, i: int, partial: bytes) -> float:
    import time as _t

    global _redis
    if _redis is None:
        import redis

        _redis = redis.Redis(host="127.0.0.1", port=port)
    t = _t.perf_counter()
    _redis.set(f"partial:{i}", partial)
    return _t.perf_counter() - t


def redis_total(port: int, n: int) -> tuple[float, float]:
    import time as _t

    import numpy as np

    global _redis
    if _redis is None:
        import redis

        _redis = redis.Redis(host="127.0.0.1", port=port)
    t = _t.perf_counter()
    parts = _redis.mget([f"partial:{i}" for i in range(n)])
    total = float(np.asarray(sum(np.frombuffer(p, dtype=np.float64) for p in parts)).sum())
    return total, _t.perf_counter() - t


def file_add(directory: str, i: int, partial: bytes) -> float:
    import os as _os
    import time as _t

    t = _t.perf_counter()
    tmp = _os.path.join(directory, f".partial-{i}")
    with open(tmp, "wb") as f:
        f.write(partial)
    _os.replace(tmp, _os.path.join(directory, f"partial-{i}"))
    return _t.perf_counter() - t


def file_total(directory: str, n: int) -> tuple[float, float]:
    import os as _os
    import time as _t

    import numpy as np

    t = _t.perf_counter()
    parts = []
    for i in range(n):
        with open(_os.path.join(directory, f"partial-{i}"), "rb") as f:
            parts.append(np.frombuffer(f.read(), dtype=np.float64))
    total = float(np.asarray(sum(parts)).sum())
    return total, _t.perf_counter() - t


def floor_add(i: int, partial: bytes) -> float:
    return 0.0


def floor_total(expected: float) -> tuple[float, float]:
    return expected, 0.0


# -- the reduction as the issue states it: each worker computes its partial ---------------------
def _partial(i: int, size: int) -> Any:
    import numpy as np

    return np.full(size // 8, float(i + 1))  # a deterministic float64 array of ``size`` bytes


def wstate_add(state: Any, i: int, size: int) -> float:
    import time as _t

    part = _partial(i, size)
    t = _t.perf_counter()
    state[f"p{i}"] = part  # committed when the function returns (disjoint keys: no conflict)
    return _t.perf_counter() - t


def wstate_total(state: Any, n: int) -> tuple[float, float]:
    import time as _t

    t = _t.perf_counter()
    total = float(sum(state[f"p{i}"] for i in range(n)).sum())
    for i in range(n):
        del state[f"p{i}"]
    return total, _t.perf_counter() - t


def wredis_add(port: int, i: int, size: int) -> float:
    return redis_add(port, i, _partial(i, size).tobytes())


def wfile_add(directory: str, i: int, size: int) -> float:
    return file_add(directory, i, _partial(i, size).tobytes())


def wfloor_add(i: int, size: int) -> float:
    _partial(i, size)
    return 0.0


def read_key(state: Any, data: bytes) -> bytes:
    state["k"]
    return data


def put(state: Any) -> None:
    state["k"] = 1


# -- Redis ------------------------------------------------------------------------------------
# -- legs -------------------------------------------------------------------------------------
def reduction(ex: Any, store: str, port: int, files: str, size: int, rounds: int) -> dict[str, Any]:
    import numpy as np

    partials = [np.full(size // 8, float(i + 1)).tobytes() for i in range(PARTIALS)]
    expected = float(sum(range(1, PARTIALS + 1)) * (size // 8))
    add = Call(store, "bench-reduce", pickle_function(state_add))
    total = Call(store, "bench-reduce", pickle_function(state_total))
    legs: dict[str, tuple[Any, Any]] = {
        "process_state": (
            lambda i, p: ex.invoke(add, uuid.uuid4().hex, p),
            lambda: ex.invoke(total, uuid.uuid4().hex),
        ),
        "redis": (
            lambda i, p: ex.invoke(redis_add, port, i, p),
            lambda: ex.invoke(redis_total, port, PARTIALS),
        ),
        "local_files": (
            lambda i, p: ex.invoke(file_add, files, i, p),
            lambda: ex.invoke(file_total, files, PARTIALS),
        ),
        # the same 9 invocations with the same payloads and no storage at all: what every
        # leg pays for the client -> worker round trips, the floor of the end-to-end figure
        "invoke_floor": (
            lambda i, p: ex.invoke(floor_add, i, p),
            lambda: ex.invoke(floor_total, expected),
        ),
    }
    one_by_one = {
        name: (lambda add=add_one: [add(i, p) for i, p in enumerate(partials)], read_total)
        for name, (add_one, read_total) in legs.items()
    }
    return timed_legs(one_by_one, expected, rounds)


def reduction_in_workers(
    ex: Any, store: str, port: int, files: str, size: int, rounds: int
) -> dict[str, Any]:
    """N=8 contributions submitted at once to the lease's workers, each computing its partial
    there and adding it (process state: its own key, committed on return; Redis: SET; files:
    write + rename), then one call reads the total. Timed from the first submit to the total
    in the client's hands."""
    expected = float(sum(range(1, PARTIALS + 1)) * (size // 8))
    name = f"bench-wreduce-{size}"
    add = Call(store, name, pickle_function(wstate_add), shared=True)
    total = Call(store, name, pickle_function(wstate_total), shared=True)
    legs: dict[str, tuple[Any, Any]] = {
        "process_state": (
            lambda i: ex.submit(add, uuid.uuid4().hex, i, size),
            lambda: ex.invoke(total, uuid.uuid4().hex, PARTIALS),
        ),
        "redis": (
            lambda i: ex.submit(wredis_add, port, i, size),
            lambda: ex.invoke(redis_total, port, PARTIALS),
        ),
        "local_files": (
            lambda i: ex.submit(wfile_add, files, i, size),
            lambda: ex.invoke(file_total, files, PARTIALS),
        ),
        "invoke_floor": (
            lambda i: ex.submit(wfloor_add, i, size),
            lambda: ex.invoke(floor_total, expected),
        ),
    }
    at_once = {
        name: (lambda add=add_one: [f.result() for f in [add(i) for i in range(PARTIALS)]], total)
        for name, (add_one, total) in legs.items()
    }
    out = timed_legs(at_once, expected, rounds)
    out["redis_over_process_state"] = (
        out["redis"]["reduction_p50_us"] / out["process_state"]["reduction_p50_us"]
    )
    out["local_files_over_process_state"] = (
        out["local_files"]["reduction_p50_us"] / out["process_state"]["reduction_p50_us"]
    )
    out["redis_over_process_state_in_function"] = (
        out["redis"]["storage_in_function_p50_us"]
        / out["process_state"]["storage_in_function_p50_us"]
    )
    return out


def timed_legs(
    legs: dict[str, tuple[Callable[[], list[Any]], Callable[[], Any]]], expected: float, rounds: int
) -> dict[str, Any]:
    """Each leg ``rounds`` times after 3 warm-ups: its contributions (their results: seconds
    in storage, or (seconds, notes)), then its total read back and checked against
    ``expected``. Per leg, the p50 wall time of a round and the p50 time spent in storage."""
    out: dict[str, Any] = {}
    for name, (contribute, read_total) in legs.items():
        walls, inside = [], []
        for r in range(rounds + 3):
            t = time.perf_counter()
            spent = sum(res[0] if isinstance(res, tuple) else res for res in contribute())
            (got, read_s), _notes = _split(read_total())
            wall = time.perf_counter() - t
            assert abs(got - expected) < 1e-6 * expected, (name, got, expected)
            if r >= 3:
                walls.append(wall)
                inside.append(spent + read_s)
        out[name] = {
            "reduction_p50_us": pct(walls, 50) * 1e6,
            "storage_in_function_p50_us": pct(inside, 50) * 1e6,
        }
    return out


def _split(res: Any) -> tuple[tuple[float, float], list[str]]:
    """Process calls return (result, notes); plain calls return the result."""
    if isinstance(res, tuple) and len(res) == 2 and isinstance(res[1], list):
        return res[0], res[1]
    return res, []


def _swap_once(store: str, mib: int) -> dict[str, float]:
    """Swap-out as an eviction does it, from a state only in memory (values as functions left
    them): committed (write-through log, background writer for large records), then the
    worker's exit hook writes what is queued and fsyncs the log. The worker's code
    (``runtime.LiveProcess``) runs in this process."""
    name = f"bench-swap-{mib}"
    chunk = 1 if mib == 1 else 4
    value = os.urandom(chunk * MiB)
    proc = runtime.LiveProcess(store, name)
    os.sync()  # the new process's directories reach the disk first, as a live one's have
    t = time.perf_counter()
    for k in range(mib // chunk):
        proc.commit([(f"k{k}", SET, encode_value(value, runtime._dumps))], {f"k{k}": value})
    proc.swap_out()
    out = time.perf_counter() - t
    _drop_cache(store)
    t = time.perf_counter()
    back = runtime.LiveProcess(store, name)
    for key in list(back.where):
        assert len(back.load(key)) == len(value)
    restore = time.perf_counter() - t
    snapshot = back.snapshot()  # proc.snapshot(): a manifest over the log, no copy
    assert snapshot["bytes"] >= mib * MiB, snapshot
    back.delete()
    # the plain copy: the same bytes, one file, same directory
    blob = value * (mib // chunk)
    path = os.path.join(store, f"copy-{mib}.bin")
    os.sync()  # the same start for the copy: nothing else dirty
    t = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    view = memoryview(blob)
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)
    os.close(fd)
    copy_out = time.perf_counter() - t
    _drop_cache(store)
    t = time.perf_counter()
    with open(path, "rb") as f:
        data = f.read()
    copy_in = time.perf_counter() - t
    assert len(data) == len(blob)
    os.unlink(path)
    return {
        "swap_out_s": out,
        "copy_out_s": copy_out,
        "swap_out_ratio": out / copy_out,
        "snapshot_after_s": snapshot["seconds"],
        "restore_s": restore,
        "copy_in_s": copy_in,
        "restore_ratio": restore / copy_in,
    }


def swap(store: str, mib: int) -> dict[str, float]:
    """Median of a few runs (fewer for large states): each run does the swap-out, restore
    and snapshot, then the plain copy of the same bytes, on the same disk."""
    runs = [_swap_once(store, mib) for _ in range(5 if mib <= 1 else 3 if mib <= 100 else 1)]
    out = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    out["swap_out_ratio"] = out["swap_out_s"] / out["copy_out_s"]
    out["restore_ratio"] = out["restore_s"] / out["copy_in_s"]
    out["runs"] = len(runs)
    return out


def _drop_cache(store: str) -> None:
    """Evict the store's files from the page cache (restore and copy read from the disk)."""
    for dirpath, _dirs, files in os.walk(store):
        for f in files:
            try:
                fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="warm invocations per figure")
    parser.add_argument("--rounds", type=int, default=30, help="reductions per size")
    parser.add_argument(
        "--quick", action="store_true", help="fewer rounds, swap sizes 1 and 100 MiB"
    )
    args = parser.parse_args()
    if args.quick:
        args.n, args.rounds = 500, 8
    cpus = sorted(os.sched_getaffinity(0))
    worker_cpu, client_cpu = cpus[-1], cpus[0]
    tmp = tempfile.mkdtemp(prefix="colocate-bench-process-", dir="/var/tmp")
    os.chmod(tmp, 0o1733)  # as a site makes the store root: the worker's uid writes its own dir
    files = tempfile.mkdtemp(prefix="colocate-bench-files-", dir="/var/tmp")
    os.chmod(files, 0o1777)
    redis = contextlib.ExitStack()
    port = redis.enter_context(private_redis(tmp))
    sup = ExecutorSupervisor(ExecutorConfig(sandbox=False), SECRET, node=NODE)
    os.sched_setaffinity(0, {client_cpu})
    figures: dict[str, Any] = {}
    try:
        figures["tcp_pingpong"] = stats_us(tcp_pingpong(args.n, worker_cpu))
        lease = Lease(sup, (worker_cpu,), 3 << 30)
        with lease.executor() as ex:
            payload = b"x" * 64
            figures["stateless_invoke"] = stats_us(timed(args.n, lambda: ex.invoke(echo, payload)))
            ex.invoke(Call(tmp, "bench-warm", pickle_function(put)), "")
            warm = Call(tmp, "bench-warm", pickle_function(read_key))
            figures["process_invoke"] = stats_us(
                timed(args.n, lambda: ex.invoke(warm, uuid.uuid4().hex, payload))
            )
            figures["process_invoke_vs_pingpong"] = (
                figures["process_invoke"]["p50_us"] / figures["tcp_pingpong"]["p50_us"]
            )
            figures["reduction"] = {
                f"{size // 1024}KiB": reduction(ex, tmp, port, files, size, args.rounds)
                for size in (1024, 64 * 1024, MiB)
            }
            for row in figures["reduction"].values():
                floor = row["invoke_floor"]["reduction_p50_us"]
                # if process state cost nothing beyond the invocations, Redis would be this
                # many times slower end to end: the bound on redis_over_process_state
                row["redis_over_floor"] = row["redis"]["reduction_p50_us"] / floor
                row["process_state_over_floor"] = row["process_state"]["reduction_p50_us"] / floor
                row["redis_over_process_state"] = (
                    row["redis"]["reduction_p50_us"] / row["process_state"]["reduction_p50_us"]
                )
                row["redis_over_process_state_in_function"] = (
                    row["redis"]["storage_in_function_p50_us"]
                    / row["process_state"]["storage_in_function_p50_us"]
                )
        # "N workers each add a partial result and one reads the total": a lease of every
        # core, one worker per core, the partials computed in the workers (workers=W)
        wide = Lease(sup, tuple(cpus), 3 << 30)
        with wide.executor() as ex:
            figures["reduction_in_workers"] = {
                "workers": len(cpus),
                **{
                    f"{size // 1024}KiB": reduction_in_workers(
                        ex, tmp, port, files, size, args.rounds
                    )
                    for size in (1024, 64 * 1024, MiB)
                },
            }
        os.sched_setaffinity(0, set(cpus))
        figures["swap"] = {
            f"{mib}MiB": swap(tmp, mib) for mib in ((1, 100) if args.quick else (1, 100, 1000))
        }
    finally:
        sup.close()
        redis.close()
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(files, ignore_errors=True)
    figures["machine"] = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load1": os.getloadavg()[0],
        "executor_sandbox": False,
    }
    figures["notes"] = (
        "storage_in_function for process_state is the in-memory update only; its commit (pickle + "
        "log write) runs after the function returns and is inside reduction_p50_us. swap_out_s "
        "starts from a state only in memory: commit (write-through log, background writer) + "
        "the eviction's exit hook (queued records out, one fsync), against write + fsync of "
        "the same bytes as one file; snapshot_after_s is proc.snapshot() after a restore "
        "(a manifest over the values in place); "
        "restore_s reads the index and loads + checks (CRC-32C) + unpickles every value from a "
        "cold page cache (fadvise DONTNEED), against reading the copy cold; restore_s runs from "
        "the process opened on a new lease (lock, manifest, log index) to every value in memory. "
        "reduction_in_workers: 8 contributions submitted at once to a lease of one worker per "
        "core, each partial computed in its worker, then one call reads the total (the issue's "
        "wording); reduction: the older leg, every partial shipped from the client in its own "
        "invocation, one at a time. invoke_floor: the "
        "reduction's 9 invocations with no storage; redis_over_floor bounds what any state "
        "store reached through one invocation per partial can show against Redis end to end"
    )
    print(json.dumps(figures, indent=2))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "process.json").write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
