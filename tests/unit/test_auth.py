"""Pure parts of issue 12: node-signed requests, Slurm JWTs, quotas, the ledger's arithmetic."""

from __future__ import annotations

import time
from pathlib import Path

import jwt
import pytest

from colocate.auth.identity import Authenticator
from colocate.auth.node import NodeVerifier, node_key, sign
from colocate.broker.ledger import Ledger
from colocate.broker.quotas import Use, check
from colocate.config import Quota, load_config
from colocate.errors import QuotaExceeded, Unauthorized
from colocate.owner import Owner
from policies.prices import Prices

SECRET = b"0123456789abcdef0123456789abcdef"


def verifier(now: float) -> NodeVerifier:
    return NodeVerifier(lambda node: node_key(SECRET, node), clock=lambda: now)


def test_a_node_signed_request_is_accepted_once_and_only_for_that_node() -> None:
    headers = sign(node_key(SECRET, "n1"), "n1", "PUT", "/v1/nodes/n1", b'{"a":1}', now=1000.0)
    check_ = verifier(1000.5)
    assert check_.verify(headers, "PUT", "/v1/nodes/n1", b'{"a":1}', "n1") == "n1"
    with pytest.raises(Unauthorized, match="replayed"):
        check_.verify(headers, "PUT", "/v1/nodes/n1", b'{"a":1}', "n1")
    # n1's key cannot speak for n2, even when it claims to be n2
    forged = sign(node_key(SECRET, "n1"), "n2", "PUT", "/v1/nodes/n2", b"{}", now=1000.0)
    with pytest.raises(Unauthorized, match="does not match"):
        verifier(1000.0).verify(forged, "PUT", "/v1/nodes/n2", b"{}", "n2")
    with pytest.raises(Unauthorized, match="not by n2"):
        verifier(1000.0).verify(
            sign(node_key(SECRET, "n1"), "n1", "PUT", "/x", b"", now=1000.0), "PUT", "/x", b"", "n2"
        )


@pytest.mark.parametrize(
    ("method", "path", "body", "now", "says"),
    [
        ("PUT", "/v1/nodes/n1", b'{"a":2}', 1000.0, "does not match"),  # body changed
        ("DELETE", "/v1/nodes/n1", b'{"a":1}', 1000.0, "does not match"),  # method changed
        ("PUT", "/v1/nodes/n1", b'{"a":1}', 1031.0, "keep clocks in sync"),  # too old
        ("PUT", "/v1/nodes/n1", b'{"a":1}', 969.0, "keep clocks in sync"),  # from the future
    ],
)
def test_altered_or_stale_node_requests_are_refused(
    method: str, path: str, body: bytes, now: float, says: str
) -> None:
    headers = sign(node_key(SECRET, "n1"), "n1", "PUT", "/v1/nodes/n1", b'{"a":1}', now=1000.0)
    with pytest.raises(Unauthorized, match=says):
        verifier(now).verify(headers, method, path, body, "n1")


def test_unsigned_or_non_ascii_node_headers_are_one_line_401s() -> None:
    for headers in (
        {},
        {
            "X-Colocate-Node": "n1",
            "X-Colocate-Time": "1",
            "X-Colocate-Nonce": "é",
            "X-Colocate-Signature": "x",
        },
    ):
        with pytest.raises(Unauthorized, match="secret_file"):
            verifier(0).verify(headers, "GET", "/v1/status", b"", "n1")


def test_slurm_jwt_names_the_user_and_bad_ones_say_how_to_get_one() -> None:
    key = b"k" * 32
    auth = Authenticator(("munge", "jwt"), jwt_key=key)
    now = int(time.time())
    token = jwt.encode({"sun": "root", "iat": now, "exp": now + 60}, key, algorithm="HS256")
    who = auth.authenticate(f"Bearer {token}", "GET", "/v1/status")
    assert (who.uid, who.user, who.admin, who.method) == (0, "root", True, "jwt")
    expired = jwt.encode({"sun": "root", "iat": now - 120, "exp": now - 60}, key, algorithm="HS256")
    with pytest.raises(Unauthorized, match=r"expired.*scontrol token"):
        auth.authenticate(f"Bearer {expired}", "GET", "/v1/status")
    other_key = jwt.encode(
        {"sun": "root", "iat": now, "exp": now + 60}, b"x" * 32, algorithm="HS256"
    )
    with pytest.raises(Unauthorized, match="Slurm JWT refused"):
        auth.authenticate(f"Bearer {other_key}", "GET", "/v1/status")
    nobody = jwt.encode(
        {"sun": "no-such-user-here", "iat": now, "exp": now + 60}, key, algorithm="HS256"
    )
    with pytest.raises(Unauthorized, match="not known"):
        auth.authenticate(f"Bearer {nobody}", "GET", "/v1/status")
    with pytest.raises(Unauthorized, match="no credentials"):
        auth.authenticate(None, "GET", "/v1/status")
    with pytest.raises(Unauthorized, match="MUNGE or Bearer"):
        auth.authenticate("Basic abc", "GET", "/v1/status")


