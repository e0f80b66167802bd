"""The CLI backend over captured 22.05 outputs, served by an injected command runner; and
the pyslurm backend's refusal when its version does not match the local Slurm."""

from __future__ import annotations

import subprocess
import sys
import types
from collections.abc import Sequence
from pathlib import Path

import pytest

from colocate.errors import ConfigError, SlurmUnavailable
from slurm_plugin.slurm import CliSlurm, JobState, PyslurmSlurm, make_slurm

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "slurm" / "22.05"
MIB = 1024**2


class CapturedSlurm:
    """A command runner answering from the captured 22.05 outputs; records every call."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.fail: BaseException | None = None
        self.squeue = (FIX / "squeue.json").read_text()

    def __call__(self, argv: Sequence[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
        cmd = " ".join(argv)
        self.calls.append(cmd)
        if self.fail is not None:
            raise self.fail
        if cmd == "squeue --json":
            return subprocess.CompletedProcess(argv, 0, self.squeue, "")
        if cmd == "sinfo --json":
            return subprocess.CompletedProcess(argv, 0, (FIX / "sinfo.json").read_text(), "")
        if cmd == "sinfo --version":
            return subprocess.CompletedProcess(argv, 0, "slurm-wlm 22.05.8\n", "")
        if cmd.startswith("scontrol -o -d show job "):
            job = argv[-1]
            lines = [
                ln
                for ln in (FIX / "scontrol_show_job.txt").read_text().splitlines()
                if ln.startswith(f"JobId={job} ")
            ]
            if not lines:
                return subprocess.CompletedProcess(
                    argv, 1, "", "slurm_load_jobs error: Invalid job id specified\n"
                )
            return subprocess.CompletedProcess(argv, 0, lines[0] + "\n", "")
        if cmd == "scontrol listpids 133 n2":
            return subprocess.CompletedProcess(
                argv, 0, (FIX / "scontrol_listpids_n2.txt").read_text(), ""
            )
        if cmd.startswith("scontrol listpids "):  # as the real one answers on this host
            header = (FIX / "scontrol_listpids.txt").read_text()
            return subprocess.CompletedProcess(
                argv, 1, header, f"JobId={argv[-1]} does not exist on node (null).\n"
            )
        return subprocess.CompletedProcess(argv, 1, "", f"unexpected command {cmd}")


def test_jobs_on_a_node_with_cpu_ids_and_memory() -> None:
    runner = CapturedSlurm()
    slurm = CliSlurm(runner)
    jobs = slurm.jobs_on_node("n2")
    assert jobs.warnings == ()
    assert [(j.job_id, j.state, j.cpu_ids, j.memory_bytes, j.nodes) for j in jobs.items] == [
        ("6", JobState.RUNNING, (0,), 300 * MIB, ("n2", "n3")),
        ("7", JobState.RUNNING, (1,), 200 * MIB, ("n2",)),
    ]
    assert jobs.items[0].start_time == 1795872117 and jobs.items[0].user == "root"


def test_cpu_ids_of_a_running_job_are_asked_once() -> None:
    runner = CapturedSlurm()
    slurm = CliSlurm(runner)
    for _ in range(3):
        slurm.jobs_on_node("n1")
    assert runner.calls.count("squeue --json") == 3
    assert runner.calls.count("scontrol -o -d show job 5") == 1


def test_a_job_that_ended_between_squeue_and_scontrol_is_not_an_outage() -> None:
    runner = CapturedSlurm()
    runner.squeue = runner.squeue.replace('"job_id": 7,', '"job_id": 77,')
    jobs = CliSlurm(runner).jobs_on_node("n2")
    seventy_seven = next(j for j in jobs.items if j.job_id == "77")
    assert seventy_seven.cpu_ids == () and seventy_seven.cores == 1
    assert any("77" in w for w in jobs.warnings)


@pytest.mark.parametrize(
    ("failure", "message"),
    [
        (FileNotFoundError(), "install slurm-client"),
        (subprocess.TimeoutExpired("squeue", 10), "did not answer within 10 s"),
        (PermissionError(13, "Permission denied"), "could not be run: .*Permission denied"),
    ],
)
def test_slurm_not_answering_is_slurm_unavailable(failure: BaseException, message: str) -> None:
    runner = CapturedSlurm()
    runner.fail = failure
    with pytest.raises(SlurmUnavailable, match=message):
        CliSlurm(runner).jobs_on_node("n1")


def test_a_failing_command_and_garbage_output_are_slurm_unavailable() -> None:
    def down(argv: Sequence[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(
            argv, 1, "", "squeue: error: Unable to contact slurm controller (connect failure)\n"
        )

    with pytest.raises(SlurmUnavailable, match="connect failure"):
        CliSlurm(down).jobs_on_node("n1")

    def garbage(argv: Sequence[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(argv, 0, "<html>proxy error</html>", "")

    with pytest.raises(SlurmUnavailable, match="did not print JSON"):
        CliSlurm(garbage).jobs_on_node("n1")


def test_node_info_and_an_unknown_node() -> None:
    slurm = CliSlurm(CapturedSlurm())
    info = slurm.node_info("n3")
    assert (info.cpus, info.real_memory_bytes) == (2, 4096 * MIB)
    with pytest.raises(ConfigError, match=r"no node 'vm' \(known: n1, n2, n3\)"):
        slurm.node_info("vm")


def test_listpids_and_version() -> None:
    slurm = CliSlurm(CapturedSlurm())
    assert slurm.listpids("6").items == ()  # not on this host: empty, not an outage
    pids = slurm.listpids("133", node="n2")  # several slurmd on one host: name the node
    assert len(pids.items) == 3 and {e.job_id for e in pids.items} == {"133"}
    assert {e.step for e in pids.items} == {"batch"}
    assert slurm.listpids("12345").items == ()
    assert slurm.version() == "22.05.8"


def test_pyslurm_missing_names_the_local_slurm_and_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pyslurm", None)  # import fails, as on these machines
    with pytest.raises(
        ConfigError, match=r"cannot import pyslurm.*Slurm 22\.05\.8.*pyslurm==22\.05"
    ) as info:
        PyslurmSlurm(slurm_version="22.05.8")
    assert info.value.key == "slurm.backend"


def test_pyslurm_of_another_release_is_refused_with_both_versions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = types.ModuleType("pyslurm")
    fake.__version__ = "25.11.2"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pyslurm", fake)
    with pytest.raises(
        ConfigError, match=r"pyslurm 25\.11\.2 requires Slurm 25\.11, found Slurm 22\.05\.8"
    ):
        PyslurmSlurm(slurm_version="22.05.8")


def test_unknown_backend_names_the_choices() -> None:
    with pytest.raises(ConfigError, match="cli, pyslurm"):
        make_slurm("rest")
