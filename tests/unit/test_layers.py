"""The import rules of ARCHITECTURE.md, enforced: each package imports only the layers below it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OURS = ("colocate", "policies", "traces", "monitors", "slurm_plugin")

# package -> prefixes of our modules it may import (itself always allowed)
ALLOWED: dict[str, tuple[str, ...]] = {
    "policies": (),
    "traces": ("policies", "colocate.errors", "colocate.units"),
    "monitors": ("policies", "colocate.errors", "slurm_plugin.slurm"),
    # colocate's library (not its CLI, which wires everything together)
    "colocate": ("colocate", "policies", "monitors.snapshot"),
    "slurm_plugin": ("slurm_plugin", "colocate", "policies", "monitors"),
}


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def _modules(package: str) -> list[Path]:
    files = sorted((ROOT / package).rglob("*.py"))
    if package == "colocate":
        files = [f for f in files if "cli" not in f.relative_to(ROOT / package).parts]
    return files


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_its_allowed_layers(package: str) -> None:
    allowed = (package, *ALLOWED[package])
    offences = []
    for path in _modules(package):
        for line, name in _imports(path):
            if name.split(".")[0] not in OURS:
                continue
            if not any(name == a or name.startswith(a + ".") for a in allowed):
                offences.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not offences, "\n".join(offences)
