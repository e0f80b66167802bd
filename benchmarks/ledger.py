"""Ledger throughput and durability under SIGKILL (issue 12), one run.

    .venv/bin/python benchmarks/ledger.py [--seconds 3]

A child process writes lease records to a fresh SQLite ledger (WAL) as fast as it can: each
record is a grant (``Ledger.open``) and its end (``Ledger.close``), two commits, as the broker
does them; after each end is committed the child prints the lease id. The parent SIGKILLs the
child after ``--seconds``, then opens the ledger and checks that every acknowledged record is
there and closed (none lost). Records/s = acknowledged records / time. Baseline in the same
run: the same child appending one line per record to a plain file (write + flush, no fsync),
killed the same way.

Prints a table and saves JSON to ``benchmarks/results/ledger.json``. Target: >= 1,000
records/s with no loss.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from colocate.broker.ledger import Ledger  # noqa: E402
from colocate.owner import Owner  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TARGET = 1000.0


def child(kind: str, path: str) -> None:
    out = sys.stdout
    owner = Owner(1000, 1000, "alice", "physics")
    if kind == "ledger":
        ledger = Ledger(path)
        i = 0
        while True:
            lease_id = f"l-{i:09d}"
            now = time.time()
            ledger.open(lease_id, owner, "n1", 1, 1 << 28, now, now + 60)
            ledger.close(lease_id, now + 0.001, "released")
            out.write(lease_id + "\n")
            out.flush()
            i += 1
    with open(path, "a") as plain:
        i = 0
        while True:
            plain.write(f"l-{i:09d} alice physics n1 1 268435456 released\n")
            plain.flush()
            out.write(f"l-{i:09d}\n")
            out.flush()
            i += 1


def run(kind: str, path: Path, seconds: float) -> tuple[list[str], float]:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", kind, str(path)], stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    data = bytearray()
    first = None
    while first is None or time.monotonic() - first < seconds:
        if select.select([fd], [], [], 0.05)[0]:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            data += chunk
            if first is None:
                first = time.monotonic()  # interpreter start-up is not counted
    proc.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    proc.wait()
    while chunk := os.read(fd, 1 << 20):
        data += chunk
    proc.stdout.close()
    lines = data.decode().split("\n")[:-1]  # a torn last line is not acknowledged
    return [line for line in lines if line.startswith("l-")], killed - (first or killed)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return 0
    with tempfile.TemporaryDirectory(prefix="colocate-ledger-") as tmp_text:
        tmp = Path(tmp_text)
        plain_acked, plain_s = run("plain", tmp / "plain.log", args.seconds)
        ledger_acked, ledger_s = run("ledger", tmp / "ledger.db", args.seconds)
        ledger = Ledger(tmp / "ledger.db")
        rows = {row.lease_id: row for row in ledger.rows()}
        lost = [i for i in ledger_acked if i not in rows or rows[i].end is None]
        ledger.close_db()
    plain_rate = len(plain_acked) / plain_s
    rate = len(ledger_acked) / ledger_s
    print(f"\nledger under SIGKILL on {platform.node()}, {args.seconds:g} s each")
    print(f"{'what':<56} {'records':>8} {'per s':>10}")
    print(
        f"{'baseline: plain file, one line per record (no fsync)':<56} {len(plain_acked):>8} {plain_rate:>10.0f}"
    )
    print(
        f"{'SQLite WAL ledger: grant + end commits per record':<56} {len(ledger_acked):>8} {rate:>10.0f}"
    )
    print(
        f"\nacknowledged records lost after SIGKILL: {len(lost)}; rows in the ledger: {len(rows)}"
    )
    met = rate >= TARGET and not lost
    print(f"target >= {TARGET:.0f} records/s with no loss: {'OK' if met else 'MISSED'}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ledger.json").write_text(
        json.dumps(
            {
                "host": platform.node(),
                "seconds": args.seconds,
                "records_per_s": rate,
                "acknowledged": len(ledger_acked),
                "lost": len(lost),
                "rows": len(rows),
                "baseline_plain_file_records_per_s": plain_rate,
                "target_records_per_s": TARGET,
                "met": met,
            },
            indent=2,
        )
        + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
