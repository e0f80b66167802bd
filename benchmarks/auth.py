"""Cost of authentication (issue 12): lease grant latency with MUNGE vs without, one run.

    .venv/bin/python benchmarks/auth.py [--n 100]

Two brokers side by side, each with a standalone agent (1 core): ``colocate broker`` (every
request carries a fresh MUNGE credential that the broker checks with munged), and the same
broker app served without authentication (this file's ``--serve-noauth``, bench only: every
caller is root). Rounds alternate between them: ``Client.lease(cores=1)`` is timed (client ->
broker -> agent -> executor up), the release is not. Also timed: one MUNGE credential made and
checked (``munge.encode`` + ``munge.decode``), and ``GET /healthz`` as the HTTP floor.
The target is a p50 cost of authentication <= 5 ms.

Prints a table and saves JSON to ``benchmarks/results/auth.json``.
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

from colocate.auth import munge  # noqa: E402
from colocate.auth.identity import Authenticator, Identity  # noqa: E402
from colocate.client import Client  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TARGET_S = 0.005


class NoAuth(Authenticator):
    """Bench only: every caller is root, nothing is checked."""

    def authenticate(self, header: str | None, method: str, path: str) -> Identity:
        return Identity(0, 0, "root", ("root",), True, "none")


def serve_noauth(tmp: Path) -> None:
    from colocate.broker import Broker, create_app, load_or_create_secret
    from colocate.broker.ledger import open_ledger
    from colocate.broker.service import bind, serve, url_of
    from colocate.config import BrokerConfig, Prices

    config = BrokerConfig(listen="127.0.0.1:0", secret_file=str(tmp / "secret"))
    secret = load_or_create_secret(config.secret_file)
    sock = bind(config.listen, 0)
    print(f"noauth broker: listening on {url_of(sock)}", flush=True)
    serve(
        create_app(Broker(config, secret, ledger=open_ledger(None, tmp, Prices())), NoAuth()), sock
    )


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def spawn(argv: list[str], log: Path) -> tuple[subprocess.Popen[str], str]:
    with log.open("w") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT)
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
    raise SystemExit(f"{argv} did not start:\n{log.read_text()}")


def agent_for(url: str, tmp: Path, node: str) -> tuple[subprocess.Popen[str], str]:
    return spawn(
        [
            sys.executable,
            "-m",
            "colocate",
            "agent",
            "--standalone",
            "--broker",
            url,
            "--listen",
            "127.0.0.1:0",
            "--node",
            node,
            "--cores",
            "1",
            "--memory",
            "1GiB",
            "--interval",
            "1",
            "--state-dir",
            str(tmp / node),
            "--secret-file",
            str(tmp / "secret"),
        ],
        tmp / f"{node}.log",
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=100, help="lease grants per broker (default 100)")
    parser.add_argument("--serve-noauth", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_noauth:
        serve_noauth(Path(args.serve_noauth))
        return 0

    cred = []
    for _ in range(1000):
        t0 = time.perf_counter()
        munge.decode(munge.encode(b"colocate/1 POST /v1/leases"))
        cred.append(time.perf_counter() - t0)

    with tempfile.TemporaryDirectory(prefix="colocate-auth-") as tmp_text:
        tmp = Path(tmp_text)
        (tmp / "a").mkdir()
        (tmp / "b").mkdir()
        procs: list[subprocess.Popen[str]] = []
        try:
            with_auth, url_a = spawn(
                [
                    sys.executable,
                    "-m",
                    "colocate",
                    "broker",
                    "--listen",
                    "127.0.0.1:0",
                    "--secret-file",
                    str(tmp / "a" / "secret"),
                ],
                tmp / "a" / "broker.log",
            )
            procs.append(with_auth)
            without, url_b = spawn(
                [sys.executable, __file__, "--serve-noauth", str(tmp / "b")],
                tmp / "b" / "broker.log",
            )
            procs.append(without)
            procs.append(agent_for(url_a, tmp / "a", "bench-a")[0])
            procs.append(agent_for(url_b, tmp / "b", "bench-b")[0])
            samples: dict[str, list[float]] = {"munge": [], "none": [], "healthz": []}
            with (
                Client(url_a) as client_a,
                Client(url_b, jwt="unused") as client_b,
                httpx.Client() as http,
            ):
                for client in (client_a, client_b):
                    deadline = time.monotonic() + 15
                    while not client.status().nodes:
                        if time.monotonic() > deadline:
                            raise SystemExit("agents did not register")
                        time.sleep(0.05)
                for i in range(args.n + 5):
                    for name, client in (("munge", client_a), ("none", client_b)):
                        t0 = time.perf_counter()
                        lease = client.lease(cores=1, memory="128MiB", duration="1m")
                        elapsed = time.perf_counter() - t0
                        lease.release()
                        if i >= 5:  # warm-up rounds
                            samples[name].append(elapsed)
                    t0 = time.perf_counter()
                    http.get(f"{url_a}/healthz").raise_for_status()
                    samples["healthz"].append(time.perf_counter() - t0)
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(10)

    cost = pct(samples["munge"], 50) - pct(samples["none"], 50)
    rows = [
        ("baseline: HTTP GET /healthz (kept alive)", samples["healthz"]),
        ("MUNGE credential made + checked (munged)", cred),
        ("lease grant, no authentication (bench broker)", samples["none"]),
        ("lease grant, MUNGE (colocate broker)", samples["munge"]),
    ]
    print(f"\nauthentication cost on {platform.node()}, n={args.n} grants per broker (alternating)")
    print(f"{'what':<48} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8}")
    for name, values in rows:
        print(
            f"{name:<48} {pct(values, 50) * 1e3:>8.2f} {pct(values, 90) * 1e3:>8.2f} {pct(values, 99) * 1e3:>8.2f}"
        )
    print(
        f"\np50 cost of authentication per lease grant: {cost * 1e3:.2f} ms (target <= {TARGET_S * 1e3:.0f} ms): "
        f"{'OK' if cost <= TARGET_S else 'MISSED'}"
    )
    result: dict[str, Any] = {
        "host": platform.node(),
        "n": args.n,
        "p50_ms": {
            name: pct(values, 50) * 1e3
            for name, values in (
                ("healthz", samples["healthz"]),
                ("munge_credential", cred),
                ("grant_noauth", samples["none"]),
                ("grant_munge", samples["munge"]),
            )
        },
        "p90_ms": {
            name: pct(values, 90) * 1e3
            for name, values in (
                ("grant_noauth", samples["none"]),
                ("grant_munge", samples["munge"]),
            )
        },
        "auth_cost_p50_ms": cost * 1e3,
        "target_ms": TARGET_S * 1e3,
        "met": cost <= TARGET_S,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "auth.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
