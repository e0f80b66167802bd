"""The calibration run on one real node: Slurm jobs, leases through the broker, functions
through the Client.

For each kernel (:mod:`colocate.calibrate.kernels`) one batch job is submitted to the node
with ``--exclusive``; the kernel pins itself to the first CPU Slurm gave it and leaves the
others idle, the shape colocate lends from. Once the node's agent offers an idle core, one
core is leased through the broker, and for each repeat the lease runs, in an order rotated
per repeat, ``idle`` (the job alone) and each function for ``segment_s`` seconds
(:mod:`colocate.calibrate.functions`). Each function stamps its window with the node's clock;
the kernel stamps its iterations with the same clock; the slowdown of a repeat is the
kernel's median iteration time in the function's window over the one in the idle window of
that repeat (:mod:`colocate.calibrate.stats`). Alone and with-function windows alternate
within one job, a few seconds apart, so load from elsewhere on the machine that drifts over
minutes hits both sides alike.

A lease the agent takes back (its guard evicting under pressure) is asked again and the
window rerun, until ``lease_timeout_s``.

Every call to Slurm goes through :meth:`Calibration.slurm`.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from colocate.calibrate.functions import FUNCTIONS
from colocate.calibrate.kernels import KERNELS
from colocate.calibrate.stats import Iteration, summarize, window_ratio
from colocate.errors import BackendUnavailable, ColocateError, ConfigError, LeaseDenied
from policies.interference import FORMAT

log = logging.getLogger(__name__)

FUNCTION_MODULE = "colocate.calibrate.functions"
GAP_S = 0.3  # between windows: the previous function's last cache lines settle


@dataclass(frozen=True)
class Settings:
    """What to run: ``node`` of the cluster whose agent reports to ``broker_url``."""

    node: str
    broker_url: str
    repeats: int = 5
    segment_s: float = 3.0
    scale: float = 1.0
    kernels: tuple[str, ...] = tuple(KERNELS)
    functions: tuple[str, ...] = FUNCTIONS
    workdir: str | None = None  # shared by this host and the node; default a new /tmp dir
    memory: str = "1G"  # the kernel job's --mem
    time_limit_min: int = 30
    lease_timeout_s: float = 120.0
    measure: str = "wall"  # what ``slowdown`` is: "wall" time, or "cpu" time of the kernel
    python: str = field(default_factory=lambda: sys.executable)

    def check(self) -> None:
        if self.repeats < 1:
            raise ConfigError("--repeats must be at least 1", key="--repeats")
        if self.segment_s <= 0.2:
            raise ConfigError("--segment-s must be above 0.2 s", key="--segment-s")
        if self.measure not in ("wall", "cpu"):
            raise ConfigError("--measure must be wall or cpu", key="--measure")
        if self.scale <= 0:
            raise ConfigError("--scale must be > 0", key="--scale")
        for name in self.kernels:
            if name not in KERNELS:
                raise ConfigError(
                    f"unknown kernel {name!r}; known: {', '.join(KERNELS)}", key="--kernels"
                )
        for name in self.functions:
            if name not in FUNCTIONS:
                raise ConfigError(
                    f"unknown function {name!r}; known: {', '.join(FUNCTIONS)}", key="--functions"
                )


class Calibration:
    """One calibration run; :meth:`run` returns the table as a JSON-ready dict."""

    def __init__(self, settings: Settings, progress: Callable[[str], None] | None = None) -> None:
        settings.check()
        self.settings = settings
        self.progress = progress or (lambda line: None)
        self.workdir = Path(settings.workdir or tempfile.mkdtemp(prefix="colocate-calibrate-"))
        self.evictions = 0
        self._share = 0.5  # leased cores / node cores, set at the first lease

    def slurm(self, *argv: str, timeout: float = 30.0) -> str:
        """Run one Slurm command; its stdout. BackendUnavailable naming it when it fails."""
        try:
            proc = subprocess.run(
                list(argv), capture_output=True, text=True, timeout=timeout, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BackendUnavailable(
                f"`{argv[0]}` did not run ({exc}); is Slurm installed and up?"
            ) from None
        if proc.returncode != 0:
            raise BackendUnavailable(
                f"`{' '.join(argv[:3])} ...` failed: {proc.stderr.strip() or proc.returncode}"
            )
        return proc.stdout

    def run(self) -> dict[str, Any]:
        from colocate.client.lease import Client

        s = self.settings
        started = time.time()
        ratios: dict[tuple[str, str], list[tuple[float, float]]] = {}
        with Client(s.broker_url) as client:
            client.status()  # an unreachable broker fails here, before any job is submitted
            for kernel in s.kernels:
                ratios.update(self._kernel(client, kernel))
        other = "wall" if s.measure == "cpu" else "cpu"
        cells = []
        for kernel in s.kernels:
            for fn in s.functions:
                pairs = ratios.get((kernel, fn), [])
                if not pairs:
                    raise ColocateError(
                        f"kernel {kernel} x {fn}: no window held a whole kernel iteration; "
                        "raise --segment-s"
                    )
                wall = [w for w, _ in pairs]
                cpu = [c for _, c in pairs]
                if s.measure == "cpu":
                    wall, cpu = cpu, wall
                mean, low, high, n = summarize(wall)
                cpu_mean, cpu_low, cpu_high, _ = summarize(cpu)
                cells.append(
                    {
                        "kernel": kernel,
                        "kind": KERNELS[kernel],
                        "function": fn,
                        "slowdown": round(mean, 5),
                        "ci_low": round(low, 5),
                        "ci_high": round(high, 5),
                        "n": n,
                        f"{other}_slowdown": round(cpu_mean, 5),
                        f"{other}_ci_low": round(cpu_low, 5),
                        f"{other}_ci_high": round(cpu_high, 5),
                        "samples": [round(v, 5) for v in wall],
                        f"{other}_samples": [round(v, 5) for v in cpu],
                    }
                )
        return {
            "format": FORMAT,
            "source": f"colocate calibrate on {s.node}",
            "function_share": self._share,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": _machine(),
            "node": s.node,
            "settings": {k: v for k, v in asdict(s).items() if k not in ("python", "broker_url")},
            "measure": s.measure,
            "method": f"slowdown = median kernel iteration {s.measure} time while the function "
            "ran / median in the idle window of the same repeat; geometric mean over repeats, "
            f"95 % t-interval on log ratios; {other}_slowdown: the same on {other} time "
            "(cpu: the kernel thread's own, without the time it waited for its core)",
            "lease_evictions": self.evictions,
            "seconds": round(time.time() - started, 1),
            "cells": cells,
        }

    def _kernel(self, client: Any, kernel: str) -> dict[tuple[str, str], list[tuple[float, float]]]:
        """(kernel, function) -> per-repeat (wall, cpu) slowdown ratios."""
        s = self.settings
        stop = self.workdir / f"{kernel}.stop"
        out = self.workdir / f"{kernel}.out"
        stop.unlink(missing_ok=True)
        command = (
            f"exec {s.python} -m colocate.calibrate.kernels {kernel} --pin "
            f"--stop {stop} --scale {s.scale} --max-s {s.time_limit_min * 60}"
        )
        job_id = self.slurm(
            "sbatch", "--parsable", "--exclusive", "-w", s.node, "-N1", "-n1",
            f"--mem={s.memory}", f"--time={s.time_limit_min}", f"--job-name=colocate-calibrate-{kernel}",
            "-o", str(out),
            "--export=ALL,OMP_NUM_THREADS=1,OPENBLAS_NUM_THREADS=1,MKL_NUM_THREADS=1",
            "--wrap", command,
        ).strip().split(";")[0]  # fmt: skip
        self.progress(f"{kernel}: job {job_id} submitted to {s.node}")
        windows: list[tuple[int, str, float, float]] = []
        held: list[Any] = []  # [lease, its executor] once leased
        try:
            self._wait_running(job_id)
            self._wait_iterating(out)
            order = ["idle", *s.functions]
            for repeat in range(s.repeats):
                shift = repeat % len(order)
                for fn in order[shift:] + order[:shift]:
                    windows.append((repeat, fn, *self._window(client, held, fn)))
                self.progress(f"{kernel}: repeat {repeat + 1}/{s.repeats} done")
        finally:
            stop.touch()
            _close(held)
            self._wait_gone(job_id)
        iterations = _iterations(out)
        alone = {r: (a, b) for r, fn, a, b in windows if fn == "idle"}
        result: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for repeat, fn, a, b in windows:
            if fn == "idle":
                continue
            wall = window_ratio(iterations, (a, b), alone[repeat])
            cpu = window_ratio(iterations, (a, b), alone[repeat], cpu=True)
            if wall is not None and cpu is not None:
                result.setdefault((kernel, fn), []).append((wall, cpu))
        line = ", ".join(
            f"{fn} {sum(w for w, _ in v) / len(v):.3f}x (cpu {sum(c for _, c in v) / len(v):.3f}x)"
            for (_, fn), v in sorted(result.items(), key=lambda kv: kv[0][1])
        )
        self.progress(f"{kernel}: {len(iterations)} iterations; mean slowdown {line}")
        return result

    def _window(self, client: Any, held: list[Any], fn: str) -> tuple[float, float]:
        """Run ``fn`` for one window on the held (lease, executor), asking a new lease when
        the node took it back; ``held`` is [] before the first lease."""
        from colocate.errors import ExecutorLost, LeaseEvicted, LeaseExpired

        deadline = time.monotonic() + self.settings.lease_timeout_s
        while True:
            if not held:
                held[:] = [self._lease(client, deadline), None]
            lease = held[0]
            try:
                if held[1] is None:  # the lease may be taken back before its executor answers
                    held[1] = lease.executor()
                executor = held[1]
                time.sleep(GAP_S)
                start, end, _ = executor.invoke(f"{FUNCTION_MODULE}:{fn}", self.settings.segment_s)
                return float(start), float(end)
            except (LeaseEvicted, LeaseExpired, ExecutorLost) as exc:
                self.evictions += 1
                self.progress(f"lease {lease.lease_id} taken back ({exc}); asking again")
                _close(held)
                if time.monotonic() > deadline:
                    raise

    def _lease(self, client: Any, deadline: float) -> Any:
        """One core on the node, once its agent offers it."""
        s = self.settings
        duration = s.segment_s * (len(s.functions) + 1) * s.repeats * 2 + 120
        while True:
            try:
                lease = client.lease(1, "256MiB", duration)
            except LeaseDenied:
                if time.monotonic() > deadline:
                    raise BackendUnavailable(
                        f"no core of {s.node} offered within {s.lease_timeout_s:g} s; is its "
                        "agent running and reporting to this broker?"
                    ) from None
                time.sleep(1.0)
                continue
            if lease.node != s.node:
                lease.release()
                raise ConfigError(
                    f"the broker placed the lease on {lease.node}, not {s.node}: calibrate "
                    "against a broker only the calibrated node reports to"
                )
            cores = int(self.slurm("sinfo", "-h", "-n", s.node, "-o", "%c").split()[0])
            self._share = lease.cores / cores
            self.progress(f"leased core {list(lease.cpu_ids)} of {s.node} ({lease.lease_id})")
            return lease

    def _wait_running(self, job_id: str, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            state = self.slurm("squeue", "-h", "-j", job_id, "-o", "%T").strip()
            if state == "RUNNING":
                return
            if state not in ("PENDING", "CONFIGURING"):
                raise BackendUnavailable(f"kernel job {job_id} is {state or 'gone'}, not running")
            time.sleep(0.2)
        self.slurm("scancel", job_id)
        raise BackendUnavailable(
            f"kernel job {job_id} did not start on {self.settings.node} within {timeout_s:g} s"
        )

    def _wait_iterating(self, out: Path, timeout_s: float = 120.0) -> None:
        """Until the kernel has pinned itself and timed an iteration: before, its start-up
        floats over the node's cores and the agent may lend the one it then pins to."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if any(not line.startswith("#") for line in out.read_text().splitlines()):
                    return
            time.sleep(0.2)
        raise BackendUnavailable(
            f"the kernel wrote no iteration to {out} within {timeout_s:g} s; pass a --workdir "
            "the node and this host share"
        )

    def _wait_gone(self, job_id: str, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                state = self.slurm("squeue", "-h", "-j", job_id, "-o", "%T").strip()
            except BackendUnavailable:
                return  # squeue forgot it
            if not state:
                return
            time.sleep(0.2)
        self.slurm("scancel", job_id)


def _close(held: list[Any]) -> None:
    """Shut the held executor and release the lease (both may already be gone)."""
    if held:
        lease, executor = held
        held.clear()
        if executor is not None:
            with contextlib.suppress(ColocateError, OSError):
                executor.shutdown()
        with contextlib.suppress(ColocateError, OSError):
            lease.release()


def _iterations(path: Path) -> list[Iteration]:
    """The ``START END CPU`` lines a kernel printed (comment lines skipped)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise BackendUnavailable(
            f"cannot read the kernel's output {path} ({exc.strerror}); pass a --workdir the "
            "node and this host share"
        ) from None
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and not line.startswith("#"):
            out.append((float(parts[0]), float(parts[1]), float(parts[2])))
    return out


def _machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "hostname": platform.node(),
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
    }


def write_plot(table: dict[str, Any], path: Path) -> None:
    """A grouped bar chart: slowdown per kernel, one bar per function, 95 % CI whiskers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells: Sequence[dict[str, Any]] = table["cells"]
    kernels = list(dict.fromkeys(c["kernel"] for c in cells))
    functions = list(dict.fromkeys(c["function"] for c in cells))
    width = 0.8 / len(functions)
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, fn in enumerate(functions):
        mine = [next(c for c in cells if c["kernel"] == k and c["function"] == fn) for k in kernels]
        xs = [k + (i - (len(functions) - 1) / 2) * width for k in range(len(kernels))]
        ys = [c["slowdown"] for c in mine]
        err = [
            [c["slowdown"] - c["ci_low"] for c in mine],
            [c["ci_high"] - c["slowdown"] for c in mine],
        ]
        ax.bar(xs, ys, width, yerr=err, capsize=3, label=fn)
        other = "wall" if table.get("measure") == "cpu" else "cpu"
        if all(f"{other}_slowdown" in c for c in mine):
            ax.scatter(
                xs,
                [c[f"{other}_slowdown"] for c in mine],
                marker="_",
                s=200,
                color="black",
                zorder=3,
                label=f"{other} time" if i == 0 else None,
            )
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(kernels)))
    ax.set_xticklabels([f"{k}\n({KERNELS.get(k, '?')})" for k in kernels])
    ax.set_ylabel(f"kernel runtime with / alone ({table.get('measure', 'wall')} time)")
    ax.set_title(
        f"Interference on {table.get('node', '?')} ({table.get('date', '')[:10]}), "
        f"n={max(c['n'] for c in cells)} repeats, 95 % CI"
    )
    low = min(min(c["ci_low"], c.get("cpu_slowdown", c.get("wall_slowdown", 1.0))) for c in cells)
    ax.set_ylim(bottom=min(0.95, low - 0.02))
    ax.legend(title="function on the idle core")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def dumps(table: dict[str, Any]) -> str:
    return json.dumps(table, indent=2) + "\n"
