"""Slurm ``Prolog=`` / ``Epilog=`` hooks: tell the node agent that a job starts or ends.

slurmd runs the prolog as root for every job on every allocated node, with a minimal
environment (no PATH), and **drains the node when it exits non-zero**. So these hooks:

- use the standard library only (start-up is part of every job's start);
- read the job from the environment slurmd sets (``SLURM_JOB_ID``, ``SLURM_JOB_UID``,
  ``SLURM_JOB_CPUS_PER_NODE``, ``SLURMD_NODENAME``) and ``SPANK_COLOCATE``, which the
  colocate SPANK plugin sets from ``--colocate=allow|deny``;
- ask the agent over its control socket (:mod:`slurm_plugin.control`) and wait at most
  ``--timeout`` seconds (plus a small margin) for its answer: for the prolog, until the
  conflicting leases are evicted;
- never exit non-zero for their own trouble (agent down, socket missing, timeout, a
  garbled answer, bad arguments): they log one line to stderr and syslog and exit 0.

When the agent does not answer within the deadline (dead, hung, or its socket flooded), the
prolog retries until the deadline and then frees the job's cores itself: it kills every task in
the lease cgroups (``colocate/<node>/<lease>``) whose cores meet the job's (from
``scontrol -o -d show job``; every lease of the node when Slurm cannot say) and removes them,
so no function ever runs on a core a new job was given.

The prolog also leaves the job's choice in a small file next to the socket
(``/run/colocate/jobs/<job_id>@<node>.json``, see :func:`read_job_choices`) before it calls the
agent, and the epilog removes it: an agent that was down or restarted during a job's
prolog still knows that the job said ``deny``.

Run as ``colocate hook prolog``, ``python -m colocate.cli hook prolog`` or
``python -m slurm_plugin.hooks prolog`` (the last one imports the least).

The socket is, first found: ``--socket``, ``$COLOCATE_AGENT__CONTROL_SOCKET``,
``agent.control_socket`` in ``--config`` (default ``/etc/colocate/agent.toml`` when it
exists), ``/run/colocate/agent.sock``. ``{node}`` in it becomes ``$SLURMD_NODENAME``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from colocate.errors import BackendUnavailable
from slurm_plugin.control_client import DEFAULT_SOCKET, call, socket_path_for

#: Where the hook looks for the agent config when ``--config`` is not given.
DEFAULT_CONFIG = "/etc/colocate/agent.toml"
#: Seconds the agent may spend evicting before the prolog returns anyway.
DEFAULT_PROLOG_TIMEOUT_S = 5.0
DEFAULT_EPILOG_TIMEOUT_S = 2.0
#: Pause between two calls when the agent is busy or does not answer, seconds (doubling).
RETRY_PAUSE_S = 0.02
#: How long the prolog retries an agent whose socket is missing or refuses, seconds (none:
#: a restart takes longer than a job start may wait; the hook frees the cores itself).
DEAD_AGENT_RETRY_S = 0.0
SCONTROL = "/usr/bin/scontrol"  # slurmd gives the prolog no PATH
CGROUP_ROOT = "/sys/fs/cgroup"
#: Extra seconds the hook waits for the agent's answer beyond the agent's own deadline.
ANSWER_MARGIN_S = 0.5

_SYSLOG_IDENT = "colocate-hook"


class _Handled(Exception):
    """The hook already wrote its outcome."""


class HookOutcome:
    """What a hook run did. ``ok`` False means it gave up (and still exits 0)."""

    __slots__ = ("elapsed_s", "hook", "job_id", "message", "ok", "reply", "socket", "warnings")

    def __init__(self, hook: str, ok: bool = False, message: str = "") -> None:
        self.hook = hook
        self.ok = ok
        self.message = message
        self.job_id: int | None = None
        self.socket: str | None = None
        self.elapsed_s = 0.0
        self.reply: dict[str, Any] = {}
        self.warnings: list[str] = []

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


class JobChoice(NamedTuple):
    """A job's ``--colocate`` choice as its prolog saw it; ``colocate`` None: site default.

    ``recorded_at`` is seconds since the epoch.
    """

    job_id: int
    colocate: str | None
    uid: int | None
    node: str | None
    recorded_at: float


def choice_dir_for(socket_path: str) -> Path:
    """Where the hooks leave job choices: ``jobs/`` next to the agent's control socket."""
    return Path(socket_path).parent / "jobs"


