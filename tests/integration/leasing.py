"""Real broker and agent processes for the integration tests (``colocate broker`` /
``colocate agent --standalone`` as subprocesses on free ports, temp state)."""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from colocate.auth import ClientAuth, munge
from colocate.auth.node import NodeAuth, node_key
from colocate.broker.secret import load_or_create_secret
from colocate.errors import ColocateError
from colocate.lease_value import LeaseValue
from colocate.tokens import LeaseClaims, sign_lease
from tests.conftest import require

if TYPE_CHECKING:
    from colocate.executor import ExecutorHandle, ExecutorSupervisor
    from colocate.owner import Owner

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

    def stop(
        self, sig: int = signal.SIGTERM, timeout_s: float = 10.0, keep_state: bool = False
    ) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self.process.stdout:
            self.process.stdout.close()
        marker = self.log.with_suffix(".state")
        if marker.exists() and not keep_state:
            shutil.rmtree(marker.read_text(), ignore_errors=True)
            marker.unlink()


def _launch(argv: list[str], log: Path) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    with log.open("w") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "colocate", "-v", *argv],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=env,
            cwd=root,
        )


def _ready(
    name: str, process: subprocess.Popen[str], log: Path, timeout_s: float = 30.0
) -> Service:
    """Wait for the daemon's "listening on URL" line."""
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


def _broker_argv(tmp: Path, listen: str, placement: str, config: Path | None = None) -> list[str]:
    extra = ["--config", str(config)] if config is not None else []
    return [
        "broker",
        "--listen",
        listen,
        "--placement",
        placement,
        "--secret-file",
        str(tmp / "secret"),
        *extra,
    ]


def _agent_argv(
    tmp: Path, broker_url: str, node: str, cores: int, memory: str, interval_s: float, listen: str
) -> list[str]:
    # Not under tmp: executors put Unix sockets in the state dir and pytest's paths can
    # exceed the 108-byte AF_UNIX limit. Removed by Service.stop; a restarted agent of the
    # same node (stopped with keep_state) finds its predecessor's.
    marker = tmp / f"agent-{node}.state"
    state = (
        Path(marker.read_text())
        if marker.exists()
        else Path(tempfile.mkdtemp(prefix=f"colocate-{node}-"))
    )
    marker.write_text(str(state))
    return [
        "agent",
        "--standalone",
        "--broker",
        broker_url,
        "--listen",
        listen,
        "--node",
        node,
        "--cores",
        str(cores),
        "--memory",
        memory,
        "--interval",
        str(interval_s),
        "--secret-file",
        str(tmp / "secret"),
        "--state-dir",
        str(state),
    ]


def start_broker(
    tmp: Path,
    *,
    listen: str = "127.0.0.1:0",
    placement: str = "best_fit",
    config: Path | None = None,
) -> Service:
    """``config``: a TOML file (quotas, accounts, auth); the ledger defaults to tmp/ledger.db.
    Clients authenticate with MUNGE: skips locally (fails in CI) without a running munged."""
    require(munged_running(), "munged is not running; clients need it (colocate dev-cluster up)")
    log = tmp / f"broker-{time.monotonic_ns()}.log"
    return _ready("broker", _launch(_broker_argv(tmp, listen, placement, config), log), log)


def start_agent(
    tmp: Path,
    broker_url: str,
    *,
    node: str = "node1",
    cores: int = 1,
    memory: str = "1GiB",
    interval_s: float = 0.2,
    listen: str = "127.0.0.1:0",
) -> Service:
    log = tmp / f"agent-{node}.log"
    return _ready(
        f"agent {node}",
        _launch(_agent_argv(tmp, broker_url, node, cores, memory, interval_s, listen), log),
        log,
    )


def munged_running() -> bool:
    try:
        munge.decode(munge.encode(b"probe"))
    except ColocateError:
        return False
    return True


