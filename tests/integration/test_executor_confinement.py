"""Lease cgroups on small cgroup v1 and v2 trees built in a temporary directory (the layout the
kernel shows; the live v1 hierarchy is exercised by test_executor_faults)."""

from __future__ import annotations

from pathlib import Path

import pytest

from colocate import BadRequest
from colocate.executor.confinement import Confinement, check_name


def v1_tree(root: Path) -> Path:
    (root / "memory").mkdir(parents=True)
    (root / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    (root / "cpuset").mkdir()
    (root / "cpuset" / "cpuset.cpus").write_text("0-3\n")
    (root / "cpuset" / "cpuset.mems").write_text("0\n")
    return root


def v2_tree(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (root / "cgroup.subtree_control").write_text("")
    return root


def test_v1_lease_gets_a_memory_limit_and_its_cores_under_colocate_node(tmp_path: Path) -> None:
    root = v1_tree(tmp_path)
    for d in ("colocate", "colocate/n1"):  # the kernel creates these files in a new cpuset
        for key in ("cpuset.cpus", "cpuset.mems"):
            (root / "cpuset" / d).mkdir(parents=True, exist_ok=True)
            (root / "cpuset" / d / key).write_text("")
    conf = Confinement("n1", str(root))
    assert conf.mode == "v1"
    assert (root / "cpuset/colocate/cpuset.cpus").read_text() == "0-3"  # copied from the parent
    cg = conf.create("l1", (2, 3), 512 << 20)
    assert cg.dirs == (str(root / "memory/colocate/n1/l1"), str(root / "cpuset/colocate/n1/l1"))
    assert (root / "memory/colocate/n1/l1/memory.limit_in_bytes").read_text() == str(512 << 20)
    assert (root / "cpuset/colocate/n1/l1/cpuset.cpus").read_text() == "2,3"
    assert (root / "cpuset/colocate/n1/l1/cpuset.mems").read_text() == "0"
    assert sorted(conf.lease_dirs()) == ["l1"]


def test_v2_lease_gets_memory_max_and_cpuset_with_controllers_delegated(tmp_path: Path) -> None:
    root = v2_tree(tmp_path)
    conf = Confinement("n1", str(root))
    assert conf.mode == "v2"
    assert "+memory" in (root / "cgroup.subtree_control").read_text()
    cg = conf.create("l1", (1,), 256 << 20)
    lease = root / "colocate/n1/l1"
    assert cg.dirs == (str(lease),)
    assert (lease / "memory.max").read_text() == str(256 << 20)
    assert (lease / "cpuset.cpus").read_text() == "1"


def test_no_writable_hierarchy_means_rlimits(tmp_path: Path) -> None:
    assert Confinement("n1", str(tmp_path)).mode == "rlimit"
    assert Confinement("n1", None).mode == "rlimit"


@pytest.mark.parametrize("name", ["", "..", "a/b", "x" * 129, "lease id", "ü"])
def test_lease_ids_that_are_not_plain_directory_names_are_refused(name: str) -> None:
    with pytest.raises(BadRequest):
        check_name(name, "lease id")


def test_v1_pids_and_freezer_groups_when_the_controllers_exist(tmp_path: Path) -> None:
    root = v1_tree(tmp_path)
    for d in ("colocate", "colocate/n1"):
        for key in ("cpuset.cpus", "cpuset.mems"):
            (root / "cpuset" / d).mkdir(parents=True, exist_ok=True)
            (root / "cpuset" / d / key).write_text("")
    assert Confinement("n1", str(root)).create("l0", (1,), 1 << 20, pids_max=64).pids_max == 0
    for ctrl in ("pids", "freezer"):
        (root / ctrl).mkdir()
        (root / ctrl / "cgroup.procs").write_text("")
    cg = Confinement("n1", str(root)).create("l1", (1,), 1 << 20, pids_max=64)
    assert cg.pids_max == 64
    assert (root / "pids/colocate/n1/l1/pids.max").read_text() == "64"
    assert str(root / "freezer/colocate/n1/l1") in cg.dirs
