"""Every Slurm backend answers the same questions the same way, for the same cluster state:
the CLI backend over captured 22.05 outputs, the in-memory StaticSlurm, and the pyslurm
backend over a stand-in module shaped like pyslurm 22.5.3's object API (the real one is
compared with the CLI backend on the live cluster in
tests/integration/test_slurm_pyslurm.py)."""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest

from colocate.errors import ConfigError, SlurmUnavailable
from slurm_plugin.slurm import (
    CliSlurm,
    JobOnNode,
    JobState,
    NodeInfo,
    NodeState,
    PyslurmSlurm,
    SlurmClient,
    StaticSlurm,
    parse_cpu_ids,
)
from tests.unit.test_slurm_cli import CapturedSlurm

MIB = 1024**2
# The state captured in tests/fixtures/slurm/22.05, as the other backends hold it.
JOBS = [
    ("6", ("n2", "n3"), {"n2": ("0", 300), "n3": ("0", 300)}),
    ("7", ("n2",), {"n2": ("1", 200)}),
    ("5", ("n1",), {"n1": ("0-1", 1024)}),
]


def static() -> StaticSlurm:
    nodes = [NodeInfo(n, NodeState.IDLE, 2, 4096 * MIB) for n in ("n1", "n2", "n3")]
    jobs = [
        JobOnNode(
            jid, "root", 0, node, JobState.RUNNING, len(ids), ids, mem * MIB, 1795872117.0, hosts
        )
        for jid, hosts, layout in JOBS
        for node, (cpus, mem) in layout.items()
        for ids in [parse_cpu_ids(cpus)]
    ]
    return StaticSlurm(nodes, jobs)


def fake_pyslurm() -> types.ModuleType:
    class Job:
        def __init__(
            self, jid: str, hosts: tuple[str, ...], layout: dict[str, tuple[str, int]]
        ) -> None:
            self.id = int(jid)
            self.allocated_nodes = ",".join(hosts)
            self.state = "RUNNING"
            self.user_name = "root"
            self.user_id = 0
            self.start_time = 1795872117
            self.partition = "debug"
            self._layout = layout

        def get_resource_layout_per_node(self) -> dict[str, dict[str, Any]]:
            return {n: {"cpu_ids": c, "memory": m} for n, (c, m) in self._layout.items()}

    class Jobs:
        @staticmethod
        def load() -> dict[int, Job]:
            return {int(j): Job(j, h, lay) for j, h, lay in JOBS}

    class Node:
        @staticmethod
        def load(name: str) -> Any:
            if name not in ("n1", "n2", "n3"):
                raise RuntimeError(f"Node '{name}' does not exist")  # pyslurm's RPCError
            return types.SimpleNamespace(
                state="IDLE",
                total_cpus=2,
                real_memory=4096,
                allocated_cpus=0,
                allocated_memory=0,
                free_memory=None,
                partitions=["debug"],
            )

    mod = types.ModuleType("pyslurm")
    mod.__version__ = "22.5.3"  # type: ignore[attr-defined]
    mod.Job = Job  # type: ignore[attr-defined]  # no get_pids, as in 22.5
    mod.Jobs = Jobs  # type: ignore[attr-defined]
    mod.Node = Node  # type: ignore[attr-defined]
    return mod


BACKENDS = {
    "cli": lambda: CliSlurm(CapturedSlurm()),
    "static": static,
    "pyslurm": lambda: PyslurmSlurm(
        module=fake_pyslurm(), slurm_version="22.05.8", cli=CliSlurm(CapturedSlurm())
    ),
}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> SlurmClient:
    client: SlurmClient = BACKENDS[request.param]()
    return client


def test_jobs_on_a_node(backend: SlurmClient) -> None:
    got = sorted(
        (j.job_id, j.user, j.uid, j.state, j.cores, j.cpu_ids, j.memory_bytes, set(j.nodes))
        for j in backend.jobs_on_node("n2").items
    )
    assert got == [
        ("6", "root", 0, JobState.RUNNING, 1, (0,), 300 * MIB, {"n2", "n3"}),
        ("7", "root", 0, JobState.RUNNING, 1, (1,), 200 * MIB, {"n2"}),
    ]
    assert [j.cpu_ids for j in backend.jobs_on_node("n1").items] == [(0, 1)]


def test_node_totals(backend: SlurmClient) -> None:
    info = backend.node_info("n3")
    assert (info.name, info.cpus, info.real_memory_bytes) == ("n3", 2, 4096 * MIB)


def test_an_unknown_node_is_a_config_error_naming_it(backend: SlurmClient) -> None:
    with pytest.raises(ConfigError, match="no node 'vm'"):
        backend.node_info("vm")


def test_pyslurm_22_5_answers_listpids_through_scontrol() -> None:
    """pyslurm 22.5 has no binding for slurm_list_pids: the CLI backend answers instead."""
    runner = CapturedSlurm()
    py = PyslurmSlurm(module=fake_pyslurm(), slurm_version="22.05.8", cli=CliSlurm(runner))
    assert py.listpids("133", node="n2") == CliSlurm(CapturedSlurm()).listpids("133", node="n2")
    assert len(py.listpids("133", node="n2").items) == 3
    assert "scontrol listpids 133 n2" in runner.calls


def test_pyslurm_failing_rpc_is_slurm_unavailable_not_a_crash() -> None:
    mod = fake_pyslurm()

    def down() -> None:
        raise RuntimeError("Unable to contact slurm controller (connect failure)")

    mod.Jobs.load = down  # type: ignore[attr-defined]
    with pytest.raises(SlurmUnavailable, match="connect failure"):
        PyslurmSlurm(module=mod, slurm_version="22.05.8").jobs_on_node("n1")


def test_pyslurm_without_the_object_api_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    old = types.ModuleType("pyslurm")
    old.__version__ = "22.5.0"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pyslurm", old)
    with pytest.raises(ConfigError, match=r"pyslurm 22\.5\.0 predates the object API"):
        PyslurmSlurm(slurm_version="22.05.8")


def test_the_agent_picks_its_slurm_backend_by_config() -> None:
    from colocate.config import load_config

    config = load_config(None, env={"COLOCATE_AGENT__SLURM_BACKEND": "pyslurm"})
    assert config.agent.slurm_backend == "pyslurm"
    with pytest.raises(ConfigError, match="slurm_backend"):
        load_config(None, env={"COLOCATE_AGENT__SLURM_BACKEND": "rest"})
