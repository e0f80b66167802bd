"""``colocate monitor``: what each Slurm job on this node was given and really uses.

Examples::

    colocate monitor --node n1              # live table, redrawn every second
    colocate monitor --node n1 --once --json  # one JSON snapshot (the monitor's contract)
    colocate monitor --node n1 --json       # one JSON snapshot per line, every interval
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import sys
import time
from pathlib import Path

from colocate.units import GIB, MIB
from monitors.sampler import Sampler, default_source
from monitors.snapshot import NodeSnapshot
from monitors.usage import UsageSource


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--node", help="Slurm node name (default: this host's short name)")
    parser.add_argument("--once", action="store_true", help="print one snapshot and exit")
    parser.add_argument(
        "--interval", type=float, default=1.0, help="seconds between samples (default 1)"
    )
    parser.add_argument(
        "--count", type=int, default=0, help="stop after this many snapshots (0: run until ^C)"
    )
    parser.add_argument(
        "--json", action="store_true", help="JSON (one object per line when not --once)"
    )
    parser.add_argument(
        "--source",
        choices=["auto", "cgroup-v1", "cgroup-v2", "psutil"],
        default="auto",
        help="where usage comes from (default: this machine's cgroups, psutil for the rest)",
    )
    parser.add_argument(
        "--psi-groups",
        action="store_true",
        help="cgroup v1: move each job into its own unified-hierarchy group to get per-job PSI",
    )
    parser.add_argument("--slurm", choices=["cli", "pyslurm"], default="cli", help="Slurm backend")
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="colocate TOML config ([agent] control_socket and default_colocate)",
    )
    add_choices_argument(parser)
    parser.add_argument("--cgroup-root", default="/sys/fs/cgroup", help=argparse.SUPPRESS)
    parser.add_argument("--proc", default="/proc", help=argparse.SUPPRESS)


def add_choices_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--choices",
        metavar="DIR",
        help="where the prolog hook leaves the jobs' --colocate choices (default: jobs/ next "
        "to the agent's control socket of the config, as the agent reads them)",
    )


class JobChoices:
    """The jobs' ``--colocate`` choices as the agent applies them, read again at each sample
    from the prolog hook's job-choice files: what ``colocate monitor`` and ``colocate metrics
    serve`` show is what the agent's policy is told. ``default``: for jobs without a choice."""

    def __init__(self, directory: Path, node: str, default: bool) -> None:
        self.directory = directory
        self.node = node
        self.default = default

    @classmethod
    def of(cls, args: argparse.Namespace, node: str) -> JobChoices:
        """From ``--choices`` and ``--config`` (its ``[agent]`` table)."""
        from colocate.config import load_config
        from slurm_plugin.control_client import socket_path_for
        from slurm_plugin.hooks import choice_dir_for

        agent = load_config(args.config).agent
        directory = (
            Path(args.choices)
            if args.choices
            else choice_dir_for(socket_path_for(agent.control_socket, node))
        )
        return cls(directory, node, agent.default_colocate == "allow")

    def read(self) -> dict[str, bool]:
        """Job id -> True (allow) / False (deny), for the jobs whose prolog said one."""
        from slurm_plugin.hooks import job_choices_allowed

        return job_choices_allowed(self.directory, self.node)

    def sample(self, sampler: Sampler, now: float | None = None) -> NodeSnapshot:
        """One snapshot whose jobs carry their choices."""
        return sampler.sample(now, colocate=self.read(), default_colocate=self.default)


def _source(args: argparse.Namespace) -> UsageSource:
    if args.source == "cgroup-v1":
        from monitors.cgroup_v1 import CgroupV1Source
        from monitors.psi_groups import PsiGroups

        groups = (
            PsiGroups(Path(args.cgroup_root) / "unified", args.proc) if args.psi_groups else None
        )
        return CgroupV1Source(args.cgroup_root, args.proc, psi_groups=groups)
    if args.source == "cgroup-v2":
        from monitors.cgroup_v2 import CgroupV2Source

        return CgroupV2Source(args.cgroup_root, args.proc)
    if args.source == "psutil":
        from monitors.procscan import ProcessScanSource

        return ProcessScanSource(args.proc)
    return default_source(args.cgroup_root, args.proc, psi_groups=args.psi_groups)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}%"


