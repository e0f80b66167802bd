"""Through the whole stack (MUNGE identity, broker, standalone agent, executor): a function
runs as the user who leased it, and two users' functions never share a uid (issue 14)."""

from __future__ import annotations

import pwd

import pytest

from tests.integration.leasing import Service
from tests.integration.test_identity import INVOKE, LEASE, as_user, cluster

pytestmark = [pytest.mark.root, pytest.mark.slurm]
__all__ = ["cluster"]  # the fixture, shared with test_identity (users: conftest.py)

WHOAMI = (
    INVOKE.replace('"math:factorial", 5', '"os:getuid"')
    + """
ex = LeaseExecutor(values["address"], values["token"], lease_id=values["lease_id"], workers=1)
out = [out, ex.invoke("os:getgid"), ex.invoke("os:getpid")]
ex.shutdown()
"""
)


def test_a_function_runs_as_the_user_who_leased_it(
    cluster: Service, users: tuple[str, str]
) -> None:
    seen = {}
    for user in users:
        grant = as_user(user, LEASE, url=cluster.url)["ok"]
        uid, gid, pid = as_user(user, WHOAMI, **grant)["ok"]
        entry = pwd.getpwnam(user)
        assert (uid, gid) == (entry.pw_uid, entry.pw_gid)
        assert pid == 1  # alone in the lease's own pid namespace
        seen[user] = uid
        released = as_user(
            user, "Client(values['url']).release(values['lease_id'])", url=cluster.url, **grant
        )
        assert "error" not in released, released
    assert len(set(seen.values())) == 2
