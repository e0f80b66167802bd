"""The files in deploy/ work as shipped: configs load, the hook wrappers never fail, and the
Slurm and plugstack lines name what the other files install."""

from __future__ import annotations

import os
from pathlib import Path

from colocate.config import load_config
from slurm_plugin.hooks import resolve_socket
from slurm_plugin.spank import CONF_NAME, DEFAULT_BUILD_DIR, LIBRARY_NAME, registered_library

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_agent_config_loads_and_sets_the_site_choices() -> None:
    config = load_config(DEPLOY / "agent.toml", env={})
    assert config.agent.broker_url.startswith("http://")
    assert config.agent.default_colocate in ("allow", "deny")
    # The hooks find the same socket as the agent, reading only the standard library way.
    assert resolve_socket(None, str(DEPLOY / "agent.toml"), {}) == config.agent.control_socket


def test_broker_config_loads() -> None:
    config = load_config(DEPLOY / "broker.toml", env={})
    assert config.broker.listen.endswith(":8642")
    assert (
        config.broker.secret_file == load_config(DEPLOY / "agent.toml", env={}).broker.secret_file
    )


def test_slurm_snippet_names_the_wrappers_and_allocation_time_prolog() -> None:
    lines = dict(
        line.split("=", 1)
        for line in (DEPLOY / "slurm.conf.snippet").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert lines["PrologFlags"] == "Alloc"
    for key, name in (("Prolog", "colocate-prolog"), ("Epilog", "colocate-epilog")):
        assert " " not in lines[key], "slurmd runs Prolog= without arguments"
        assert Path(lines[key]).name == name
        assert os.access(DEPLOY / name, os.X_OK)


def test_plugstack_line_names_the_default_build() -> None:
    assert CONF_NAME == "colocate.conf"
    assert registered_library(DEPLOY / "plugstack.conf.d") == DEFAULT_BUILD_DIR / LIBRARY_NAME


def test_systemd_units_run_the_documented_commands() -> None:
    agent = (DEPLOY / "colocate-agent.service").read_text()
    broker = (DEPLOY / "colocate-broker.service").read_text()
    assert "ExecStart=/opt/colocate/bin/colocate agent --config /etc/colocate/agent.toml" in agent
    assert "RuntimeDirectory=colocate" in agent  # /run/colocate for the control socket
    assert (
        "ExecStart=/opt/colocate/bin/colocate broker --config /etc/colocate/broker.toml" in broker
    )