def render_table(snap: NodeSnapshot) -> str:
    """The live table: one row per job, cores and memory given / used / idle."""
    lines = [
        f"node {snap.node}  {time.strftime('%H:%M:%S', time.localtime(snap.t))}  "
        f"cores {snap.cores_total} (unallocated {snap.cores_unallocated})  "
        f"memory {snap.memory_total_bytes / GIB:.1f} GiB (unallocated {snap.memory_unallocated_bytes / GIB:.1f} GiB)  "
        f"PSI cpu {_pct(snap.cpu_pressure)} mem {_pct(snap.memory_pressure)}  "
        f"source {snap.source}{'' if snap.slurm_ok else '  SLURM UNAVAILABLE'}",
        "",
        f"{'JOB':>8} {'USER':<10} {'STATE':<10} {'CPUS':<8} {'ALLOC':>5} {'USED':>5} {'IDLE':>5}  "
        f"{'MEM ALLOC':>9} {'USED':>9} {'PEAK':>9} {'UNUSED':>9}  {'PSI CPU':>7} {'MEM':>5} {'PROCS':>5}",
    ]
    for j in snap.jobs:
        cpus = (
            ",".join(map(str, j.cpu_ids))
            if len(j.cpu_ids) <= 3
            else f"{j.cpu_ids[0]}..{j.cpu_ids[-1]}"
        )
        lines.append(
            f"{j.job_id:>8} {j.user[:10]:<10} {j.state[:10]:<10} {cpus:<8} {j.cores_allocated:>5} "
            f"{j.cores_used:>5.2f} {j.cores_idle:>5.2f}  "
            f"{j.memory_allocated_bytes / MIB:>7.0f}Mi {j.memory_used_bytes / MIB:>7.0f}Mi "
            f"{j.memory_peak_bytes / MIB:>7.0f}Mi {j.memory_unused_bytes / MIB:>7.0f}Mi  "
            f"{_pct(j.cpu_pressure):>7} {_pct(j.memory_pressure):>5} {j.processes:>5}"
        )
    if not snap.jobs:
        lines.append("   (no jobs on this node)")
    lines += [f"warning: {w}" for w in snap.warnings[:5]]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from colocate.errors import SlurmUnavailable
    from slurm_plugin.slurm import make_slurm

    node = args.node or socket.gethostname().split(".")[0]
    interval = max(0.05, args.interval)
    choices = JobChoices.of(args, node)
    sampler = Sampler(node, make_slurm(args.slurm), _source(args), window_s=max(interval * 3, 1.0))
    # Fail early, naming the known nodes, on a wrong --node; if Slurm is down, keep going:
    # snapshots say slurm_ok=false until it answers.
    with contextlib.suppress(SlurmUnavailable):
        sampler.slurm.node_info(node)
    try:
        return _loop(sampler, choices, args, interval)
    finally:
        sampler.close()


def _loop(sampler: Sampler, choices: JobChoices, args: argparse.Namespace, interval: float) -> int:
    if args.once:
        choices.sample(sampler)  # the first reading has no CPU window yet
        time.sleep(interval)
        snap = choices.sample(sampler)
        print(json.dumps(snap.to_json(), indent=2) if args.json else render_table(snap))
        return 0
    shown = 0
    choices.sample(sampler)
    tty = sys.stdout.isatty()
    while True:
        time.sleep(interval)
        snap = choices.sample(sampler)
        if args.json:
            print(json.dumps(snap.to_json()), flush=True)
        else:
            print(
                ("\x1b[H\x1b[2J" if tty else "") + render_table(snap) + ("" if tty else "\n"),
                flush=True,
            )
        shown += 1
        if args.count and shown >= args.count:
            return 0
