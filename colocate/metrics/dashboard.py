"""The Grafana dashboard's PromQL: find it, list every panel's queries, expand its variables.

Used by ``colocate metrics queries`` and by the test that runs every query against a real
Prometheus. Grafana variables are expanded the way Grafana does for a multi-value variable
with "All" selected (a regex matching everything) unless a value is given.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from colocate.errors import ConfigError

__all__ = ["DEFAULT_DASHBOARD", "PanelQuery", "expand", "load_dashboard", "panel_queries"]

#: In a source checkout; installed packages do not carry deploy/.
DEFAULT_DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "colocate.json"

#: Grafana's built-in interval variables, as they expand for a short dashboard range.
BUILTINS: dict[str, str] = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "1h",
}


@dataclass(frozen=True, slots=True)
class PanelQuery:
    """One query of one panel: ``row`` is the title of the row the panel sits under."""

    row: str
    panel: str
    ref_id: str
    expr: str


def load_dashboard(path: str | Path | None = None) -> dict[str, Any]:
    """The dashboard JSON; ConfigError naming the file if it is missing or not JSON."""
    where = Path(path) if path is not None else DEFAULT_DASHBOARD
    try:
        data = json.loads(where.read_text())
    except FileNotFoundError:
        raise ConfigError(
            "dashboard not found; pass --dashboard deploy/grafana/colocate.json", path=str(where)
        ) from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"not valid JSON ({exc})", path=str(where)) from None
    if not isinstance(data, dict) or not isinstance(data.get("panels"), list):
        raise ConfigError("not a Grafana dashboard (no 'panels' list)", path=str(where))
    return data


def _panels(panels: list[dict[str, Any]], row: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for panel in panels:
        if panel.get("type") == "row":
            row = str(panel.get("title", ""))
            yield from _panels(panel.get("panels", []), row)  # collapsed rows nest their panels
            continue
        yield row, panel


def panel_queries(dashboard: Mapping[str, Any]) -> list[PanelQuery]:
    """Every Prometheus query of every panel, in dashboard order (hidden targets skipped)."""
    found: list[PanelQuery] = []
    for row, panel in _panels(list(dashboard.get("panels", [])), ""):
        for target in panel.get("targets", []):
            expr = target.get("expr")
            if expr and not target.get("hide", False):
                found.append(
                    PanelQuery(
                        row, str(panel.get("title", "")), str(target.get("refId", "")), str(expr)
                    )
                )
    return found


def template_variables(dashboard: Mapping[str, Any]) -> list[str]:
    """Names of the dashboard's templating variables."""
    return [str(v["name"]) for v in dashboard.get("templating", {}).get("list", []) if "name" in v]


_VAR = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


def expand(expr: str, values: Mapping[str, str] | None = None) -> str:
    """``expr`` with ``$var`` / ``${var}`` replaced: by ``values[var]``, a builtin, or ``.*``."""
    given = dict(BUILTINS)
    given.update(values or {})

    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        return given.get(name, ".*")

    return _VAR.sub(sub, expr)
