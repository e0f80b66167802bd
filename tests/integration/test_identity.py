"""Identity, owned leases and quotas against a real broker and agent, with two real Unix users
created here and the dev cluster's real munged (issue 12, "Shown by").

Each user's client runs in its own process (``runuser -u USER``) so munged vouches for that
user's uid; the broker and agent run as root.
"""

from __future__ import annotations

import json
import pwd
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from colocate.auth import munge
from tests.integration.leasing import (
    Service,
    node_registered,
    services,
    start_agent,
    start_broker,
    wait_until,
)

pytestmark = [pytest.mark.root, pytest.mark.slurm]
JWT_KEY = b"test-jwt-key-0123456789abcdef0123456789"
ROOT = str(Path(__file__).resolve().parents[2])


def as_user(
    user: str, code: str, /, env: dict[str, str] | None = None, **values: Any
) -> dict[str, Any]:
    """Run ``code`` (which sets ``out``) as ``user``; ``out`` or the colocate error it raised."""
    script = textwrap.dedent(
        """
        import json, sys
        from colocate.errors import ColocateError
        values = json.loads(sys.argv[1])
        try:
            exec(compile(sys.argv[2], "<test>", "exec"), {"values": values, "out": None, "result": {}})
        except ColocateError as exc:
            print(json.dumps({"error": type(exc).__name__, "message": str(exc),
                              "limit": getattr(exc, "limit", None), "used": getattr(exc, "used", None)}))
        """
    )
    body = (
        "import json\nfrom colocate import Client\nout = None\n"
        + textwrap.dedent(code)
        + "\nprint(json.dumps({'ok': out}))\n"
    )
    done = subprocess.run(
        [
            "/usr/sbin/runuser",
            "-u",
            user,
            "--",
            sys.executable,
            "-c",
            script,
            json.dumps(values),
            body,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/tmp",
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": ROOT, "HOME": "/tmp", **(env or {})},
    )
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


@pytest.fixture(scope="module")
def cluster(users: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    a, b = users
    tmp = tmp_path_factory.mktemp("identity")
    config = tmp / "broker.toml"
    (tmp / "jwt.key").write_bytes(JWT_KEY)  # as slurm.conf AuthAltParameters=jwt_key= names it
    config.write_text(
        textwrap.dedent(
            f"""
            [broker]
            accounts = {{ {a} = ["physics"], {b} = ["chem"] }}
            [broker.auth]
            methods = ["munge", "jwt"]
            jwt_key_file = "{tmp / "jwt.key"}"
            [broker.quotas.users.{a}]
            cores = 1
            leases = 1
            """
        )
    )
    broker = start_broker(tmp, config=config)
    agent = start_agent(tmp, broker.url, node="idnode", cores=2, memory="2GiB")
    with services(broker, agent):
        wait_until(lambda: node_registered(broker.url, "idnode"), what="agent registration")
        yield broker
    assert "Traceback" not in broker.logs(), broker.logs()


LEASE = """
lease = Client(values["url"]).lease(cores=1, memory="256MiB", duration="2m", account=values.get("account", ""))
g = lease._grant
out = {"lease_id": g.lease_id, "token": g.token, "address": g.address, "user": g.user, "account": g.account}
"""
INVOKE = """
from colocate.client.executor import LeaseExecutor
ex = LeaseExecutor(values["address"], values["token"], lease_id=values["lease_id"], workers=1)
out = ex.invoke("math:factorial", 5)
ex.shutdown()
"""


def test_owner_leases_and_invokes_others_are_refused_each_with_one_clear_line(
    cluster: Service, users: tuple[str, str]
) -> None:
    a, b = users
    url = cluster.url
    grant = as_user(a, LEASE, url=url)["ok"]
    assert grant["user"] == a and grant["account"] == "physics"
    assert as_user(a, INVOKE, **grant) == {"ok": 120}

    # B: sees that a lease exists on the node, but not its id, address or token
    seen = as_user(
        b,
        "s = Client(values['url']).status(); out = [s.model_dump(mode='json')['leases'], s.model_dump(mode='json')['others']]",
        url=url,
    )["ok"]
    assert (
        seen[0] == []
        and len(seen[1]) == 1
        and "lease_id" not in seen[1][0]
        and "address" not in seen[1][0]
    )
    assert as_user(b, "out = [x.lease_id for x in Client(values['url']).leases()]", url=url) == {
        "ok": []
    }
    for action in (
        "out = Client(values['url']).release(values['lease_id'])",
        "out = Client(values['url']).renew(values['lease_id'], '5m').token",
        "out = Client(values['url'])._call('GET', '/leases/' + values['lease_id'])",
    ):
        refused = as_user(b, action, url=url, lease_id=grant["lease_id"])
        assert refused["error"] == "Forbidden", refused
        assert f"{b} may not" in refused["message"] and "\n" not in refused["message"]
    # B cannot invoke without the token: a forged one is refused by the executor
    forged = as_user(
        b,
        INVOKE,
        address=grant["address"],
        token=grant["token"][:-4] + "AAAA",
        lease_id=grant["lease_id"],
    )
    assert forged["error"] == "Unauthorized", forged
    # B cannot charge A's account
    other_account = as_user(b, LEASE, url=url, account="physics")
    assert (
        other_account["error"] == "Forbidden"
        and "may not charge account 'physics'" in other_account["message"]
    )

    # still A's and still running
    assert as_user(a, INVOKE, **grant) == {"ok": 120}
    assert as_user(
        a,
        "out = Client(values['url']).release(values['lease_id'])",
        url=url,
        lease_id=grant["lease_id"],
    ) == {"ok": True}


def test_unauthenticated_request_gets_401_saying_how_to_get_credentials(cluster: Service) -> None:
    for method, path in (
        ("POST", "/v1/leases"),
        ("GET", "/v1/status"),
        ("GET", "/v1/leases"),
        ("DELETE", "/v1/leases/l-x"),
    ):
        reply = httpx.request(method, f"{cluster.url}{path}", json={} if method == "POST" else None)
        assert reply.status_code == 401, (path, reply.text)
        message = reply.json()["message"]
        assert "MUNGE" in message and "scontrol token" in message
    # a credential made for another request is refused (it cannot be moved)
    cred = munge.encode(b"colocate/1 GET /v1/status")
    reply = httpx.get(f"{cluster.url}/v1/leases", headers={"Authorization": f"MUNGE {cred}"})
    assert reply.status_code == 401 and "another request" in reply.json()["message"]
    # a credential seen on the wire cannot be replayed
    cred = munge.encode(b"colocate/1 GET /v1/status")
    assert (
        httpx.get(
            f"{cluster.url}/v1/status", headers={"Authorization": f"MUNGE {cred}"}
        ).status_code
        == 200
    )
    replay = httpx.get(f"{cluster.url}/v1/status", headers={"Authorization": f"MUNGE {cred}"})
    assert replay.status_code == 401 and "replayed" in replay.json()["message"]


def test_quota_refuses_past_the_limit_naming_it_and_allows_within(
    cluster: Service, users: tuple[str, str]
) -> None:
    a, _ = users
    first = as_user(a, LEASE, url=cluster.url)["ok"]
    try:
        second = as_user(a, LEASE, url=cluster.url)
        assert second["error"] == "QuotaExceeded", second
        assert second["limit"] in {"leases", "cores"} and second["used"] == 1
        assert f"user {a}" in second["message"] and "limit of 1" in second["message"]
    finally:
        assert as_user(
            a,
            "out = Client(values['url']).release(values['lease_id'])",
            url=cluster.url,
            lease_id=first["lease_id"],
        ) == {"ok": True}
    again = as_user(a, LEASE, url=cluster.url)["ok"]
    as_user(
        a,
        "out = Client(values['url']).release(values['lease_id'])",
        url=cluster.url,
        lease_id=again["lease_id"],
    )


def test_usage_shows_each_users_leases_to_them_and_everything_to_root(
    cluster: Service, users: tuple[str, str]
) -> None:
    a, b = users
    mine = as_user(
        a, "out = [r.model_dump() for r in Client(values['url']).usage().records]", url=cluster.url
    )["ok"]
    assert mine and {r["user"] for r in mine} == {a} and {r["account"] for r in mine} == {"physics"}
    assert all(r["end"] is not None and r["core_seconds"] > 0 for r in mine)
    peek = as_user(
        b, "out = Client(values['url']).usage(user=values['a']).records", url=cluster.url, a=a
    )
    assert peek["error"] == "Forbidden"
    done = subprocess.run(
        [sys.executable, "-m", "colocate", "usage", "--broker", cluster.url, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    records = json.loads(done.stdout)["records"]
    assert {r["lease_id"] for r in mine} <= {r["lease_id"] for r in records}
    assert pwd.getpwnam(a).pw_uid in {r["uid"] for r in records}


def test_renewal_gives_a_new_token_and_the_executor_refuses_the_old_one(
    cluster: Service, users: tuple[str, str]
) -> None:
    a, _ = users
    code = """
    from colocate.client.executor import LeaseExecutor
    from colocate.errors import Unauthorized
    client = Client(values["url"])
    lease = client.lease(cores=1, memory="256MiB", duration="1m")
    old = lease.token
    lease.renew("2m")
    try:
        LeaseExecutor(lease.address, old, lease_id=lease.lease_id, workers=1)
        refused = None
    except Unauthorized as exc:
        refused = str(exc)
    ex = lease.executor()
    out = {"refused": refused, "changed": old != lease.token, "result": ex.invoke("math:factorial", 4)}
    lease.release()
    """
    got = as_user(a, code, url=cluster.url)["ok"]
    assert got["changed"] and got["result"] == 24
    assert got["refused"] is not None and "renewed" in got["refused"]


def test_client_refuses_an_executor_that_cannot_prove_the_lease(cluster: Service) -> None:
    """A fake node answering HELLO like an executor, without the lease key: the client stops
    before sending any function or argument (it would unpickle what the fake returns)."""
    import socket
    import threading

    from colocate import Client, Unauthorized
    from colocate import protocol as P
    from colocate.client.executor import LeaseExecutor

    with (
        Client(cluster.url) as client,
        client.lease(cores=1, memory="256MiB", duration="1m") as lease,
    ):
        server = socket.create_server(("127.0.0.1", 0))
        port = server.getsockname()[1]

        def fake() -> None:
            conn, _ = server.accept()
            with conn:
                conn.recv(65536)
                welcome = {
                    "pid": 1,
                    "workers": [],
                    "max_payload_bytes": 1 << 20,
                    "proof": "00" * 32,
                }
                conn.sendall(P.frame(P.REPLY, 0, P.OK, 0, json.dumps(welcome).encode()))
                conn.recv(1)

        thread = threading.Thread(target=fake, daemon=True)
        thread.start()
        with pytest.raises(Unauthorized, match="could not prove it serves lease"):
            LeaseExecutor(
                f"tcp://127.0.0.1:{port}",
                lease.token,
                lease_id=lease.lease_id,
                workers=1,
                lease_key=lease._grant.lease_key,
                prefer_unix=False,
            )
        server.close()
        # the real executor proves it
        assert lease.executor().invoke("math:factorial", 3) == 6


def colocate(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "colocate", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def test_cli_leases_release_and_a_lease_longer_than_the_broker_allows(cluster: Service) -> None:
    from colocate import Client

    with Client(cluster.url) as client:
        lease = client.lease(cores=1, memory="256MiB", duration="1m")
        listed = colocate("leases", "--broker", cluster.url, "--node", "idnode", "--json")
        assert listed.returncode == 0, listed.stderr
        assert [(le["lease_id"], le["user"]) for le in json.loads(listed.stdout)] == [
            (lease.lease_id, "root")
        ]
        released = colocate("release", lease.lease_id, "--broker", cluster.url)
        assert released.returncode == 0 and released.stdout.strip() == f"{lease.lease_id}: released"
        assert colocate("leases", "--broker", cluster.url).stdout.strip() == "no leases"
    # 100 days is refused with the limit named, not silently cut to the broker's maximum
    long = colocate("invoke", "math:factorial", "3", "--broker", cluster.url, "--duration", "100d")
    assert long.returncode == 1 and long.stdout == ""
    assert (
        long.stderr.count("\n") == 1
        and "longest lease of 86400s" in long.stderr
        and "max_lease_s" in long.stderr
    )
    ok = colocate(
        "invoke", "math:factorial", "3", "--broker", cluster.url, "--account", "acct", "--json"
    )
    assert ok.returncode == 0 and json.loads(ok.stdout)["result"] == 6


def test_a_slurm_jwt_identifies_its_user_without_munge(
    cluster: Service, users: tuple[str, str]
) -> None:
    """Off-cluster path: ``SLURM_JWT`` (HS256 with Slurm's jwt key, user in ``sun``) instead of
    MUNGE; the lease is the JWT's user's, and a JWT of another key is refused."""
    import jwt

    a, b = users
    now = int(time.time())
    token = jwt.encode({"sun": a, "iat": now, "exp": now + 600}, JWT_KEY, algorithm="HS256")
    # user b runs the client, but presents a's token: the broker believes the token, as Slurm does
    got = as_user(b, LEASE + "\nlease.release()", env={"SLURM_JWT": token}, url=cluster.url)["ok"]
    assert got["user"] == a and got["account"] == "physics"
    forged = jwt.encode(
        {"sun": a, "iat": now, "exp": now + 600}, b"another key" * 3, algorithm="HS256"
    )
    refused = as_user(b, LEASE, env={"SLURM_JWT": forged}, url=cluster.url)
    assert refused["error"] == "Unauthorized" and "scontrol token" in refused["message"]
