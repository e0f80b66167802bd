"""A real Slurm cluster on this machine, for development, tests and CI.

``DevCluster.up(nodes)`` installs Debian's Slurm 22.05 and munge when missing, writes
``/etc/slurm/slurm.conf`` and ``cgroup.conf`` (so plain ``sbatch``/``squeue`` work), and
starts munged, slurmctld and one ``slurmd -N nX`` per fake node on loopback. Every fake
node claims all the machine's CPUs (they share the real cores) and ``NODE_MEMORY_MB`` of
memory. Jobs run in cgroup v1 (``/sys/fs/cgroup/<ctrl>/slurm_<node>/uid_<uid>/job_<id>``).

It is idempotent: ``up`` on a running cluster with the same shape returns in well under a
second; a different shape (node count, hook paths) rewrites the config and restarts the
daemons. ``down`` stops only the daemons whose pid files sit in the state directory, so a
munged someone else started is left alone.

The prolog and epilog are small wrapper scripts in the state directory that run
``<python> -m slurm_plugin.hooks prolog|epilog --socket /run/colocate/{node}.sock`` with PATH
set, under a timeout, and always exit 0: a failing prolog drains the node. Each fake node
has its own agent control socket (:data:`CONTROL_SOCKET`, ``{node}`` becomes the node name):
run one agent per node with ``agent.control_socket`` set to it. ``up`` also builds and
registers the colocate SPANK plugin (``--colocate=allow|deny``).

Needs root (packages, /etc/slurm, cgroups, daemons). No systemd needed.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from colocate.errors import BackendUnavailable, ConfigError

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = Path(
    os.environ.get("COLOCATE_DEV_CLUSTER_DIR", "/var/lib/colocate/dev-cluster")
)
CONF_DIR = Path("/etc/slurm")
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
#: What building the SPANK plugin needs (installed by ``up`` after the cluster runs).
SPANK_PACKAGES = ("gcc", "libc6-dev", "libslurm-dev")
#: The agent control socket of each fake node, as the hook wrappers call it.
CONTROL_SOCKET = "/run/colocate/{node}.sock"
CLUSTER_NAME = "colocate-dev"
PARTITION = "debug"
CTLD_PORT = 6817
SLURMD_PORT_BASE = 6830  # node i listens on SLURMD_PORT_BASE + i
NODE_MEMORY_MB = 4096
DEF_MEM_PER_CPU_MB = 256
HOOK_TIMEOUT_S = 30  # a hook that hangs must not hold the job start forever
MUNGE_PIDFILE = Path("/run/munge/munged.pid")
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MARKER = "# written by colocate dev-cluster; rewritten by `colocate dev-cluster up`"


class DevClusterError(BackendUnavailable):
    """The local Slurm could not be installed or started; the message names the log to read."""


Runner = Callable[[Sequence[str]], subprocess.CompletedProcess[str]]


def _run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=600, check=False)


@dataclass(frozen=True, slots=True)
class DaemonStatus:
    """One daemon of the dev cluster; ``owned`` is True when its pid file is in our state dir."""

    name: str
    pid: int | None
    running: bool
    owned: bool


@dataclass(frozen=True, slots=True)
class ClusterStatus:
    """What ``status`` shows: the daemons, the fake nodes and Slurm's own view (``sinfo``)."""

    state_dir: str
    nodes: tuple[str, ...]
    daemons: tuple[DaemonStatus, ...]
    sinfo: str
    up_seconds: float | None = None
    notes: tuple[str, ...] = field(default=())

    @property
    def running(self) -> bool:
        return bool(self.daemons) and all(d.running for d in self.daemons)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["running"] = self.running
        return data


def node_names(count: int) -> tuple[str, ...]:
    """Names of the fake nodes: n1 .. nN."""
    return tuple(f"n{i}" for i in range(1, count + 1))


def _alive(pid: int, comm: str) -> bool:
    """True when ``pid`` runs a program whose name starts with ``comm`` (guards pid reuse)."""
    try:
        name = Path(f"/proc/{pid}/comm").read_text().strip()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state = stat.rsplit(")", 1)[-1].split()[0] if ")" in stat else "?"
    return name.startswith(comm[:15]) and state != "Z"


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


