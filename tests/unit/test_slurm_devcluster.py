"""The dev cluster's generated files: slurm.conf, cgroup.conf and the never-failing hook wrappers."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from colocate.errors import ConfigError
from slurm_plugin.devcluster import DevCluster, DevClusterError, node_names


def cluster(tmp_path: Path, python: str = "/usr/bin/python3", **kw: object) -> DevCluster:
    return DevCluster(state_dir=tmp_path / "state", conf_dir=tmp_path / "etc", python=python, **kw)  # type: ignore[arg-type]


def conf_values(text: str) -> dict[str, str]:
    return dict(
        line.split("=", 1)
        for line in text.splitlines()
        if "=" in line and not line.startswith(("#", "NodeName", "PartitionName"))
    )


def test_slurm_conf_has_the_nodes_the_cgroup_plugins_and_the_hooks(tmp_path: Path) -> None:
    c = cluster(tmp_path)
    text = c.render_slurm_conf(3)
    values = conf_values(text)
    assert (
        values["Prolog"] == f"{tmp_path}/state/prolog.sh"
        and values["Epilog"] == f"{tmp_path}/state/epilog.sh"
    )
    assert values["PrologFlags"] == "Alloc"
    assert (
        values["ProctrackType"] == "proctrack/cgroup"
        and values["TaskPlugin"] == "task/cgroup,task/affinity"
    )
    assert values["SelectTypeParameters"] == "CR_Core_Memory"
    nodes = [line for line in text.splitlines() if line.startswith("NodeName=")]
    assert [line.split()[0] for line in nodes] == ["NodeName=n1", "NodeName=n2", "NodeName=n3"]
    ports = {line.split("Port=")[1].split()[0] for line in nodes}
    assert len(ports) == 3  # one port per slurmd
    assert all("RealMemory=4096" in line for line in nodes)
    partition = next(line for line in text.splitlines() if line.startswith("PartitionName="))
    assert "Nodes=n1,n2,n3" in partition and "Default=YES" in partition
    assert "%n" in values["SlurmdSpoolDir"] and "%n" in values["SlurmdPidFile"]
    assert "CgroupPlugin=cgroup/v1" in c.render_cgroup_conf()
    assert c.render_slurm_conf(3) == text  # same inputs, same text: `up` twice changes nothing


@pytest.mark.parametrize("python", ["/bin/false", "/nonexistent/python"])
def test_the_hook_wrappers_exit_0_when_the_hook_fails(tmp_path: Path, python: str) -> None:
    c = cluster(tmp_path, python=python)
    c.log_dir.mkdir(parents=True)
    for phase in ("prolog", "epilog"):
        script = tmp_path / f"{phase}.sh"
        script.write_text(c.render_hook(phase))
        script.chmod(0o755)
        proc = subprocess.run([str(script)], env={}, capture_output=True, timeout=30, check=False)
        assert proc.returncode == 0


def test_a_hanging_hook_is_cut_off_and_still_exits_0(tmp_path: Path) -> None:
    hang = tmp_path / "hang"
    hang.write_text("#!/bin/sh\nsleep 60\n")
    hang.chmod(0o755)
    c = cluster(tmp_path, python=str(hang), hook_timeout_s=0.5)
    c.log_dir.mkdir(parents=True)
    script = tmp_path / "prolog.sh"
    script.write_text(c.render_hook("prolog"))
    script.chmod(0o755)
    t0 = time.monotonic()
    proc = subprocess.run([str(script)], env={}, timeout=30, check=False)
    assert proc.returncode == 0 and time.monotonic() - t0 < 5


def test_the_hook_runs_colocate_with_a_path_set(tmp_path: Path) -> None:
    text = cluster(tmp_path, python="/opt/venv/bin/python").render_hook("epilog")
    assert (
        "export PATH=" in text
        and "/opt/venv/bin/python -m slurm_plugin.hooks epilog --socket '/run/colocate/{node}.sock'"
        in text
    )
    assert text.rstrip().endswith("exit 0")


def test_files_are_rewritten_only_when_they_change(tmp_path: Path) -> None:
    c = cluster(tmp_path)
    target = tmp_path / "slurm.conf"
    assert c._write_if_changed(target, "a\n")
    assert not c._write_if_changed(target, "a\n")
    assert c._write_if_changed(target, "b\n")


def test_a_foreign_slurm_conf_is_kept_as_a_backup(tmp_path: Path) -> None:
    c = cluster(tmp_path)
    target = tmp_path / "slurm.conf"
    target.write_text("ClusterName=site\n")
    c._write_if_changed(target, c.render_slurm_conf(1))
    assert (tmp_path / "slurm.conf.before-colocate").read_text() == "ClusterName=site\n"


def test_a_failed_install_says_what_failed(tmp_path: Path) -> None:
    def runner(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        if argv[0] == "dpkg-query":
            return subprocess.CompletedProcess(argv, 1, "", "no packages found")
        return subprocess.CompletedProcess(argv, 100, "", "E: Unable to locate package slurmctld")

    with pytest.raises(
        DevClusterError,
        match=r"apt-get install slurmctld slurmd slurm-client munge failed.*Unable to locate",
    ):
        cluster(tmp_path, run=runner).install_packages()


def test_zero_nodes_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="at least 1"):
        cluster(tmp_path).up(0)


def test_status_of_a_cluster_never_started(tmp_path: Path) -> None:
    status = cluster(tmp_path).status()
    assert status.nodes == () and not status.running
    assert status.to_json()["running"] is False
    assert node_names(2) == ("n1", "n2")
