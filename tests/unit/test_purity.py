"""The shared-core rule: policies/ (decisions and lease accounting) does no I/O and reads no clock.

The live agent and the replay drive the same code only as long as this holds.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[2] / "policies"
FORBIDDEN_MODULES = {
    "asyncio",
    "datetime",
    "http",
    "io",
    "os",
    "pathlib",
    "psutil",
    "prometheus_client",
    "random",
    "select",
    "shutil",
    "socket",
    "subprocess",
    "sys",
    "threading",
    "time",
    "urllib",
    "httpx",
    "colocate",
    "monitors",
    "slurm_plugin",
    "traces",
}
FORBIDDEN_CALLS = {"open", "print", "input", "exec", "eval", "__import__"}


def _core_files() -> list[Path]:
    return sorted(CORE.rglob("*.py"))


def test_core_has_modules() -> None:
    assert len(_core_files()) >= 3


@pytest.mark.parametrize("path", _core_files(), ids=lambda p: p.name)
def test_core_module_is_pure(path: Path) -> None:
    tree = ast.parse(path.read_text(), filename=str(path))
    offences: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""] if node.level == 0 else []
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id in FORBIDDEN_CALLS:
                offences.append(f"line {node.lineno}: calls {node.func.id}()")
            continue
        else:
            continue
        for name in names:
            if name.split(".")[0] in FORBIDDEN_MODULES:
                offences.append(f"line {node.lineno}: imports {name}")
    assert not offences, f"{path.name} breaks the shared-core rule: {offences}"
