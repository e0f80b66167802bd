"""Where a sweep's trials run: local processes, a Slurm job array, or a Dask cluster.

Every runner takes :class:`~traces.sweep.Trial` s and returns their rows in the same order,
each made by :func:`traces.sweep.run_trial` on the trial's JSON form. The Slurm runner talks
to Slurm only through :class:`slurm_plugin.slurm.CliSlurm` (the one seam to Slurm).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import shlex
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from colocate.errors import BackendUnavailable, ConfigError
from traces.sweep import Trial, run_trial, run_trials

log = logging.getLogger(__name__)

Rows = list[dict[str, Any]]


class Runner(Protocol):
    """Runs trials somewhere; the rows come back in the trials' order."""

    name: str

    def run(self, trials: Sequence[Trial]) -> Rows: ...


class LocalRunner:
    """Trials as local processes (``workers`` at a time; 1 runs them in this process)."""

    name = "local"

    def __init__(self, workers: int = 1) -> None:
        if workers < 1:
            raise ConfigError("--workers must be at least 1", key="--workers")
        self.workers = workers

    def run(self, trials: Sequence[Trial]) -> Rows:
        if self.workers == 1 or len(trials) <= 1:
            return run_trials(trials)
        with ProcessPoolExecutor(max_workers=min(self.workers, len(trials))) as pool:
            return list(pool.map(run_trial, [t.to_dict() for t in trials]))


class SlurmArrayRunner:
    """Trials as one Slurm job array on the site's cluster.

    The trials go to ``directory/sweep-<id>/trials.json`` (a directory every node sees:
    a shared file system at a site; any local path on a one-machine dev cluster). Array task
    ``i`` of ``K`` runs trials ``i, i+K, ...`` with ``python -m colocate.sweep.task`` and
    writes one ``result-<n>.json`` per trial; this process waits for the array to leave the
    queue and gathers them. ``python`` must be the colocate interpreter on the nodes
    (default: this one).
    """

    name = "slurm"

    def __init__(
        self,
        directory: str | Path,
        *,
        tasks: int | None = None,
        partition: str | None = None,
        cpus_per_task: int = 1,
        mem: str = "1500M",
        time_limit: str | None = None,
        sbatch_args: Sequence[str] = (),
        python: str = sys.executable,
        timeout_s: float = 3600.0,
        poll_s: float = 1.0,
        slurm: Any = None,
    ) -> None:
        if tasks is not None and tasks < 1:
            raise ConfigError("--array-tasks must be at least 1", key="--array-tasks")
        self.directory = Path(directory)
        self.tasks = tasks
        self.partition = partition
        self.cpus_per_task = cpus_per_task
        self.mem = mem
        self.time_limit = time_limit
        self.sbatch_args = list(sbatch_args)
        self.python = python
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        if slurm is None:
            from slurm_plugin.slurm import CliSlurm

            slurm = CliSlurm(timeout_s=30.0)
        self.slurm = slurm
        self.last_job_id: str | None = None
        self.last_dir: Path | None = None

    def run(self, trials: Sequence[Trial]) -> Rows:
        if not trials:
            return []
        work = self.directory / f"sweep-{uuid.uuid4().hex[:12]}"
        try:
            work.mkdir(parents=True)
            k = min(len(trials), self.tasks or len(trials))
            (work / "trials.json").write_text(
                json.dumps({"tasks": k, "trials": [t.to_dict() for t in trials]})
            )
        except OSError as exc:
            raise ConfigError(
                f"cannot write the sweep directory: {exc.strerror}", path=str(work)
            ) from None
        self.last_dir = work
        argv = [
            "sbatch",
            "--parsable",
            f"--array=0-{k - 1}",
            "--job-name=colocate-sweep",
            f"--cpus-per-task={self.cpus_per_task}",
            f"--mem={self.mem}",
            f"--chdir={work}",
            f"--output={work}/task-%a.out",
        ]
        if self.partition:
            argv.append(f"--partition={self.partition}")
        if self.time_limit:
            argv.append(f"--time={self.time_limit}")
        argv += self.sbatch_args
        cmd = f"exec {shlex.quote(self.python)} -m colocate.sweep.task {shlex.quote(str(work))}"
        argv.append(f"--wrap={cmd}")
        job_id = self.slurm.run(argv).strip().split(";")[0]
        self.last_job_id = job_id
        log.info("sweep: %d trials as job array %s (%d tasks) in %s", len(trials), job_id, k, work)
        self._wait(job_id, work, len(trials))
        return self._gather(trials, work, k)

    def _wait(self, job_id: str, work: Path, n: int) -> None:
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                queued = self.slurm.run(["squeue", "-h", "-j", job_id, "-o", "%i"]).strip()
            except LookupError:  # the job left slurmctld's memory: it is over
                queued = ""
            if not queued:
                return
            if time.monotonic() > deadline:
                with contextlib.suppress(LookupError, BackendUnavailable):
                    self.slurm.run(["scancel", job_id])
                done = len(list(work.glob("result-*.json")))
                raise BackendUnavailable(
                    f"job array {job_id} did not finish within {self.timeout_s:g} s "
                    f"({done} of {n} trials done); cancelled it. Raise --timeout or check "
                    f"`squeue -j {job_id}`"
                )
            time.sleep(self.poll_s)

    def _gather(self, trials: Sequence[Trial], work: Path, k: int) -> Rows:
        rows = []
        for i, trial in enumerate(trials):
            path = work / f"result-{i}.json"
            try:
                rows.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                log_path = work / f"task-{i % k}.out"
                raise BackendUnavailable(
                    f"trial {i} ({trial.label()}) wrote no result; see {log_path}"
                ) from None
        return rows


class DaskRunner:
    """Trials on a Dask cluster: ``address`` of a running scheduler, else a LocalCluster of
    ``workers`` single-threaded worker processes started for the sweep."""

    name = "dask"

    def __init__(self, address: str | None = None, workers: int = 2) -> None:
        if workers < 1:
            raise ConfigError("--workers must be at least 1", key="--workers")
        self.address = address
        self.workers = workers

    def run(self, trials: Sequence[Trial]) -> Rows:
        try:
            dd: Any = importlib.import_module("dask.distributed")  # untyped: used as Any
        except ImportError:
            raise ConfigError(
                "the Dask runner needs dask.distributed: pip install 'slurm-colocate[sweep]'"
            ) from None
        payload = [t.to_dict() for t in trials]
        if self.address:
            try:
                client = dd.Client(self.address, timeout=30)
            except (OSError, TimeoutError) as exc:
                raise BackendUnavailable(
                    f"no Dask scheduler at {self.address}: {exc}; check --dask-scheduler"
                ) from None
            with client:
                return _gather_dask(client, payload)
        # distributed logs every worker's start and stop at INFO: keep the CLI's output clean
        logging.getLogger("distributed").setLevel(max(log.getEffectiveLevel(), logging.WARNING))
        with (
            dd.LocalCluster(
                n_workers=self.workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=":0",
                silence_logs=logging.ERROR,
            ) as cluster,
            dd.Client(cluster) as client,
        ):
            return _gather_dask(client, payload)


def _gather_dask(client: Any, payload: list[dict[str, Any]]) -> Rows:
    futures = client.map(run_trial, payload, pure=False)
    return list(client.gather(futures))


RUNNERS: dict[str, Callable[..., Runner]] = {
    "local": LocalRunner,
    "slurm": SlurmArrayRunner,
    "dask": DaskRunner,
}
