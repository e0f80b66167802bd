"""The broker's CPU per node message over real HTTP, independent of how loaded the machine is.

    .venv/bin/python benchmarks/broker_http.py [--nodes 200] [--seconds 4] [--json]

Starts ``colocate broker`` twice in one run -- with uvicorn's httptools parser (the default
when installed) and with pure-Python h11 (``COLOCATE_HTTP_PARSER=h11``, the baseline) -- and,
for ``--nodes`` kept-alive connections each signed with its node's key, sends rounds of full
node reports (one per connection, pipelined across connections) and then rounds of heartbeats.
Prints per parser and kind the messages per second and the broker's CPU milliseconds per
message (its process CPU time over the messages: what capacity planning needs, unlike
latency on a shared machine), and what one core could then take at 10,000 nodes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from colocate.auth.node import node_key, sign  # noqa: E402
from colocate.broker.api import NodeHeartbeat, NodeReport  # noqa: E402
from colocate.broker.secret import load_or_create_secret  # noqa: E402

_URL = re.compile(r"listening on http://([^\s,]+)")


def request(secret: bytes, node: str, path: str, body: bytes) -> bytes:
    headers = sign(node_key(secret, node), node, "PUT", path, body)
    head = (
        f"PUT {path} HTTP/1.1\r\nhost: broker\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    )
    return head.encode() + b"\r\n" + body


def read_reply(conn: socket.socket) -> bytes:
    """One whole HTTP response (head and a Content-Length body) from ``conn``."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            raise SystemExit("the broker closed a connection")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        body += conn.recv(65536)
    return head


def measure(
    parser: str, nodes: int, seconds: float, keep_alive: str = "sweep"
) -> list[dict[str, Any]]:
    tmp = Path(tempfile.mkdtemp(prefix="colocate-broker-http-"))
    secret = load_or_create_secret(tmp / "secret")
    env = dict(os.environ, COLOCATE_HTTP_PARSER=parser, PYTHONPATH=str(ROOT))
    env["COLOCATE_KEEP_ALIVE"] = keep_alive  # per-request: uvicorn's timer per request
    argv = [sys.executable, "-m", "colocate", "broker", "--listen", "127.0.0.1:0",
            "--secret-file", str(tmp / "secret"), "--ledger", ""]  # fmt: skip
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
    )
    assert proc.stdout is not None
    rows = []
    try:
        address = None
        while address is None:
            line = proc.stdout.readline()
            if not line:
                raise SystemExit("the broker did not start")
            match = _URL.search(line)
            address = match.group(1) if match else None
        host, port = address.rsplit(":", 1)
        names = [f"sim{i:05d}" for i in range(nodes)]
        report = NodeReport(
            url="http://127.0.0.1:9", cpu_ids=[0, 1, 2, 3], memory_bytes=16 * 2**30,
            generation=1, instance="i",
        ).model_dump_json().encode()  # fmt: skip
        beat = NodeHeartbeat(instance="i", generation=1).model_dump_json().encode()
        conns = []
        for name in names:
            conn = socket.create_connection((host, int(port)))
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.sendall(request(secret, name, f"/v1/nodes/{name}", report))
            assert read_reply(conn).startswith(b"HTTP/1.1 200")
            conns.append(conn)
        broker = psutil.Process(proc.pid)
        for kind, suffix, body in (("report", "", report), ("heartbeat", "/alive", beat)):
            cpu0, t0, sent = sum(broker.cpu_times()[:2]), time.monotonic(), 0
            while time.monotonic() - t0 < seconds:
                # signed per message (timestamped, never replayed) outside the timed broker CPU
                for name, conn in zip(names, conns, strict=True):
                    conn.sendall(request(secret, name, f"/v1/nodes/{name}{suffix}", body))
                for conn in conns:
                    answer = read_reply(conn)
                    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
                sent += len(conns)
            cpu = sum(broker.cpu_times()[:2]) - cpu0
            wall = time.monotonic() - t0
            rows.append(
                {
                    "parser": parser,
                    "keep_alive": keep_alive,
                    "kind": kind,
                    "messages_per_s": round(sent / wall),
                    "broker_cpu_ms_per_message": round(cpu / sent * 1000, 4),
                }
            )
        for conn in conns:
            conn.close()
    finally:
        proc.terminate()
        proc.wait(15)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=200, help="connections (1..2000)")
    parser.add_argument("--seconds", type=float, default=4.0, help="per kind and parser (1..60)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not 1 <= args.nodes <= 2000 or not 1 <= args.seconds <= 60:
        parser.error("--nodes must be 1..2000 and --seconds 1..60")
    rows = measure("httptools", args.nodes, args.seconds) + measure("h11", args.nodes, args.seconds)
    # the r4 broker (uvicorn's keep-alive timer per request, each request kept until the next)
    before = measure("httptools", args.nodes, args.seconds, "per-request")
    rows += before
    per_request = {r["kind"]: r["broker_cpu_ms_per_message"] for r in before}
    cost = {
        (r["parser"], r["kind"]): r["broker_cpu_ms_per_message"]
        for r in rows
        if r["keep_alive"] == "sweep"
    }
    # 10,000 nodes: each changes every 10 s on average (broker_load.py's simulated nodes) and
    # heartbeats every 4 s otherwise; the old design sent 10,000 full reports a second.
    plan = {
        parser: {
            "on_change_core_pct_at_10k": round(
                (1000 * cost[(parser, "report")] + 2500 * cost[(parser, "heartbeat")]) / 10, 1
            ),
            "every_second_core_pct_at_10k": round(10000 * cost[(parser, "report")] / 10, 1),
        }
        for parser in ("httptools", "h11")
    }
    result = {"nodes": args.nodes, "rows": rows, "one_broker_core_at_10k_nodes": plan,
              "httptools_per_request_keep_alive_cpu_ms": per_request,
              "loadavg": os.getloadavg()}  # fmt: skip
    if args.json:
        print(json.dumps(result))
    else:
        for row in rows:
            print(row)
        print(plan)
        print({"httptools, per-request keep-alive (cpu ms/message)": per_request})
    return 0


if __name__ == "__main__":
    sys.exit(main())