def test_quota_refusals_name_the_limit_and_the_use() -> None:
    quota = Quota(cores=4, memory="1GiB", leases=2, duration_s=3600, core_hours_per_day=1.0)
    check(quota, Use(cores=2, leases=1), "user a", cores=2, memory_bytes=1, duration_s=60)
    cases = [
        (
            Use(cores=3),
            dict(cores=2, memory_bytes=1, duration_s=60),
            "cores",
            "holds 3 cores, 2 more",
        ),
        (Use(leases=2), dict(cores=1, memory_bytes=1, duration_s=60), "leases", "limit of 2"),
        (
            Use(memory_bytes=1024**3),
            dict(cores=1, memory_bytes=1, duration_s=60),
            "memory",
            "1.00 GiB",
        ),
        (Use(), dict(cores=1, memory_bytes=1, duration_s=7200), "duration_s", "limit of 3600s"),
        (
            Use(core_seconds_today=3000),
            dict(cores=1, memory_bytes=1, duration_s=900),
            "core_hours_per_day",
            "0.83 core-hours",
        ),
    ]
    for use, ask, limit, says in cases:
        with pytest.raises(QuotaExceeded, match=says) as refused:
            check(quota, use, "user a", **ask)  # type: ignore[arg-type]
        assert refused.value.limit == limit and "user a" in str(refused.value)


def test_quota_config_reads_sizes_and_refuses_unknown_keys(tmp_path: Path) -> None:
    file = tmp_path / "c.toml"
    file.write_text(
        '[broker.quotas.users.alice]\nmemory = "2GiB"\ncores = 2\n[broker.accounts]\nalice = ["physics"]\n'
    )
    broker = load_config(file, env={}).broker
    assert broker.quotas.users["alice"].memory == 2 * 1024**3 and broker.accounts["alice"] == (
        "physics",
    )
    file.write_text("[broker.quotas.users.alice]\ngpus = 2\n")
    with pytest.raises(Exception, match="gpus"):
        load_config(file, env={})


def test_ledger_accrues_core_and_gib_seconds_and_money_per_account(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.db", Prices(core_hour=1.0, gib_hour=0.5))
    alice = Owner(1000, 1000, "alice", "physics")
    ledger.open("l-1", alice, "n1", 2, 1024**3, 0.0, 7200.0)
    ledger.seen(["l-1"], 1800.0)
    (row,) = ledger.rows(user="alice")
    assert row.end is None and row.core_seconds == 3600.0  # open: up to the last report
    assert ledger.close("l-1", 3600.0, "released") and not ledger.close("l-1", 4000.0, "expired")
    (row,) = ledger.rows(account="physics", since=3000.0)
    assert (row.end, row.end_reason, row.core_seconds, row.gib_seconds) == (
        3600.0,
        "released",
        7200.0,
        3600.0,
    )
    assert row.money == pytest.approx(2.0 + 0.5)
    assert ledger.account_totals() == [("physics", 1, 7200.0, 3600.0, pytest.approx(2.5))]
    assert ledger.core_seconds_since(1800.0, 10_000.0, user="alice") == pytest.approx(2 * 1800.0)
    assert ledger.rows(since=3601.0) == []
    ledger.close_db()


def test_a_node_key_file_alone_signs_as_that_node_and_no_other() -> None:
    from colocate.auth.node import node_key_file

    installed = node_key_file(SECRET, "n1").strip().encode()  # what the agent reads on n1
    assert node_key(installed, "n1") == node_key(SECRET, "n1")
    headers = sign(node_key(installed, "n1"), "n1", "PUT", "/v1/nodes/n1", b"{}", now=5.0)
    assert verifier(5.0).verify(headers, "PUT", "/v1/nodes/n1", b"{}", "n1") == "n1"
    # n1's file on n2 derives a key the broker does not accept for n2
    stolen = sign(node_key(installed, "n2"), "n2", "PUT", "/v1/nodes/n2", b"{}", now=5.0)
    with pytest.raises(Unauthorized, match="does not match"):
        verifier(5.0).verify(stolen, "PUT", "/v1/nodes/n2", b"{}", "n2")
