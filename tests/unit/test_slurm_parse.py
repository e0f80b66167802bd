"""Parsing Slurm's outputs: real 22.05 captures, a 24.05-shaped sample, and broken input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slurm_plugin.slurm import (
    JobState,
    NodeState,
    expand_hostlist,
    format_cpu_ids,
    job_state,
    node_state,
    parse_cpu_ids,
)
from slurm_plugin.slurm.parse import (
    SlurmParseError,
    jobs_for_node,
    number,
    parse_listpids,
    parse_scontrol_job_detail,
    parse_sinfo_json,
    parse_squeue_json,
)

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "slurm"
MIB = 1024**2


def text(*parts: str) -> str:
    return (FIX.joinpath(*parts)).read_text()


@pytest.mark.parametrize(
    ("raw", "hosts"),
    [
        ("n1", ("n1",)),
        ("n[2-3]", ("n2", "n3")),
        ("n[1-2,5],gpu01", ("n1", "n2", "n5", "gpu01")),
        ("c[01-03]", ("c01", "c02", "c03")),
        ("r[1-2]n[1-2]", ("r1n1", "r1n2", "r2n1", "r2n2")),
        ("", ()),
        ("(null)", ()),
    ],
)
def test_hostlists_expand_like_scontrol_show_hostnames(raw: str, hosts: tuple[str, ...]) -> None:
    assert expand_hostlist(raw) == hosts


@pytest.mark.parametrize("raw", ["n[1-", "n[a-b]", "n1]"])
def test_malformed_hostlists_raise_value_error(raw: str) -> None:
    with pytest.raises(ValueError, match="host list"):
        expand_hostlist(raw)


def test_cpu_id_lists_round_trip() -> None:
    assert parse_cpu_ids("0-3,8,10-11") == (0, 1, 2, 3, 8, 10, 11)
    assert parse_cpu_ids("") == ()
    assert format_cpu_ids((0, 1, 2, 3, 8, 10, 11)) == "0-3,8,10-11"
    with pytest.raises(ValueError, match="CPU id"):
        parse_cpu_ids("0-x")


@pytest.mark.parametrize(
    ("raw", "state"),
    [
        ("RUNNING", JobState.RUNNING),
        ("R", JobState.RUNNING),
        ("CG", JobState.COMPLETING),
        (["COMPLETING", "RUNNING"], JobState.COMPLETING),
        (["RUNNING"], JobState.RUNNING),
        ("OOM", JobState.OUT_OF_MEMORY),
        ("SOMETHING_NEW", JobState.UNKNOWN),
        (None, JobState.UNKNOWN),
    ],
)
def test_job_states_come_from_one_table(raw: object, state: JobState) -> None:
    assert job_state(raw) is state  # type: ignore[arg-type]


def test_only_allocated_states_hold_resources() -> None:
    holding = {s for s in JobState if s.holds_resources}
    assert JobState.RUNNING in holding and JobState.COMPLETING in holding
    assert JobState.PENDING not in holding and JobState.COMPLETED not in holding


@pytest.mark.parametrize(
    ("raw", "state"),
    [
        ("idle", NodeState.IDLE),
        ("mixed*", NodeState.MIXED),
        ("allocated", NodeState.ALLOCATED),
        ("drained", NodeState.DRAINED),
        (["IDLE", "DRAIN"], NodeState.DRAINED),
        (["MIXED", "DRAIN"], NodeState.DRAINING),
        ("down*", NodeState.DOWN),
        ("brand_new", NodeState.UNKNOWN),
    ],
)
def test_node_states(raw: object, state: NodeState) -> None:
    assert node_state(raw) is state  # type: ignore[arg-type]


def test_number_reads_both_json_generations() -> None:
    assert number(5) == 5.0
    assert number({"set": True, "infinite": False, "number": 7}) == 7.0
    assert number({"set": False, "infinite": False, "number": 7}) is None
    assert number({"set": True, "infinite": True, "number": 0}) is None
    assert number(True) is None and number("x") is None


def test_squeue_22_05_capture() -> None:
    parsed = parse_squeue_json(text("22.05", "squeue.json"))
    assert parsed.warnings == ()
    by_id = {j.job_id: j for j in parsed.items}
    assert set(by_id) == {str(i) for i in range(1, 10)}
    five = by_id["5"]
    assert (five.user, five.uid, five.state, five.nodes) == ("root", 0, JobState.RUNNING, ("n1",))
    assert five.memory_per_node == {"n1": 1024 * MIB} and five.cores_per_node == {"n1": 2}
    six = by_id["6"]
    assert six.nodes == ("n2", "n3") and six.memory_per_node == {"n2": 300 * MIB, "n3": 300 * MIB}
    assert by_id["9"].state is JobState.PENDING and by_id["9"].nodes == ()
    assert by_id["2"].memory_per_node == {"n2": 256 * MIB}  # from memory_per_cpu


def test_squeue_24_05_shape() -> None:
    parsed = parse_squeue_json(text("24.05", "squeue.json"))
    assert parsed.warnings == ()
    by_id = {j.job_id: j for j in parsed.items}
    job = by_id["101"]
    assert job.sluid == "sEKNKTV3WPV500" and job.state is JobState.RUNNING
    assert job.nodes == ("c1", "c2") and job.start_time == 1795870000
    assert job.time_limit_s == 3600
    assert job.memory_per_node == {"c1": 2048 * MIB, "c2": 2048 * MIB}
    assert job.cores_per_node == {"c1": 4, "c2": 4}
    assert by_id["102"].state is JobState.COMPLETING and by_id["102"].time_limit_s is None
    assert by_id["102"].memory_per_node == {"c1": 512 * MIB}


def test_a_broken_job_is_skipped_with_a_warning_and_the_rest_is_kept() -> None:
    data = json.loads(text("22.05", "squeue.json"))
    data["jobs"][4]["job_id"] = None
    data["jobs"][5]["nodes"] = "n[2-"
    data["jobs"].append("not a job")
    parsed = parse_squeue_json(json.dumps(data))
    assert len(parsed.items) == 7
    assert len(parsed.warnings) == 3
    assert any("host list" in w for w in parsed.warnings)


@pytest.mark.parametrize("bad", ["", "squeue: error: slurm_load_jobs", "[1, 2]", '{"jobs": 3}'])
def test_unreadable_answers_raise_a_parse_error(bad: str) -> None:
    with pytest.raises(SlurmParseError, match="squeue"):
        parse_squeue_json(bad)


def test_sinfo_22_05_capture() -> None:
    parsed = parse_sinfo_json(text("22.05", "sinfo.json"))
    assert parsed.warnings == ()
    nodes = {n.name: n for n in parsed.items}
    assert set(nodes) == {"n1", "n2", "n3"}
    n1 = nodes["n1"]
    assert (n1.cpus, n1.real_memory_bytes, n1.alloc_cpus, n1.alloc_memory_bytes) == (
        2,
        4096 * MIB,
        2,
        1024 * MIB,
    )
    assert n1.state is NodeState.ALLOCATED and n1.partitions == ("debug",)


def test_sinfo_24_05_shape() -> None:
    parsed = parse_sinfo_json(text("24.05", "sinfo.json"))
    nodes = {n.name: n for n in parsed.items}
    assert nodes["c1"].state is NodeState.MIXED and nodes["c1"].free_memory_bytes == 6000 * MIB
    assert nodes["c1"].cpu_load == 1.5
    assert nodes["c2"].state is NodeState.DRAINED and nodes["c2"].free_memory_bytes is None


def test_scontrol_detail_gives_cpu_ids_per_node() -> None:
    parsed = parse_scontrol_job_detail(text("22.05", "scontrol_show_job.txt"))
    assert parsed.warnings == ()
    got = {(x.job_id, x.node): (x.cpu_ids, x.memory_bytes) for x in parsed.items}
    assert got == {
        ("5", "n1"): ((0, 1), 1024 * MIB),
        ("6", "n2"): ((0,), 300 * MIB),
        ("6", "n3"): ((0,), 300 * MIB),
        ("7", "n2"): ((1,), 200 * MIB),
    }


def test_scontrol_detail_warns_about_lines_it_cannot_read() -> None:
    parsed = parse_scontrol_job_detail("garbage here\nJobId=3 Nodes=n1 CPU_IDs=0-x Mem=10\n")
    assert parsed.items == () and len(parsed.warnings) == 2


def test_listpids() -> None:
    parsed = parse_listpids(
        text("22.05", "scontrol_listpids.txt") + "\nnonsense\n4242 7 batch 0 0\n"
    )
    assert [(e.pid, e.job_id, e.step) for e in parsed.items] == [(4242, "7", "batch")]
    assert len(parsed.warnings) == 1


def test_jobs_for_node_joins_squeue_and_scontrol() -> None:
    squeue = parse_squeue_json(text("22.05", "squeue.json"))
    layouts = {
        (x.job_id, x.node): x
        for x in parse_scontrol_job_detail(text("22.05", "scontrol_show_job.txt")).items
    }
    on_n2 = jobs_for_node("n2", squeue, layouts)
    assert [(j.job_id, j.cpu_ids, j.cores, j.memory_bytes) for j in on_n2.items] == [
        ("6", (0,), 1, 300 * MIB),
        ("7", (1,), 1, 200 * MIB),
    ]
    del layouts[("7", "n2")]
    degraded = jobs_for_node("n2", squeue, layouts)
    seven = next(j for j in degraded.items if j.job_id == "7")
    assert seven.cpu_ids == () and seven.cores == 1 and seven.memory_bytes == 200 * MIB
    assert any("job 7" in w for w in degraded.warnings)