@contextlib.contextmanager
def unix_users(*names: str) -> Iterator[list[pwd.struct_passwd]]:
    """Real Unix users without home or login shell (a stale one of the same name is replaced),
    removed on exit. Needs root."""
    try:
        for name in names:
            subprocess.run(["userdel", name], capture_output=True, check=False)
            subprocess.run(["useradd", "-M", "-s", "/usr/sbin/nologin", name], check=True)
        yield [pwd.getpwnam(name) for name in names]
    finally:
        for name in names:
            # userdel refuses (8) while a process of the user is still exiting: retry a while
            for _ in range(50):
                done = subprocess.run(["userdel", name], capture_output=True, check=False)
                if done.returncode != 8:
                    break
                time.sleep(0.1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def private_redis(directory: str | Path, binary: str = "redis-server") -> Iterator[int]:
    """A private ``redis-server`` on a free loopback port, no persistence (its files in
    ``directory``): yields the port once it accepts connections, terminated on exit."""
    port = free_port()
    proc = subprocess.Popen(
        [
            *(binary, "--port", str(port), "--bind", "127.0.0.1"),
            *("--save", "", "--appendonly", "no", "--dir", str(directory)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(
                        f"redis-server did not start on port {port}"
                        " (apt-get install -y redis-server)"
                    ) from None
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(5)


def start_lease(
    sup: ExecutorSupervisor,
    secret: bytes,
    lease_id: str,
    cores: tuple[int, ...],
    memory: int,
    *,
    ttl_s: float = 120.0,
    owner: Owner | None = None,
) -> tuple[ExecutorHandle, str]:
    """Start ``lease_id``'s executor on ``sup``, as an agent does for a grant, and sign the
    token its client presents (for ``sup.node``, with ``secret``): the handle and the token."""
    expires = time.time() + ttl_s
    handle = sup.start(LeaseValue.of(lease_id, cores, memory, time.time(), expires, owner))
    return handle, sign_lease(secret, LeaseClaims(lease_id, sup.node, cores, memory, expires))


def start_cluster(
    tmp: Path,
    nodes: dict[str, tuple[int, str]],
    *,
    placement: str = "best_fit",
    interval_s: float = 0.2,
) -> tuple[Service, list[Service]]:
    """A broker and one agent per ``nodes`` entry (name -> (cores, memory)), started in
    parallel (agents retry until the broker is up); returns once every node is registered."""
    require(munged_running(), "munged is not running; clients need it (colocate dev-cluster up)")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    broker_log = tmp / f"broker-{time.monotonic_ns()}.log"
    broker_proc = _launch(_broker_argv(tmp, f"127.0.0.1:{port}", placement), broker_log)
    agent_procs = [
        (
            node,
            _launch(
                _agent_argv(tmp, url, node, cores, memory, interval_s, "127.0.0.1:0"),
                tmp / f"agent-{node}.log",
            ),
        )
        for node, (cores, memory) in nodes.items()
    ]
    try:
        broker = _ready("broker", broker_proc, broker_log)
        agents = [
            _ready(f"agent {node}", proc, tmp / f"agent-{node}.log") for node, proc in agent_procs
        ]
        wait_until(
            lambda: all(node_registered(url, node) for node in nodes), what="agent registration"
        )
    except BaseException:
        for proc in (broker_proc, *(p for _, p in agent_procs)):
            proc.kill()
            proc.wait(5)
        raise
    return broker, agents


def control_auth(tmp: Path, node: str) -> NodeAuth:
    """What signs requests of (and to) ``node``'s agent: its node key, derived from the cluster
    secret (an httpx auth: ``httpx.get(url, auth=control_auth(tmp, "n1"))``)."""
    return NodeAuth(node_key(load_or_create_secret(tmp / "secret"), node), node)


def wait_until(
    condition: Callable[[], object], timeout_s: float = 10.0, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if condition():
                return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def node_registered(broker_url: str, node: str) -> bool:
    nodes = httpx.get(f"{broker_url}/v1/status", timeout=2, auth=ClientAuth()).json()["nodes"]
    return any(n["node"] == node and n["alive"] for n in nodes)


@contextlib.contextmanager
def services(*started: Service) -> Iterator[None]:
    try:
        yield
    finally:
        for service in reversed(started):
            service.stop()
