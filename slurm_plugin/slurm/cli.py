"""The CLI backend: Slurm's own commands, every call through one ``run`` method.

Per sample it costs one ``squeue --json`` (about 7 ms of CPU on the dev cluster) plus one
``scontrol -o -d show job <id>`` per job it has not seen yet: a running job's CPU ids do
not change, so they are cached until the job leaves the node.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Callable, Sequence

from colocate.errors import ConfigError, SlurmUnavailable
from slurm_plugin.slurm.parse import (
    NodeLayout,
    SlurmParseError,
    jobs_for_node,
    parse_listpids,
    parse_scontrol_job_detail,
    parse_sinfo_json,
    parse_squeue_json,
)
from slurm_plugin.slurm.records import JobOnNode, NodeInfo, Parsed, ProcessEntry

log = logging.getLogger(__name__)

CommandRunner = Callable[[Sequence[str], float], "subprocess.CompletedProcess[str]"]
"""Runs ``argv`` with a timeout (seconds); raises FileNotFoundError or TimeoutExpired."""


def subprocess_runner(argv: Sequence[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout_s, check=False
    )


# Messages of commands that mean "no such job" rather than "Slurm is down".
_GONE = ("invalid job id", "does not exist", "there are no steps", "no job steps exist")


class CliSlurm:
    """Slurm through its command line tools. ``runner`` is injectable (tests serve fixtures)."""

    name = "cli"

    def __init__(self, runner: CommandRunner = subprocess_runner, timeout_s: float = 10.0) -> None:
        self._runner = runner
        self.timeout_s = timeout_s
        self._layouts: dict[tuple[str, str], NodeLayout] = {}
        self._version: str | None = None

    def run(self, argv: Sequence[str]) -> str:
        """The one place a Slurm command runs. Returns stdout.

        Raises SlurmUnavailable when the command is missing, times out or fails; a
        ``LookupError`` when it says the job does not exist.
        """
        cmd = " ".join(argv)
        try:
            proc = self._runner(argv, self.timeout_s)
        except FileNotFoundError:
            raise SlurmUnavailable(
                f"`{argv[0]}` not found; install slurm-client (or run `colocate dev-cluster up`)"
            ) from None
        except subprocess.TimeoutExpired:
            raise SlurmUnavailable(f"`{cmd}` did not answer within {self.timeout_s:g} s") from None
        except OSError as exc:  # not executable, too many open files, ...
            raise SlurmUnavailable(f"`{cmd}` could not be run: {exc}") from None
        if proc.returncode != 0:
            err = (proc.stderr or proc.stdout or "").strip().splitlines()
            msg = err[-1] if err else f"exit status {proc.returncode}"
            if any(g in msg.lower() for g in _GONE):
                raise LookupError(msg)
            raise SlurmUnavailable(f"`{cmd}` failed: {msg}")
        return proc.stdout

    def version(self) -> str:
        if self._version is None:
            out = self.run(["sinfo", "--version"]).split()
            self._version = out[-1] if out else "unknown"
        return self._version

    def _layout(self, job_id: str) -> list[str]:
        """Fetch and cache the per-node layout of one job; returns warnings."""
        try:
            text = self.run(["scontrol", "-o", "-d", "show", "job", job_id])
        except LookupError:
            return []  # ended between squeue and scontrol
        parsed = parse_scontrol_job_detail(text)
        for layout in parsed.items:
            self._layouts[(layout.job_id, layout.node)] = layout
        return list(parsed.warnings)

    def jobs_on_node(self, node: str) -> Parsed[JobOnNode]:
        try:
            squeue = parse_squeue_json(self.run(["squeue", "--json"]))
        except SlurmParseError as exc:
            raise SlurmUnavailable(str(exc)) from None
        warnings = list(squeue.warnings)
        here = [j for j in squeue.items if node in j.nodes and j.state.holds_resources]
        live = {j.job_id for j in here}
        for key in [k for k in self._layouts if k[0] not in live]:
            del self._layouts[key]
        for job in here:
            if (job.job_id, node) not in self._layouts:
                warnings += self._layout(job.job_id)
        joined = jobs_for_node(node, squeue, self._layouts)
        return Parsed(joined.items, tuple(warnings) + joined.warnings)

    def nodes(self) -> Parsed[NodeInfo]:
        """Every node ``sinfo`` knows."""
        try:
            return parse_sinfo_json(self.run(["sinfo", "--json"]))
        except SlurmParseError as exc:
            raise SlurmUnavailable(str(exc)) from None

    def node_info(self, node: str) -> NodeInfo:
        parsed = self.nodes()
        for info in parsed.items:
            if info.name == node:
                return info
        known = ", ".join(sorted(i.name for i in parsed.items)) or "none"
        raise ConfigError(
            f"Slurm has no node {node!r} (known: {known}); pass --node with one of them"
        )

    def listpids(self, job_id: str, node: str | None = None) -> Parsed[ProcessEntry]:
        try:
            return parse_listpids(
                self.run(["scontrol", "listpids", job_id, *([node] if node else [])])
            )
        except LookupError:
            return Parsed()
