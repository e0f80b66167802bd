"""Real broker and agent processes for the integration tests (``colocate broker`` /
``colocate agent --standalone`` as subprocesses on free ports, temp state)."""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from colocate.broker.api import CONTROL_HEADER
from colocate.broker.secret import control_token, load_or_create_secret

_URL = re.compile(r"listening on (http://[^\s,]+)")


@dataclass
class Service:
    """A running ``colocate`` daemon: its process, URL and log file."""

    name: str
    process: subprocess.Popen[str]
    url: str
    log: Path

    def alive(self) -> bool:
        return self.process.poll() is None

    def logs(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self.process.stdout:
            self.process.stdout.close()


def _spawn(name: str, argv: list[str], log: Path, timeout_s: float = 20.0) -> Service:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    with log.open("w") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "colocate", "-v", *argv],
            stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=root,
        )
    assert process.stdout is not None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 0.1)
        if ready:
            line = process.stdout.readline()
            match = _URL.search(line)
            if match:
                return Service(name, process, match.group(1), log)
        if process.poll() is not None:
            break
    process.kill()
    raise AssertionError(f"{name} did not start: exit {process.poll()}\n{log.read_text()}")


def start_broker(tmp: Path, *, listen: str = "127.0.0.1:0", placement: str = "best_fit") -> Service:
    return _spawn(
        "broker",
        ["broker", "--listen", listen, "--placement", placement, "--secret-file", str(tmp / "secret")],
        tmp / f"broker-{time.monotonic_ns()}.log",
    )


def start_agent(
    tmp: Path, broker_url: str, *, node: str = "node1", cores: int = 1, memory: str = "1GiB",
    interval_s: float = 0.2, listen: str = "127.0.0.1:0",
) -> Service:
    state = tmp / f"agent-{node}"
    state.mkdir(exist_ok=True)
    return _spawn(
        f"agent {node}",
        [
            "agent", "--standalone", "--broker", broker_url, "--listen", listen, "--node", node,
            "--cores", str(cores), "--memory", memory, "--interval", str(interval_s),
            "--secret-file", str(tmp / "secret"), "--state-dir", str(state),
        ],
        tmp / f"agent-{node}.log",
    )


def control_headers(tmp: Path) -> dict[str, str]:
    """What an agent presents to the broker (and the broker to an agent)."""
    return {CONTROL_HEADER: control_token(load_or_create_secret(tmp / "secret"))}


def wait_until(condition: Callable[[], object], timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if condition():
                return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def node_registered(broker_url: str, node: str) -> bool:
    nodes = httpx.get(f"{broker_url}/v1/status", timeout=2).json()["nodes"]
    return any(n["node"] == node and n["alive"] for n in nodes)


@contextlib.contextmanager
def services(*started: Service) -> Iterator[None]:
    try:
        yield
    finally:
        for service in reversed(started):
            service.stop()
