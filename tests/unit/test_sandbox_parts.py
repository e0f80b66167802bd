"""The pure parts of the sandbox, the prolog's own kill and the control socket's flood guard:
CPU lists, finding a node's lease cgroups on a committed-layout tree, Slurm's CPU_IDs, the
per-uid token buckets, and config errors a site would make."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from colocate import ConfigError
from colocate.config import ExecutorConfig
from colocate.executor.cgroupkill import lease_cgroups_on, parse_cpu_list
from slurm_plugin.control import _Buckets
from slurm_plugin.hooks import _node_cpu_fields


def test_cpu_lists_as_the_kernel_and_slurm_write_them() -> None:
    assert parse_cpu_list("0-2,5\n") == {0, 1, 2, 5}
    assert parse_cpu_list("7") == {7}
    assert parse_cpu_list("") == set()
    with pytest.raises(ValueError):
        parse_cpu_list("x")


def _lease(root: Path, node: str, lease: str, cpus: str | None) -> None:
    for ctrl in ("memory", "cpuset", "pids", "freezer"):
        d = root / ctrl / "colocate" / node / lease
        d.mkdir(parents=True)
        if ctrl == "cpuset" and cpus is not None:
            (d / "cpuset.cpus").write_text(cpus + "\n")


def test_the_prolog_finds_the_leases_on_the_jobs_cores_only(tmp_path: Path) -> None:
    _lease(tmp_path, "n1", "on-core-1", "1")
    _lease(tmp_path, "n1", "on-core-0", "0")
    _lease(tmp_path, "n1", "no-cpuset", None)  # unreadable: the safe side, it goes too
    _lease(tmp_path, "n2", "other-node", "1")
    found = lease_cgroups_on("n1", frozenset({1}), str(tmp_path))
    assert sorted(found) == ["no-cpuset", "on-core-1"]
    assert len(found["on-core-1"]) == 4  # memory, cpuset, pids, freezer
    assert sorted(lease_cgroups_on("n1", None, str(tmp_path))) == [
        "no-cpuset",
        "on-core-0",
        "on-core-1",
    ]
    assert lease_cgroups_on("n9", None, str(tmp_path)) == {}


def test_cpu_ids_per_node_from_scontrol_show_job() -> None:
    text = (
        "JobId=42 JobName=wrap UserId=a(1001) ... NumNodes=2 "
        "Nodes=n1 CPU_IDs=0-1 Mem=100 GRES= Nodes=n2 CPU_IDs=1 Mem=100 GRES= "
    )
    assert _node_cpu_fields(text) == [("n1", "0-1"), ("n2", "1")]


def test_a_uid_past_its_rate_is_held_back_and_recovers() -> None:
    buckets = _Buckets(rate=5.0, burst=10.0)
    allowed = [buckets.allow(1000, 0.0) for _ in range(20)]
    assert allowed.count(True) == 10  # the burst
    assert buckets.allow(2000, 0.0)  # another uid is not held back
    assert not buckets.allow(1000, 0.1)  # half a token back
    assert buckets.allow(1000, 0.3)  # 1.5 tokens back


def test_pool_without_a_uid_range_is_a_config_error() -> None:
    from colocate.executor import ExecutorSupervisor

    with pytest.raises(ConfigError, match="lease_uid_range"):
        ExecutorSupervisor(ExecutorConfig(run_as="pool"), b"s" * 32, node="n1", cgroup_root="")


def test_unknown_network_modes_are_refused() -> None:
    with pytest.raises(ValueError):
        ExecutorConfig(network="everything")  # type: ignore[arg-type]


FIB_TRIE = """Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 127.0.0.0/8 2 0 2
        +-- 127.0.0.0/31 1 0 0
           |-- 127.0.0.0
              /8 host LOCAL
           |-- 127.0.0.1
              /32 host LOCAL
     |-- 192.0.2.2
        /32 host LOCAL
     |-- 192.0.2.255
        /32 link BROADCAST
Local:
  +-- 0.0.0.0/0 3 0 5
     |-- 192.0.2.2
        /32 host LOCAL
"""
IF_INET6 = """fd000000000000000000000000000002 04 40 00 82     eth0
00000000000000000000000000000001 01 80 10 80       lo
"""


def test_the_nodes_own_addresses_from_the_kernels_tables(tmp_path: Path) -> None:
    from colocate.executor.netguard import local_addresses, program_v4, program_v6

    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "fib_trie").write_text(FIB_TRIE)
    (tmp_path / "net" / "if_inet6").write_text(IF_INET6)
    v4, v6 = local_addresses(str(tmp_path))
    assert v4 == [bytes([127, 0, 0, 1]), bytes([192, 0, 2, 2])]
    assert v6 == [bytes(15) + b"\x01", bytes.fromhex("fd000000000000000000000000000002")]
    # one 8-byte instruction per step; every jump lands inside the program
    for program in (program_v4(v4), program_v6(v4, v6)):
        assert len(program) % 8 == 0
        insns = [struct.unpack_from("<BBhi", program, i) for i in range(0, len(program), 8)]
        for i, (code, _regs, off, _imm) in enumerate(insns):
            if code & 0x07 in (0x05, 0x06) and code != 0x95:  # jumps (not exit)
                assert 0 <= i + 1 + off < len(insns)
        assert insns[-1][0] == 0x95  # ends with exit
    assert local_addresses(str(tmp_path / "missing")) == ([], [])
