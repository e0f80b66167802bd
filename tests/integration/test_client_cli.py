"""``colocate invoke`` and ``colocate status`` against a real broker and standalone agent."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.leasing import Service, services, start_cluster

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp("cli")
    broker, (agent,) = start_cluster(tmp, {"cli1": (1, "1GiB")})
    with services(broker, agent):
        yield broker


def colocate(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    root = Path(__file__).resolve().parents[2]
    return subprocess.run(
        [sys.executable, "-m", "colocate", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd or root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
    )


def test_invoke_prints_the_result(broker: Service) -> None:
    result = colocate("invoke", "math:factorial", "20", "--broker", broker.url)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "2432902008176640000"


def test_invoke_json_reports_result_and_lease(broker: Service, tmp_path: Path) -> None:
    (tmp_path / "mytask.py").write_text(
        "def shout(word, times=1):\n    return (word.upper() + '!') * times\n"
    )
    result = colocate(
        "invoke", "mytask:shout", "hey", "2", "--broker", broker.url, "--json", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert (
        answer["result"] == "HEY!HEY!"
        and answer["node"] == "cli1"
        and answer["lease_id"].startswith("l-")
    )
    assert answer["lease_s"] > 0 and answer["invoke_s"] > 0


def test_invoke_of_a_raising_function_shows_the_remote_error(
    broker: Service, tmp_path: Path
) -> None:
    (tmp_path / "failing.py").write_text("def boom():\n    raise ValueError('kaput')\n")
    result = colocate("invoke", "failing:boom", "--broker", broker.url, cwd=tmp_path)
    assert result.returncode == 1
    assert "failing:boom raised ValueError: kaput" in result.stderr.splitlines()[-1]
    assert "Remote traceback" in result.stderr or "Traceback" in result.stderr


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["invoke", "nosuchmodule:fn"], "cannot import module 'nosuchmodule'"),
        (["invoke", "math"], "MODULE:FUNCTION"),
        (["invoke", "math:nosuch"], "has no attribute 'nosuch'"),
        (["invoke", "math:factorial", "3", "--memory", "lots"], "cannot read size 'lots'"),
        (["invoke", "math:factorial", "3", "--cores", "64"], "no node has 64 free cores"),
    ],
)
def test_invoke_mistakes_fail_with_one_clear_line(
    broker: Service, argv: list[str], says: str
) -> None:
    result = colocate(*argv, "--broker", broker.url)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], result.stderr


def test_cli_names_an_unreachable_broker() -> None:
    for argv in (["invoke", "math:factorial", "3"], ["status"]):
        result = colocate(*argv, "--broker", "http://127.0.0.1:9")
        assert result.returncode == 1
        assert (
            "broker http://127.0.0.1:9 did not answer" in result.stderr
            and "Traceback" not in result.stderr
        )


def test_status_shows_nodes_and_leases(broker: Service) -> None:
    as_json = colocate("status", "--broker", broker.url, "--json")
    assert as_json.returncode == 0, as_json.stderr
    status = json.loads(as_json.stdout)
    assert [n["node"] for n in status["nodes"]] == ["cli1"] and status["leases"] == []
    table = colocate("status", "--broker", broker.url)
    assert table.returncode == 0 and "cli1" in table.stdout and "up" in table.stdout
