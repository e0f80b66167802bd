"""What each entry point costs to import, in a fresh interpreter: a module budget and the
heavy packages it must not load.

Budgets count the modules an import adds to a bare ``python -c pass`` of the same
interpreter, and are set from what each entry point needs plus about 10 % room:

- ``from colocate import Client``: httpx and pydantic (about 230 modules on their own), the
  broker's API schema, the identity header; not the broker's web stack (FastAPI, uvicorn,
  starlette), not Prometheus, not psutil.
- a worker: the fork server imports what every worker it forks starts with (the supervisor
  runs ``from colocate.executor.forkserver import main``). It needs the wire protocol,
  confinement and one counter class from ``colocate.metrics.events`` (which reaches
  pydantic through ``policies.model``); not the supervisor, Prometheus, psutil or HTTP.
- the prolog hook (``python -m slurm_plugin.hooks``, with every module of ours it imports,
  lazily too: it frees a lease's cgroups itself): the standard library, the control socket
  client, the error tree and the cgroup helpers; nothing from a third party.

``benchmarks/imports.py`` reports the same figures with their RSS and import time.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = """
import json, sys
before = set(sys.modules)
{code}
added = sorted(set(sys.modules) - before)
print(json.dumps(added))
"""

ENTRY_POINTS = {
    "client": "from colocate import Client",
    "worker": "from colocate.executor.forkserver import main",
    "prolog hook": "",  # set below: the hook and everything it imports on its way
}

BUDGET = {"client": 340, "worker": 210, "prolog hook": 55}

FORBIDDEN = {
    "client": ("fastapi", "uvicorn", "starlette", "prometheus_client", "psutil", "numpy"),
    "worker": (
        "colocate.executor.supervisor",
        "prometheus_client",
        "psutil",
        "fastapi",
        "uvicorn",
        "httpx",
        "numpy",
    ),
    "prolog hook": ("pydantic", "psutil", "prometheus_client", "httpx", "numpy", "policies"),
}

OURS = ("colocate", "slurm_plugin", "monitors", "policies", "traces")


def hook_imports() -> str:
    """``import slurm_plugin.hooks`` plus every module of ours it imports, lazy ones too
    (a prolog run may import them all)."""
    path = Path(__file__).resolve().parents[2] / "slurm_plugin" / "hooks.py"
    mods = {
        node.module
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
        if node.module.split(".")[0] in OURS
    }
    return "import " + ", ".join(["slurm_plugin.hooks", *sorted(mods)])


ENTRY_POINTS["prolog hook"] = hook_imports()


def added_modules(code: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(code=code)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    modules: list[str] = json.loads(out.stdout)
    return modules


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_entry_point_stays_within_its_module_budget(entry: str) -> None:
    added = added_modules(ENTRY_POINTS[entry])
    heavy = sorted(
        {name for name in added for f in FORBIDDEN[entry] if name == f or name.startswith(f + ".")}
    )
    assert not heavy, f"{entry} loads {heavy}"
    ours = [m for m in added if m.split(".")[0] in OURS]
    assert len(added) <= BUDGET[entry], (
        f"{entry} imports {len(added)} modules (budget {BUDGET[entry]}); ours: {ours}"
    )


def test_the_hook_needs_nothing_from_a_third_party() -> None:
    stdlib = set(sys.stdlib_module_names)
    third = sorted(
        {
            m.split(".")[0]
            for m in added_modules(ENTRY_POINTS["prolog hook"])
            if m.split(".")[0] not in stdlib and m.split(".")[0] not in OURS
        }
    )
    assert third == []


def test_the_probe_sees_a_heavy_import() -> None:
    """The budget check can fail: importing the broker's app loads FastAPI."""
    added = added_modules("import colocate.broker.app")
    assert "fastapi" in added and len(added) > BUDGET["client"]
