"""The import rules of ARCHITECTURE.md, enforced: a layered graph over packages and
sub-packages, with no cycles.

Every import counts, at module level or inside a function (``cli`` and the agent import
lazily, and a lazy import is still a dependency). A *unit* is a top-level package or one of
its sub-packages (``colocate.broker``, ``slurm_plugin.agent``); modules directly in a
top-level package (``colocate/errors.py``, ``slurm_plugin/hooks.py``) belong to the
top-level unit. ``colocate/__main__.py`` is the CLI's entry point and belongs to
``colocate.cli``.
"""

from __future__ import annotations

import ast
import graphlib
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OURS = ("colocate", "policies", "traces", "monitors", "slurm_plugin")

# unit -> what it may import besides itself: units, or module prefixes where a unit may use
# only part of another (``monitors.snapshot``). Lower layers first.
ALLOWED: dict[str, tuple[str, ...]] = {
    "policies": (),
    "colocate": ("policies",),  # errors, config, units, tokens, protocol, owner
    "traces": ("policies", "colocate.errors", "colocate.units"),
    "traces.data": (),  # bundled trace excerpts (a package so they ship with the wheel)
    "slurm_plugin.slurm": ("colocate",),
    "monitors": ("policies", "colocate.errors", "slurm_plugin.slurm"),
    "colocate.auth": ("colocate",),
    "colocate.metrics": ("colocate", "policies", "monitors.snapshot"),
    "colocate.executor": ("colocate", "colocate.metrics.events", "policies"),
    "colocate.broker": ("colocate", "colocate.auth", "colocate.metrics", "policies"),
    # FMI: the communicator inside a worker (asks the serving worker for its verifier)
    "colocate.fmi": ("colocate", "colocate.executor.worker"),
    # serverless processes: the client side and the worker side (asks the worker for eviction)
    "colocate.process": ("colocate", "colocate.executor.worker"),
    "colocate.client": (
        "colocate",
        "colocate.auth",
        "colocate.broker.api",
        "colocate.broker.replies",
        "colocate.fmi",
        "colocate.process",
    ),
    "slurm_plugin.spank": ("colocate",),
    # replay sweeps: runners spreading traces.sweep trials over processes, a Slurm array, Dask
    "colocate.sweep": ("colocate", "traces", "slurm_plugin.slurm"),
    # hooks, control socket, dev cluster; the prolog frees a lease's cgroups itself (light:
    # tests/unit/test_import_budget.py holds the hook to the standard library)
    "slurm_plugin": ("colocate", "colocate.executor", "slurm_plugin.spank"),
    "slurm_plugin.agent": (
        "colocate",
        "colocate.auth",
        "colocate.broker",
        "colocate.executor",
        "colocate.metrics",
        "monitors",
        "policies",
        "slurm_plugin",
        "slurm_plugin.slurm",
    ),
    # `colocate calibrate`: Slurm jobs and leases through the Client, the table of policies
    "colocate.calibrate": ("colocate", "colocate.client", "policies"),
    # the CLI wires everything together (each subcommand imports what it needs on use)
    "colocate.cli": (
        "colocate",
        "colocate.auth",
        "colocate.broker",
        "colocate.calibrate",
        "colocate.client",
        "colocate.executor",
        "colocate.metrics",
        "monitors",
        "policies",
        "slurm_plugin",
        "slurm_plugin.agent",
        "slurm_plugin.slurm",
        "slurm_plugin.spank",
        "traces",
        "colocate.sweep",
    ),
}


def unit_of(module: str) -> str:
    """The unit a dotted module name belongs to."""
    if module == "colocate.__main__":
        return "colocate.cli"
    parts = module.split(".")
    if len(parts) >= 2 and (ROOT / parts[0] / parts[1] / "__init__.py").is_file():
        return f"{parts[0]}.{parts[1]}"
    return parts[0]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def our_files() -> Iterator[Path]:
    for package in OURS:
        yield from sorted((ROOT / package).rglob("*.py"))


def imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, dotted name) of every absolute import of our packages, lazy ones included;
    type-only ones (under ``if TYPE_CHECKING:``) never run and do not count.

    ``from a.b import c`` yields ``a.b.c`` (c may be a module or a name in a.b; prefixes
    match either way).
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    type_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and _is_type_checking(node.test)
        for stmt in node.body
        for inner in ast.walk(stmt)
    }
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] in OURS:
                yield node.lineno, name


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def units_in_tree() -> set[str]:
    return {unit_of(module_name(f)) for f in our_files()}


def allowed_graph() -> dict[str, set[str]]:
    """unit -> units it may depend on (module-prefix entries reduced to their unit)."""
    return {unit: {unit_of(a) for a in allowed} - {unit} for unit, allowed in ALLOWED.items()}


def test_every_unit_has_a_place_in_the_layers() -> None:
    missing = units_in_tree() - set(ALLOWED)
    assert not missing, f"add {sorted(missing)} to ALLOWED here and to ARCHITECTURE.md"
    stale = set(ALLOWED) - units_in_tree()
    assert not stale, f"ALLOWED names units that no longer exist: {sorted(stale)}"


def test_the_layers_form_a_dag() -> None:
    try:
        order = list(graphlib.TopologicalSorter(allowed_graph()).static_order())
    except graphlib.CycleError as exc:
        pytest.fail(f"the layer table has a cycle: {' -> '.join(exc.args[1])}")
    assert order[0] == "policies"  # the pure core sits at the bottom
    assert order[-1] == "colocate.cli"  # only the CLI imports everything


def test_cycle_detection_finds_a_cycle() -> None:
    """The check above can fail: a table where monitors and the agent need each other."""
    graph = allowed_graph()
    graph["monitors"] = graph["monitors"] | {"slurm_plugin.agent"}
    with pytest.raises(graphlib.CycleError):
        list(graphlib.TopologicalSorter(graph).static_order())


@pytest.mark.parametrize("unit", sorted(ALLOWED))
def test_unit_imports_only_its_allowed_layers(unit: str) -> None:
    allowed = (unit, *ALLOWED[unit])
    offences = []
    for path in our_files():
        if unit_of(module_name(path)) != unit:
            continue
        for line, name in imports(path):
            target = unit_of(name)
            if target == unit:
                continue
            if not any(
                target == a if a in ALLOWED else name == a or name.startswith(a + ".")
                for a in allowed
            ):
                offences.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not offences, "\n".join(offences)
