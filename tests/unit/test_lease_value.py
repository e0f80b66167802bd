"""One lease value per side of the wire, converted at the two edges (colocate/lease_value.py,
colocate/broker/api.py): the JSON a broker sends and receives is unchanged."""

from __future__ import annotations

import json

from colocate.broker.api import LeaseGrant, LeaseInfo, ReportedLease, StartRequest
from colocate.lease_value import LeaseValue
from colocate.owner import Owner
from policies.leasebook import LeaseRecord
from policies.model import LeaseView
from slurm_plugin.agent.agent import HeldLease

START = {
    "lease_id": "l-7",
    "cpu_ids": [3, 1, 2],
    "memory_bytes": 512 * 1024**2,
    "granted_at": 1_800_000_000.0,
    "expires_at": 1_800_000_300.0,
    "owner": {"uid": 1000, "gid": 1000, "user": "ann", "account": "physics"},
}


def test_a_placement_becomes_one_value_reported_back_as_the_broker_reads_it() -> None:
    lease = StartRequest.model_validate_json(json.dumps(START)).lease()
    assert lease == LeaseValue(
        "l-7",
        (1, 2, 3),
        512 * 1024**2,
        1_800_000_000.0,
        1_800_000_300.0,
        Owner(1000, 1000, "ann", "physics"),
    )
    held = HeldLease(lease, "tcp://10.0.0.1:4000", generation=5, pids=(11, 12, 13))
    wire = json.loads(held.reported().model_dump_json())
    assert wire == {
        "lease_id": "l-7",
        "cpu_ids": [1, 2, 3],
        "memory_bytes": 512 * 1024**2,
        "granted_at": 1_800_000_000.0,
        "expires_at": 1_800_000_300.0,
        "address": "tcp://10.0.0.1:4000",
        "generation": 5,
    }
    assert ReportedLease.model_validate(wire) == held.reported()  # what the broker parses


def test_the_broker_places_a_ledger_record_through_the_one_conversion() -> None:
    record = LeaseRecord("l-7", "n1", (3, 1, 2), 512 * 1024**2, 1_800_000_000.0, 1_800_000_300.0)
    start = StartRequest.placing(record, Owner(1000, 1000, "ann", "physics"))
    assert json.loads(start.model_dump_json()) == START  # the bytes the agent receives
    assert start.lease().cpu_ids == (1, 2, 3)  # and the agent's end of the same edge
    anonymous = StartRequest.placing(record, None)
    assert anonymous.owner is None and anonymous.lease().owner is None


def test_the_value_gives_the_policies_their_view_and_renews_without_changing_the_rest() -> None:
    lease = LeaseValue.of("l-1", [5, 4, 4], 1024, 10.0, 20.0)
    assert lease.cpu_ids == (4, 5) and lease.cores == 2
    assert lease.view() == LeaseView("l-1", frozenset({4, 5}), 1024, 10.0, 20.0)
    later = lease.renewed(80.0)
    assert later.expires_at == 80.0 and later.same_resources(lease) and later.granted_at == 10.0
    assert not lease.same_resources(LeaseValue.of("l-1", [4], 1024, 10.0, 20.0))


def test_a_grant_is_the_lease_info_plus_its_credentials_with_the_same_json_keys() -> None:
    grant = LeaseGrant(
        lease_id="l-1",
        node="n1",
        address="tcp://h:1",
        cpu_ids=[1],
        memory_bytes=1,
        granted_at=1.0,
        expires_at=2.0,
        token="t",
        max_payload_bytes=16,
        user="ann",
    )
    assert isinstance(grant, LeaseInfo)
    assert set(json.loads(grant.model_dump_json())) == {
        "lease_id",
        "node",
        "address",
        "cpu_ids",
        "memory_bytes",
        "granted_at",
        "expires_at",
        "token",
        "max_payload_bytes",
        "user",
        "account",
        "lease_key",
    }
    info = LeaseInfo.model_validate(grant.model_dump(include=set(LeaseInfo.model_fields)))
    assert info.lease_id == "l-1" and info.user == "ann"