class DevCluster:
    """Start, stop and inspect the dev cluster. ``run`` is the one place shell commands go."""

    def __init__(
        self,
        state_dir: Path = DEFAULT_STATE_DIR,
        conf_dir: Path = CONF_DIR,
        python: str = sys.executable,
        run: Runner = _run,
        hook_timeout_s: float = HOOK_TIMEOUT_S,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.conf_dir = Path(conf_dir)
        self.python = python
        self.run = run
        self.hook_timeout_s = hook_timeout_s

    # -- paths ---------------------------------------------------------------------------
    @property
    def run_dir(self) -> Path:
        return self.state_dir / "run"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "log"

    def _slurmd_pidfile(self, node: str) -> Path:
        return self.run_dir / f"slurmd-{node}.pid"

    @property
    def _ctld_pidfile(self) -> Path:
        return self.run_dir / "slurmctld.pid"

    @property
    def _munge_owned_marker(self) -> Path:
        return self.run_dir / "munged.owned"

    # -- config --------------------------------------------------------------------------
    def render_slurm_conf(self, nodes: int) -> str:
        """The slurm.conf text for ``nodes`` fake nodes (pure: same inputs, same text)."""
        cpus = os.cpu_count() or 1
        host = socket.gethostname().split(".")[0]
        sd = self.state_dir
        lines = [
            MARKER,
            f"ClusterName={CLUSTER_NAME}",
            "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={CTLD_PORT}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CryptoType=crypto/munge",
            "MpiDefault=none",
            "ReturnToService=2",
            "SlurmdParameters=config_overrides",
            f"StateSaveLocation={sd}/ctld",
            f"SlurmdSpoolDir={sd}/spool/%n",
            f"SlurmctldPidFile={self._ctld_pidfile}",
            f"SlurmdPidFile={self.run_dir}/slurmd-%n.pid",
            f"SlurmctldLogFile={self.log_dir}/slurmctld.log",
            f"SlurmdLogFile={self.log_dir}/slurmd-%n.log",
            "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            f"DefMemPerCPU={DEF_MEM_PER_CPU_MB}",
            "ProctrackType=proctrack/cgroup",
            "TaskPlugin=task/cgroup,task/affinity",
            "JobAcctGatherType=jobacct_gather/cgroup",
            "JobAcctGatherFrequency=30",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=30",
            "InactiveLimit=0",
            "KillWait=5",
            "MinJobAge=60",
            "Waittime=0",
            f"Prolog={sd}/prolog.sh",
            f"Epilog={sd}/epilog.sh",
            "PrologFlags=Alloc",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
        ]
        for i, name in enumerate(node_names(nodes), start=1):
            lines.append(
                f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={SLURMD_PORT_BASE + i} "
                f"CPUs={cpus} RealMemory={NODE_MEMORY_MB} State=UNKNOWN"
            )
        lines.append(
            f"PartitionName={PARTITION} Nodes={','.join(node_names(nodes))} Default=YES "
            "MaxTime=INFINITE State=UP OverSubscribe=NO"
        )
        return "\n".join(lines) + "\n"

    @staticmethod
    def render_cgroup_conf() -> str:
        return "\n".join(
            [
                MARKER,
                "CgroupPlugin=cgroup/v1",
                "CgroupMountpoint=/sys/fs/cgroup",
                "ConstrainCores=yes",
                "ConstrainRAMSpace=yes",
                "",
            ]
        )

    def render_hook(self, phase: str) -> str:
        """The prolog/epilog wrapper: runs the colocate hook, logs, and always exits 0."""
        logfile = self.log_dir / "hook.log"
        return (
            "#!/bin/sh\n"
            f"# colocate dev-cluster {phase} wrapper: never fails (a failing prolog drains the node).\n"
            f"export PATH={SAFE_PATH}\n"
            f"timeout -k 2 {self.hook_timeout_s:g} {shlex.quote(self.python)} -m slurm_plugin.hooks {phase} "
            f"--socket {shlex.quote(CONTROL_SOCKET)} "
            f">>{shlex.quote(str(logfile))} 2>&1 </dev/null\n"
            "rc=$?\n"
            f'echo "$(date -u +%FT%TZ) {phase} job ${{SLURM_JOB_ID:-?}} on ${{SLURMD_NODENAME:-?}}: '
            f'hook exit $rc" >>{shlex.quote(str(logfile))}\n'
            "exit 0\n"
        )

    def _write_if_changed(
        self, path: Path, text: str, mode: int = 0o644, backup: bool = True
    ) -> bool:
        try:
            if path.read_text() == text:
                return False
        except OSError:
            pass
        if backup and path.exists() and MARKER not in path.read_text():
            kept = path.with_suffix(path.suffix + ".before-colocate")
            if not kept.exists():
                shutil.copy2(path, kept)
                log.warning("kept the previous %s as %s", path, kept)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        tmp.chmod(mode)
        tmp.replace(path)
        return True

    # -- packages ------------------------------------------------------------------------
    def missing_packages(self, packages: Sequence[str] = PACKAGES) -> list[str]:
        missing = []
        for pkg in packages:
            res = self.run(["dpkg-query", "-W", "-f=${Status}", pkg])
            if res.returncode != 0 or "install ok installed" not in res.stdout:
                missing.append(pkg)
        return missing

    def install_packages(self, packages: Sequence[str] = PACKAGES) -> None:
        missing = self.missing_packages(packages)
        if not missing:
            return
        log.warning("installing %s (apt, --no-install-recommends)", " ".join(missing))
        env_argv = ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get"]
        opts = ["-o", "DPkg::Lock::Timeout=300", "-y", "-qq", "--no-install-recommends"]
        res = self.run([*env_argv, "install", *opts, *missing])
        if res.returncode != 0:  # package lists may be missing on a fresh machine
            self.run([*env_argv, "-o", "DPkg::Lock::Timeout=300", "update", "-qq"])
            res = self.run([*env_argv, "install", *opts, *missing])
        if res.returncode != 0:
            raise DevClusterError(
                f"apt-get install {' '.join(missing)} failed: {res.stderr.strip()[-300:]}; "
                "check the Debian mirror and rerun `colocate dev-cluster up`"
            )

    # -- daemons -------------------------------------------------------------------------
    def _munge_status(self) -> DaemonStatus:
        pid = _read_pid(MUNGE_PIDFILE)
        running = pid is not None and _alive(pid, "munged")
        return DaemonStatus(
            "munged", pid if running else None, running, self._munge_owned_marker.exists()
        )

    def _owned_nodes(self) -> list[str]:
        if not self.run_dir.is_dir():
            return []
        names = [p.name[len("slurmd-") : -len(".pid")] for p in self.run_dir.glob("slurmd-*.pid")]
        return sorted(names, key=lambda n: (len(n), n))

    def _daemon(self, name: str, pidfile: Path, comm: str) -> DaemonStatus:
        pid = _read_pid(pidfile)
        running = pid is not None and _alive(pid, comm)
        return DaemonStatus(name, pid if running else None, running, True)

    def daemons(self, nodes: Sequence[str] | None = None) -> tuple[DaemonStatus, ...]:
        """munged, slurmctld and each slurmd with whether it runs."""
        wanted = list(nodes) if nodes is not None else self._owned_nodes()
        out = [self._munge_status(), self._daemon("slurmctld", self._ctld_pidfile, "slurmctld")]
        out += [self._daemon(f"slurmd-{n}", self._slurmd_pidfile(n), "slurmd") for n in wanted]
        return tuple(out)

    def _start_munge(self) -> None:
        if self._munge_status().running:
            return
        if not Path("/etc/munge/munge.key").exists():
            raise DevClusterError("/etc/munge/munge.key is missing; reinstall the munge package")
        self.run(["install", "-d", "-o", "munge", "-g", "munge", "-m", "0755", "/run/munge"])
        res = self.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"])
        if res.returncode != 0:
            raise DevClusterError(
                f"munged did not start: {res.stderr.strip()}; see /var/log/munge/munged.log"
            )
        self._munge_owned_marker.write_text(str(_read_pid(MUNGE_PIDFILE) or ""))

    def _start(self, argv: Sequence[str], pidfile: Path, comm: str, what: str) -> None:
        pid = _read_pid(pidfile)
        if pid is not None and _alive(pid, comm):
            return
        res = self.run(argv)
        if res.returncode != 0:
            raise DevClusterError(
                f"{what} did not start ({res.stderr.strip()[-200:]}); see {self.log_dir}"
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            pid = _read_pid(pidfile)
            if pid is not None and _alive(pid, comm):
                return
            time.sleep(0.05)
        raise DevClusterError(f"{what} exited right after starting; see {self.log_dir}")

    def _stop(self, pidfile: Path, comm: str, timeout_s: float = 10.0) -> None:
        pid = _read_pid(pidfile)
        if pid is not None and _alive(pid, comm):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and _alive(pid, comm):
                time.sleep(0.05)
            if _alive(pid, comm):
                log.warning("%s (pid %d) ignored SIGTERM; killing it", comm, pid)
                os.kill(pid, signal.SIGKILL)
        pidfile.unlink(missing_ok=True)

    def _wait_nodes_ready(self, nodes: Sequence[str], timeout_s: float = 30.0) -> list[str]:
        """Wait until every node answers; resume drained ones. Returns notes for the user."""
        notes: list[str] = []
        resumed = False
        deadline = time.monotonic() + timeout_s
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            res = self.run(["sinfo", "-h", "-N", "-o", "%N %T"])
            states = dict(line.split(None, 1) for line in res.stdout.splitlines() if " " in line)
            bad = [
                n
                for n in nodes
                if n not in states
                or states[n].rstrip("*~#!%$@^-").lower()
                in {"down", "unknown", "not_responding", "future"}
                or states[n].endswith("*")
            ]
            drained = [n for n in nodes if states.get(n, "").startswith("drain")]
            if drained and not resumed:
                self.run(["scontrol", "update", f"NodeName={','.join(drained)}", "State=RESUME"])
                notes.append(f"resumed drained node(s) {','.join(drained)}")
                resumed = True
                continue
            if res.returncode == 0 and not bad and not drained:
                return notes
            time.sleep(0.2)
        raise DevClusterError(
            f"nodes not ready after {timeout_s:.0f} s ({states}); see {self.log_dir}/slurmd-*.log"
        )

    # -- public --------------------------------------------------------------------------
    def up(self, nodes: int = 3) -> ClusterStatus:
        """Install if needed and start the cluster with ``nodes`` fake nodes; idempotent."""
        if nodes < 1:
            raise ConfigError("--nodes must be at least 1", key="nodes")
        if os.geteuid() != 0:
            raise DevClusterError("needs root (packages, /etc/slurm, cgroups); rerun as root")
        t0 = time.monotonic()
        self.install_packages()
        names = node_names(nodes)
        for d in (
            self.state_dir,
            self.run_dir,
            self.log_dir,
            self.state_dir / "ctld",
            self.state_dir / "spool",
        ):
            d.mkdir(parents=True, exist_ok=True)
        for n in names:
            (self.state_dir / "spool" / n).mkdir(exist_ok=True)
        self.conf_dir.mkdir(parents=True, exist_ok=True)
        hooks_changed = False
        for phase in ("prolog", "epilog"):
            hooks_changed |= self._write_if_changed(
                self.state_dir / f"{phase}.sh", self.render_hook(phase), 0o755, backup=False
            )
        changed = self._write_if_changed(
            self.conf_dir / "slurm.conf", self.render_slurm_conf(nodes)
        )
        changed |= self._write_if_changed(self.conf_dir / "cgroup.conf", self.render_cgroup_conf())
        stale = [n for n in self._owned_nodes() if n not in names]
        if changed or stale:
            log.warning("slurm.conf changed: restarting the dev cluster's Slurm daemons")
            self._stop_slurm(self._owned_nodes())
        self._start_munge()
        self._start(["slurmctld"], self._ctld_pidfile, "slurmctld", "slurmctld")
        for n in names:
            self._start(["slurmd", "-N", n], self._slurmd_pidfile(n), "slurmd", f"slurmd -N {n}")
        notes = self._wait_nodes_ready(names)
        notes += self._install_spank()
        if hooks_changed:
            notes.append("prolog/epilog wrappers rewritten")
        status = self.status()
        return ClusterStatus(
            status.state_dir,
            status.nodes,
            status.daemons,
            status.sinfo,
            up_seconds=round(time.monotonic() - t0, 3),
            notes=tuple(notes),
        )

    def _install_spank(self) -> list[str]:
        """Build and register the SPANK plugin; a failure is a note, not a dead cluster."""
        from slurm_plugin.spank import install

        try:
            self.install_packages(SPANK_PACKAGES)
            install(self.state_dir / "spank", self.conf_dir / "plugstack.conf.d")
        except Exception as exc:
            log.warning("SPANK plugin not installed: %s", exc)
            return [f"--colocate unavailable: SPANK plugin not installed ({exc})"]
        return []

    def _stop_slurm(self, nodes: Sequence[str]) -> None:
        for n in nodes:
            self._stop(self._slurmd_pidfile(n), "slurmd")
        self._stop(self._ctld_pidfile, "slurmctld")

    def down(self) -> ClusterStatus:
        """Stop the daemons this dev cluster started (pid files in its state dir), nothing else."""
        self._stop_slurm(self._owned_nodes())
        if self._munge_owned_marker.exists():
            self._stop(MUNGE_PIDFILE, "munged")
            self._munge_owned_marker.unlink(missing_ok=True)
        return self.status()

    def status(self) -> ClusterStatus:
        """Daemons and Slurm's view of the nodes; never raises for a stopped cluster."""
        nodes = tuple(self._owned_nodes())
        daemons = self.daemons(nodes)
        sinfo = ""
        if shutil.which("sinfo") and any(d.name == "slurmctld" and d.running for d in daemons):
            res = self.run(["sinfo", "-N", "-o", "%N %P %T %c %m %O"])
            sinfo = (res.stdout or res.stderr).strip()
        return ClusterStatus(str(self.state_dir), nodes, daemons, sinfo)


def status_json(status: ClusterStatus) -> str:
    return json.dumps(status.to_json(), indent=2)
