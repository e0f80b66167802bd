"""Cold start through the broker: lease request to first result, one run.

    .venv/bin/python benchmarks/coldstart.py [--n 50]

Starts ``colocate broker`` and ``colocate agent --standalone`` as subprocesses (temp dir, free
ports), then, ``--n`` times: ``Client.lease(cores=1)`` (client -> broker -> agent -> fork
server) + ``lease.executor()`` (connect, token check) + ``invoke`` of a no-op with a 64-byte
payload; the release after each round is not timed. Phases are timed separately.

Baselines measured in the same run: a bare HTTP round trip to the broker (``GET /healthz``
on a kept-alive connection, the floor of one broker call) and ``GET /v1/status``. The target
(issue 4) is a cold-start p50 of at most 50 ms.

Prints a table and saves JSON to ``benchmarks/results/coldstart.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from colocate.auth import ClientAuth  # noqa: E402
from colocate.client import Client  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
PAYLOAD = b"x" * 64
TARGET_P50_S = 0.050


def noop(data: bytes) -> int:
    return len(data)


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def spawn(argv: list[str], log: Path) -> tuple[subprocess.Popen[str], str]:
    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "colocate", *argv],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            cwd=ROOT,
        )
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], 0.2)[0]:
            match = re.search(r"listening on (http://[^\s,]+)", proc.stdout.readline())
            if match:
                return proc, match.group(1)
        if proc.poll() is not None:
            break
    proc.kill()
    raise SystemExit(f"{argv[0]} did not start:\n{log.read_text()}")


def measure_http(url: str, n: int) -> list[float]:
    with httpx.Client(auth=ClientAuth()) as http:  # a MUNGE credential per call (issue 12)
        http.get(url)
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            http.get(url).raise_for_status()
            samples.append(time.perf_counter() - t0)
    return samples


def measure_coldstart(broker_url: str, n: int) -> dict[str, list[float]]:
    phases: dict[str, list[float]] = {"lease": [], "executor": [], "first_invoke": [], "total": []}
    with Client(broker_url) as client:
        client.status()  # open the kept-alive connection, as a long-lived client has
        for _ in range(n + 3):
            t0 = time.perf_counter()
            lease = client.lease(cores=1, memory="256MiB", duration="1m")
            t1 = time.perf_counter()
            ex = lease.executor()
            t2 = time.perf_counter()
            assert ex.invoke(noop, PAYLOAD) == len(PAYLOAD)
            t3 = time.perf_counter()
            lease.release()
            for name, value in (
                ("lease", t1 - t0),
                ("executor", t2 - t1),
                ("first_invoke", t3 - t2),
                ("total", t3 - t0),
            ):
                phases[name].append(value)
    return {name: values[3:] for name, values in phases.items()}  # first rounds warm the path


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=50, help="cold starts to time (default 50)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="colocate-coldstart-") as tmp_text:
        tmp = Path(tmp_text)
        secret = ["--secret-file", str(tmp / "secret")]
        broker, broker_url = spawn(
            ["broker", "--listen", "127.0.0.1:0", *secret], tmp / "broker.log"
        )
        agent, _ = spawn(
            [
                "agent",
                "--standalone",
                "--broker",
                broker_url,
                "--listen",
                "127.0.0.1:0",
                "--node",
                "bench",
                "--cores",
                "1",
                "--memory",
                "1GiB",
                "--interval",
                "1",
                "--state-dir",
                str(tmp / "agent"),
                *secret,
            ],
            tmp / "agent.log",
        )
        try:
            deadline = time.monotonic() + 10
            while not httpx.get(f"{broker_url}/v1/status", auth=ClientAuth()).json()["nodes"]:
                if time.monotonic() > deadline:
                    raise SystemExit("agent did not register")
                time.sleep(0.05)
            healthz = measure_http(f"{broker_url}/healthz", 500)
            status = measure_http(f"{broker_url}/v1/status", 500)
            phases = measure_coldstart(broker_url, args.n)
        finally:
            for proc in (agent, broker):
                proc.terminate()
                proc.wait(10)

    base = pct(healthz, 50)
    rows: list[tuple[str, list[float]]] = [
        ("baseline: HTTP GET /healthz (kept alive)", healthz),
        ("baseline: HTTP GET /v1/status", status),
        ("lease grant (client->broker->agent->executor up)", phases["lease"]),
        ("executor(): connect + token check", phases["executor"]),
        ("first invoke (ship code + call)", phases["first_invoke"]),
        ("cold start: lease request -> first result", phases["total"]),
    ]
    print(
        f"\ncold start on {platform.node()} ({platform.python_implementation()} {platform.python_version()}), n={args.n}"
    )
    print(f"{'what':<52} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'x http':>7}")
    for name, samples in rows:
        p50 = pct(samples, 50)
        print(
            f"{name:<52} {p50 * 1e3:>8.2f} {pct(samples, 90) * 1e3:>8.2f} {pct(samples, 99) * 1e3:>8.2f} {p50 / base:>7.1f}"
        )
    total_p50 = pct(phases["total"], 50)
    verdict = "meets" if total_p50 <= TARGET_P50_S else "MISSES"
    print(
        f"\ncold start p50 {total_p50 * 1e3:.1f} ms {verdict} the target of {TARGET_P50_S * 1e3:.0f} ms"
    )

    result: dict[str, Any] = {
        "benchmark": "coldstart",
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": platform.node(),
        "n": args.n,
        "target_p50_s": TARGET_P50_S,
        "meets_target": total_p50 <= TARGET_P50_S,
        "rows": {
            name: {
                "p50_s": pct(s, 50),
                "p90_s": pct(s, 90),
                "p99_s": pct(s, 99),
                "ratio_to_http_p50": pct(s, 50) / base,
            }
            for name, s in rows
        },
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "coldstart.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {out.relative_to(ROOT)}")
    return 0 if result["meets_target"] else 1


if __name__ == "__main__":
    sys.exit(main())