def _choice_file(directory: Path, job_id: int, node: str | None) -> Path:
    # One file per job and node: the dev cluster runs several nodes' prologs on one host.
    return directory / f"{job_id}@{node or 'local'}.json"


def record_job_choice(directory: Path, choice: JobChoice) -> Path:
    """Write ``choice`` atomically (root only, 0600); return the file.

    Creates ``directory`` but not its parent: that is the agent's runtime folder, and a
    hook pointed at a folder that does not exist must not create it.
    """
    directory.mkdir(mode=0o755, exist_ok=True)
    target = _choice_file(directory, choice.job_id, choice.node)
    tmp = target.with_name(f".{target.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, json.dumps(choice._asdict()).encode())
    finally:
        os.close(fd)
    os.replace(tmp, target)
    return target


def forget_job_choice(directory: Path, job_id: int, node: str | None) -> bool:
    """Remove a job's choice file; True if there was one."""
    try:
        _choice_file(directory, job_id, node).unlink()
    except FileNotFoundError:
        return False
    return True


def read_job_choices(directory: Path, node: str | None = None) -> dict[int, JobChoice]:
    """Choices of the jobs whose prolog ran and epilog did not, by job id.

    For the agent at start and for jobs it has not heard of. ``node`` keeps only that
    node's files. Unreadable files are skipped with a warning on stderr.
    """
    choices: dict[int, JobChoice] = {}
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return choices
    for name in names:
        if name.startswith(".") or not name.endswith(".json"):
            continue
        try:
            data = json.loads((directory / name).read_bytes())
            choice = JobChoice(
                job_id=int(data["job_id"]),
                colocate=data.get("colocate"),
                uid=data.get("uid"),
                node=data.get("node"),
                recorded_at=float(data.get("recorded_at", 0.0)),
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            print(
                f"colocate: skipped unreadable job choice {directory / name}: {exc}",
                file=sys.stderr,
            )
            continue
        if choice.colocate not in (None, "allow", "deny"):
            choice = choice._replace(colocate="deny")  # unknown: the safe reading
        if node is None or choice.node in (node, None):
            choices[choice.job_id] = choice
    return choices


def job_choices_allowed(directory: Path, node: str | None = None) -> dict[str, bool]:
    """The ``--colocate`` choices of the job-choice files as the agent applies them: job id
    (as Slurm prints it) -> True for allow, False for deny (an unknown word reads as deny).
    Jobs whose prolog said nothing (the site default) are absent. The agent, ``colocate
    monitor`` and ``colocate metrics serve`` all read the choices through this one function.
    """
    return {
        str(job_id): choice.colocate == "allow"
        for job_id, choice in read_job_choices(directory, node).items()
        if choice.colocate is not None
    }


def _config_socket(config_path: str | None) -> str | None:
    """``[agent] control_socket`` from the agent's TOML file, without validating the rest."""
    path = config_path or DEFAULT_CONFIG
    if config_path is None and not os.path.exists(path):
        return None
    import tomllib

    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
        value = data.get("agent", {}).get("control_socket")
    except (OSError, tomllib.TOMLDecodeError, AttributeError):
        # Reaching the agent at the default socket beats not trying at all.
        return None
    return value if isinstance(value, str) else None


def resolve_socket(explicit: str | None, config_path: str | None, env: Mapping[str, str]) -> str:
    """The control socket path the hook talks to (see the module docstring for the order)."""
    path = (
        explicit
        or env.get("COLOCATE_AGENT__CONTROL_SOCKET")
        or _config_socket(config_path)
        or DEFAULT_SOCKET
    )
    return socket_path_for(path, env.get("SLURMD_NODENAME"))


def _job_id(env: Mapping[str, str]) -> int:
    raw = env.get("SLURM_JOB_ID", "")
    if not raw.isdigit() or int(raw) <= 0:
        raise ValueError(
            f"SLURM_JOB_ID is {raw!r}, not a job id; run this hook as slurmd's Prolog=/Epilog="
        )
    return int(raw)


def _colocate(env: Mapping[str, str]) -> tuple[str | None, str | None]:
    """The job's ``--colocate`` choice, and a warning when the value is unusable."""
    raw = env.get("SPANK_COLOCATE")
    if raw is None or raw == "":
        return None, None
    value = raw.strip().lower()
    if value in ("allow", "deny"):
        return value, None
    # Only the colocate plugin sets it, to allow or deny: anything else is read the safe way.
    return "deny", f"read SPANK_COLOCATE={raw!r} as deny (expected allow or deny)"


def prolog_request(env: Mapping[str, str], timeout_s: float) -> tuple[dict[str, Any], str | None]:
    """The control request for a starting job, from slurmd's environment; and a warning."""
    colocate, warning = _colocate(env)
    uid_raw = env.get("SLURM_JOB_UID", "")
    request: dict[str, Any] = {
        "op": "prolog",
        "job_id": _job_id(env),
        "colocate": colocate,
        "uid": int(uid_raw) if uid_raw.isdigit() else None,
        "cpus_per_node": env.get("SLURM_JOB_CPUS_PER_NODE") or None,
        "node": env.get("SLURMD_NODENAME") or None,
        "timeout_s": timeout_s,
    }
    return request, warning


def epilog_request(env: Mapping[str, str]) -> dict[str, Any]:
    """The control request for a job that ended, from slurmd's environment."""
    return {"op": "epilog", "job_id": _job_id(env), "node": env.get("SLURMD_NODENAME") or None}


def _call_with_retries(path: str, request: Mapping[str, Any], timeout_s: float) -> Any:
    """The agent's answer, retrying a busy or silent agent until ``timeout_s`` has passed;
    raises the last BackendUnavailable."""
    started = time.monotonic()
    deadline = started + timeout_s
    pause = RETRY_PAUSE_S
    while True:
        left = deadline - time.monotonic()
        try:
            reply = call(path, request, max(left, 0.05))
        except BackendUnavailable as exc:
            # only a silent agent is worth another try: one with no socket is down, one that
            # answers garbage will again
            silent = "did not answer" in str(exc)
            if not silent and time.monotonic() - started >= DEAD_AGENT_RETRY_S:
                raise
            if deadline - time.monotonic() <= pause:
                if silent:
                    raise BackendUnavailable(
                        f"the agent at {path} did not answer within {timeout_s:g} s"
                    ) from None
                raise
        else:
            if reply.ok or "busy" not in reply.error or deadline - time.monotonic() <= pause:
                return reply
        time.sleep(pause)
        pause = min(pause * 2, 0.5)


def _run(argv: list[str], timeout_s: float) -> tuple[int, str]:
    """(exit status, stdout and stderr) of ``argv``; -1 on a timeout. Without ``subprocess``,
    which imports threading (the prolog path stays light)."""
    import select
    import signal

    r, w = os.pipe()
    try:
        pid = os.posix_spawn(
            argv[0],
            argv,
            {"LC_ALL": "C", **{k: v for k, v in os.environ.items() if k.startswith("SLURM_CONF")}},
            file_actions=[(os.POSIX_SPAWN_DUP2, w, 1), (os.POSIX_SPAWN_DUP2, w, 2)],
        )
    finally:
        os.close(w)
    deadline = time.monotonic() + timeout_s
    chunks: list[bytes] = []
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([r], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return -1, ""
            chunk = os.read(r, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(r)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), b"".join(chunks).decode(errors="replace")


def job_cpus_here(job_id: int, node: str | None, timeout_s: float = 2.0) -> frozenset[int] | None:
    """The job's CPU ids on ``node`` from ``scontrol -o -d show job``: None when Slurm cannot
    say (every lease goes), empty when Slurm does not know the job (nothing to free)."""
    from colocate.executor.cgroupkill import parse_cpu_list

    try:
        code, out = _run([SCONTROL, "-o", "-d", "show", "job", str(job_id)], timeout_s)
    except OSError:
        return None
    if code != 0:
        return frozenset() if "invalid job id" in out.lower() else None
    cpus: set[int] = set()
    found = False
    for field_nodes, field_cpus in _node_cpu_fields(out):
        if node is not None and field_nodes != node:
            if "[" in field_nodes or "," in field_nodes:
                return None  # a host list we do not expand here: the safe side
            continue
        try:
            cpus |= parse_cpu_list(field_cpus)
        except ValueError:
            return None
        found = True
    return frozenset(cpus) if found else None


def _node_cpu_fields(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    words = text.split()
    for i, word in enumerate(words):
        if word.startswith("Nodes=") and i + 1 < len(words) and words[i + 1].startswith("CPU_IDs="):
            out.append((word.removeprefix("Nodes="), words[i + 1].removeprefix("CPU_IDs=")))
    return out


def free_cores_without_agent(
    job_id: int, node: str | None, cgroup_root: str = CGROUP_ROOT
) -> list[str]:
    """Kill and remove the lease cgroups on the job's cores (every lease of the node when the
    job's cores are unknown); the lease ids freed."""
    from colocate.executor.cgroupkill import lease_cgroups_on, remove_dirs

    name = node or os.uname().nodename.split(".")[0]
    cpus = job_cpus_here(job_id, node)
    if cpus is not None and not cpus:
        return []
    freed = lease_cgroups_on(name, cpus, cgroup_root)
    for dirs in freed.values():
        remove_dirs(dirs, timeout_s=1.0)
    return sorted(freed)


def run_hook(
    hook: str,
    env: Mapping[str, str],
    *,
    socket: str | None = None,
    config: str | None = None,
    timeout_s: float | None = None,
) -> HookOutcome:
    """Tell the agent about a starting (``prolog``) or ending (``epilog``) job. Never raises.

    Waits at most ``timeout_s`` + :data:`ANSWER_MARGIN_S` seconds for the agent.
    """
    started = time.monotonic()
    outcome = HookOutcome(hook=hook, ok=False, message="")
    warnings: list[str] = []
    try:
        if timeout_s is None:
            timeout_s = DEFAULT_PROLOG_TIMEOUT_S if hook == "prolog" else DEFAULT_EPILOG_TIMEOUT_S
        if hook == "prolog":
            request, warning = prolog_request(env, timeout_s)
            warnings += filter(None, [warning])
        elif hook == "epilog":
            request = epilog_request(env)
        else:
            raise ValueError(f"unknown hook {hook!r}; expected prolog or epilog")
        outcome.job_id = request["job_id"]
        outcome.socket = resolve_socket(socket, config, env)
        choices = choice_dir_for(outcome.socket)
        if hook == "prolog":
            try:
                record_job_choice(
                    choices,
                    JobChoice(
                        job_id=request["job_id"],
                        colocate=request["colocate"],
                        uid=request["uid"],
                        node=request["node"],
                        recorded_at=time.time(),
                    ),
                )
            except OSError as exc:
                warnings.append(f"cannot record the job's choice in {choices}: {exc.strerror}")
        else:
            # A stale choice file names a finished job; the agent ignores it.
            with contextlib.suppress(OSError):
                forget_job_choice(choices, request["job_id"], request["node"])
        try:
            reply = _call_with_retries(outcome.socket, request, timeout_s + ANSWER_MARGIN_S)
        except BackendUnavailable as exc:
            if hook != "prolog":
                raise
            freed = free_cores_without_agent(request["job_id"], request["node"])
            outcome.reply = {"freed_without_agent": freed}
            outcome.message = f"{exc}; killed {len(freed)} lease(s) on the job's cores itself"
            raise _Handled from None
        outcome.reply = reply.body
        outcome.ok = reply.ok
        if not reply.ok:
            outcome.message = f"the agent refused: {reply.error}"
        elif hook == "prolog":
            evicted = reply.body.get("evicted") or []
            waited = reply.body.get("waited_s")
            took = f"{waited:.3f} s" if isinstance(waited, int | float) else "unknown time"
            outcome.message = f"evicted {len(evicted)} lease(s) in {took}"
            if reply.body.get("complete") is False:
                outcome.ok = False
                outcome.message += "; evictions still running at the deadline"
        if hook == "prolog" and not outcome.ok:  # the job must not wait on, or share, its cores
            freed = free_cores_without_agent(request["job_id"], request["node"])
            outcome.reply["freed_without_agent"] = freed
            outcome.message += f"; killed {len(freed)} lease(s) on the job's cores itself"
        elif hook != "prolog":
            outcome.message = "the agent offers the job's resources again"
    except _Handled:
        pass
    except (BackendUnavailable, ValueError) as exc:
        outcome.message = str(exc)
    except Exception as exc:  # any trouble of our own must not fail the prolog
        outcome.message = f"{type(exc).__name__}: {exc}"
    outcome.warnings = warnings
    outcome.message = "; ".join([outcome.message, *warnings])
    outcome.elapsed_s = time.monotonic() - started
    return outcome


def report(outcome: HookOutcome, *, use_syslog: bool = True) -> None:
    """One line: to stderr when something went wrong or needs a look, to syslog always."""
    job = outcome.job_id if outcome.job_id is not None else "?"
    line = f"colocate hook {outcome.hook} job {job}: {outcome.message} ({outcome.elapsed_s * 1000:.0f} ms)"
    if not outcome.ok or outcome.warnings:
        print(line, file=sys.stderr)
    if use_syslog:
        try:
            import syslog

            syslog.openlog(_SYSLOG_IDENT, syslog.LOG_PID, syslog.LOG_DAEMON)
            syslog.syslog(syslog.LOG_INFO if outcome.ok else syslog.LOG_WARNING, line)
        except Exception:
            pass  # no syslog here; stderr carried what matters


class _HookParser(argparse.ArgumentParser):
    """Bad arguments must not fail the prolog either: raise instead of exiting 2."""

    def error(self, message: str) -> Any:
        raise ValueError(f"bad hook arguments: {message}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("hook", choices=["prolog", "epilog"], help="which Slurm hook this is")
    parser.add_argument(
        "--socket",
        help=f"agent control socket (default: from the config, else {DEFAULT_SOCKET}); {{node}} becomes SLURMD_NODENAME",
    )
    parser.add_argument(
        "--config",
        help=f"agent config to read control_socket from (default {DEFAULT_CONFIG} if present)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help=f"seconds the agent may take (prolog default {DEFAULT_PROLOG_TIMEOUT_S:g}, epilog {DEFAULT_EPILOG_TIMEOUT_S:g})",
    )
    parser.add_argument("--json", action="store_true", help="print the outcome as JSON on stdout")
    parser.add_argument("--no-syslog", action="store_true", help="log to stderr only")


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """Run a hook from command-line arguments. Always returns 0 (except for ``--help``, also 0)."""
    parser = _HookParser(
        prog="colocate hook",
        description="Slurm Prolog=/Epilog= hook: tell the colocate agent a job starts or ends. Always exits 0.",
    )
    add_arguments(parser)
    env = os.environ if env is None else env
    try:
        args = parser.parse_args(argv)
    except ValueError as exc:
        report(HookOutcome(hook="?", ok=False, message=str(exc)))
        return 0
    outcome = run_hook(
        args.hook, env, socket=args.socket, config=args.config, timeout_s=args.timeout
    )
    report(outcome, use_syslog=not args.no_syslog)
    if args.json:
        print(json.dumps(outcome.as_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
