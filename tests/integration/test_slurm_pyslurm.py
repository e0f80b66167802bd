"""The pyslurm backend against the live dev cluster, side by side with the CLI backend:
the same jobs, the same CPU ids, the same memory, the same node totals.

Needs pyslurm built for this Slurm (``scripts/setup --dev`` installs the 22.5.3 wheel from
``../shared/vendor/``); skips locally and fails in CI without it.
"""

from __future__ import annotations

import importlib.util
import time

import pytest

from colocate.errors import ConfigError
from slurm_plugin.agent.slurm_node import SlurmNode
from slurm_plugin.slurm import CliSlurm, JobOnNode, NodeInfo, PyslurmSlurm, make_slurm
from tests.conftest import require
from tests.integration.conftest import JobSubmitter, SlurmCluster, python_job

pytestmark = pytest.mark.slurm

MIB = 1024**2


@pytest.fixture(scope="module")
def backends() -> tuple[CliSlurm, PyslurmSlurm]:
    require(
        importlib.util.find_spec("pyslurm") is not None,
        "pyslurm is not installed; run scripts/setup --dev (installs ../shared/vendor's wheel)",
    )
    try:
        py = make_slurm("pyslurm")
    except ConfigError as exc:  # a pyslurm for another Slurm release
        require(False, str(exc))
        raise
    assert isinstance(py, PyslurmSlurm)
    return CliSlurm(), py


def _job_key(j: JobOnNode) -> tuple[object, ...]:
    return (
        j.job_id,
        j.node,
        j.user,
        j.uid,
        j.state,
        j.cores,
        j.cpu_ids,
        j.memory_bytes,
        j.start_time,
        tuple(sorted(j.nodes)),
        j.partition,
        j.time_limit_s,
    )


def _node_key(n: NodeInfo) -> tuple[object, ...]:
    return (
        n.name,
        n.state,
        n.cpus,
        n.real_memory_bytes,
        n.alloc_cpus,
        n.alloc_memory_bytes,
        n.partitions,
    )


def test_both_backends_see_the_same_jobs_cpu_ids_and_memory(
    slurm_cluster: SlurmCluster,
    slurm_jobs: JobSubmitter,
    backends: tuple[CliSlurm, PyslurmSlurm],
) -> None:
    cli, py = backends
    sleep = python_job("import time; time.sleep(120)")
    wide = slurm_jobs.submit(sleep, "-N2", "-c1", "--mem=300M")
    per_cpu = slurm_jobs.submit(sleep, "-N1", "-c2", "--mem-per-cpu=150M", "--time=5")
    ours = {wide.job_id, per_cpu.job_id}

    seen: dict[str, set[tuple[object, ...]]] = {}
    for node in slurm_cluster.nodes:
        # other engineers' jobs come and go: compare once two CLI reads around pyslurm agree
        for _ in range(5):
            before = {_job_key(j) for j in cli.jobs_on_node(node).items}
            got = {_job_key(j) for j in py.jobs_on_node(node).items}
            after = {_job_key(j) for j in cli.jobs_on_node(node).items}
            if before == after:
                break
        assert got == after, f"{node}: pyslurm {sorted(got)} != cli {sorted(after)}"
        for key in got:
            if key[0] in ours:
                seen.setdefault(str(key[0]), set()).add(key)

    # what a user asked for is what both report
    assert {k[1] for k in seen[wide.job_id]} == set(wide.nodes) and len(wide.nodes) == 2
    assert all(k[5] == 1 and len(k[6]) == 1 and k[7] == 300 * MIB for k in seen[wide.job_id])
    (one,) = seen[per_cpu.job_id]
    assert (one[1], one[5], len(one[6]), one[7]) == (per_cpu.nodes[0], 2, 2, 300 * MIB)
    assert one[11] == 300.0  # --time=5 minutes


def test_both_backends_report_the_same_node_totals(
    slurm_cluster: SlurmCluster, backends: tuple[CliSlurm, PyslurmSlurm]
) -> None:
    cli, py = backends
    for node in slurm_cluster.nodes:
        for _ in range(5):
            before, got, after = cli.node_info(node), py.node_info(node), cli.node_info(node)
            if _node_key(before) == _node_key(after):
                break
        assert _node_key(got) == _node_key(after)
        assert got.free_memory_bytes is not None and got.free_memory_bytes > 0


def test_unknown_node_is_a_config_error_naming_it(
    backends: tuple[CliSlurm, PyslurmSlurm],
) -> None:
    with pytest.raises(ConfigError, match="no node 'nosuchnode'"):
        backends[1].node_info("nosuchnode")


def test_version_matches_the_cli(backends: tuple[CliSlurm, PyslurmSlurm]) -> None:
    cli, py = backends
    assert py.version() == cli.version()


def test_the_agents_node_source_sees_the_same_job_through_pyslurm(
    slurm_jobs: JobSubmitter, backends: tuple[CliSlurm, PyslurmSlurm]
) -> None:
    """``[agent] slurm_backend = "pyslurm"``: the agent's view of a job is the CLI one."""
    job = slurm_jobs.submit(python_job("import time; time.sleep(120)"), "-N1", "-c1", "--mem=200M")
    node = job.nodes[0]
    seen = {}
    for backend in ("cli", "pyslurm"):
        source = SlurmNode.live(node, slurm_backend=backend, slurm_wait_s=10.0)
        try:
            jobs = {j.job_id: j for j in source.view(time.time()).jobs}
        finally:
            source.close()
        assert job.job_id in jobs, f"{backend}: the agent does not see job {job.job_id}"
        seen[backend] = (jobs[job.job_id].cpu_ids, jobs[job.job_id].memory_allocated_bytes)
    assert seen["pyslurm"] == seen["cli"]
    assert len(seen["pyslurm"][0]) == 1 and seen["pyslurm"][1] == 200 * MIB
