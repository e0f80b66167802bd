"""The report explains the policies' differences from what each policy did: evictions by
reason, the jobs behind them, and one sentence per pair of policies."""

from __future__ import annotations

from itertools import combinations
from pathlib import Path
from typing import Any

import pytest

from policies import POLICIES
from policies.limits import Limits
from policies.prices import GIB
from traces import bundled
from traces.azure import read_azure2019
from traces.placement import Cluster
from traces.replay import replay
from traces.report import policy_differences
from traces.swf import read_swf
from traces.usage import UsageModel

from .test_replay import MIB, faas, swf


@pytest.fixture(scope="module")
def differences() -> dict[str, Any]:
    result = replay(
        read_swf(bundled.HPC2N_EXCERPT).head(1500),
        read_azure2019(bundled.AZURE2019),
        Cluster(bundled.HPC2N_NODES, bundled.HPC2N_CORES_PER_NODE, bundled.HPC2N_MEMORY_PER_NODE),
        seed=11,
    )
    d = policy_differences(result)
    d["_summaries"] = {n: s.summary for n, s in result.policies.items()}
    return d


def test_evictions_by_reason_add_up(differences: dict[str, Any]) -> None:
    for name, d in differences["policies"].items():
        assert sum(d["evictions_by_reason"].values()) == d["evictions"]
        assert d["evictions"] == differences["_summaries"][name]["evictions"]


def test_one_explained_pair_per_pair_of_policies(differences: dict[str, Any]) -> None:
    pairs = {(p["a"], p["b"]) for p in differences["pairs"]}
    assert pairs == set(combinations(list(POLICIES), 2))
    assert len(differences["text"]) == len(pairs)


def test_lending_inside_jobs_is_explained_by_the_jobs_that_grew(
    differences: dict[str, Any],
) -> None:
    if "headroom" not in POLICIES:
        pytest.skip("headroom policy not registered")
    pair = next(p for p in differences["pairs"] if (p["a"], p["b"]) == ("unallocated", "headroom"))
    grew = differences["policies"]["headroom"]
    # headroom lends idle cores inside jobs; unallocated never does, so no job grows into its leases
    assert differences["policies"]["unallocated"]["evictions_by_reason"].get("cpu_growth", 0) == 0
    assert grew["evictions_by_reason"].get("cpu_growth", 0) > 0
    assert pair["jobs_grew_only_under_b"] == grew["jobs_that_grew"] > 0
    text = next(t for t in differences["text"] if t.startswith("headroom vs unallocated"))
    assert "grew" in text and grew["jobs_that_grew_examples"][0] in text


def test_a_job_starting_on_leased_cores_is_named(tmp_path: Path) -> None:
    jobs = read_swf(
        swf(tmp_path, [(1, 0, 3600, 1, 3600.0, 1024), (2, 7200, 3600, 2, 3600.0, 1024)])
    )
    result = replay(
        jobs,
        faas(600, 1.0, MIB),
        Cluster(1, 2, 4 * GIB),
        ["unallocated"],
        usage=UsageModel(time_shapes="flat"),
        limits=Limits(guard=False),
    )
    d = policy_differences(result)["policies"]["unallocated"]
    assert d["evictions_by_reason"] == {"job_start": 1}
    assert d["jobs_starting_on_leases_examples"] == ["2"]
