"""``colocate agent``: run the node agent.

Slurm mode (default): one agent per compute node samples the node every ``interval_s``,
runs the configured policy (``[policy] name``, guard included) and leases the idle cores and
unused memory of running jobs; the prolog/epilog hooks reach it on ``agent.control_socket``
(``{node}`` in the path becomes the node name). ``--standalone`` offers a fixed share of this
machine without Slurm.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--standalone", action="store_true", help="offer this machine's cores and memory, no Slurm"
    )
    parser.add_argument(
        "--broker", help="broker URL (default agent.broker_url, http://127.0.0.1:8642)"
    )
    parser.add_argument("--config", help="colocate TOML config file (default: built-in defaults)")
    parser.add_argument(
        "--listen",
        help="HOST:PORT of the agent's API for the broker (default 127.0.0.1:8643; port 0 picks one)",
    )
    parser.add_argument(
        "--advertise-host",
        help="host name clients use to reach executors (default: the listen host)",
    )
    parser.add_argument("--node", help="node name (default: the short hostname)")
    parser.add_argument("--cores", type=int, help="standalone: cores to offer (default: all)")
    parser.add_argument(
        "--memory", help="standalone: memory to offer, e.g. 4GiB (default: half of RAM)"
    )
    parser.add_argument(
        "--interval", type=float, help="seconds between reports to the broker (default 1)"
    )
    parser.add_argument(
        "--secret-file", help="cluster secret shared with the broker (default broker.secret_file)"
    )
    parser.add_argument("--state-dir", help="where the agent keeps lease state and executor files")
    parser.add_argument(
        "--control-socket",
        help="Slurm mode: the hooks' Unix socket (default agent.control_socket; {node} becomes the node)",
    )
    parser.add_argument(
        "--status",
        action="store_true",
        help="ask the running agent of --node over its control socket (leases, jobs, evictions and why) and exit",
    )
    parser.add_argument("--json", action="store_true", help="with --status: print the JSON answer")
    parser.add_argument(
        "--metrics-listen",
        help="Slurm mode: HOST:PORT for Prometheus /metrics (default agent.metrics_listen; port 0 picks one)",
    )


def _status(control_socket: str, node: str, as_json: bool) -> int:
    import json

    from colocate.errors import BackendUnavailable
    from slurm_plugin.control_client import call, socket_path_for

    path = socket_path_for(control_socket, node)
    reply = call(path, {"op": "status"}, 5.0)
    if not reply.ok:
        raise BackendUnavailable(f"agent at {path}: {reply.error}")
    status = reply.body.get("status", {})
    if as_json:
        print(json.dumps(status, indent=2))
        return 0
    print(
        f"node {status.get('node')}: offering cores {status.get('cpu_ids')} and {status.get('memory_bytes')} bytes"
    )
    for job in status.get("jobs", []):
        waiting = job.get("cores_waiting")
        busy = job.get("cpu_busy") or {}
        print(
            f"  job {job['job_id']}: cores {job['cpu_ids']}, {job['cores_used']:.2f} used"
            + (f" + {waiting:.2f} waiting for a CPU" if waiting else "")
            + (
                " (per core: " + ", ".join(f"{c}: {b:.0%}" for c, b in busy.items()) + ")"
                if busy
                else ""
            )
            + f", memory {job['memory_used_bytes']}/{job['memory_allocated_bytes']} bytes, "
            f"{'shares' if job['colocate'] else 'colocate=deny'}"
        )
    for lease in status.get("leases", []):
        print(
            f"  lease {lease['lease_id']}: cores {lease['cpu_ids']}, {lease['memory_bytes']} bytes"
        )
    for ev in status.get("evictions", [])[-10:]:
        took = f"{ev['seconds'] * 1e3:.1f} ms" if ev.get("seconds") is not None else "failed"
        print(f"  evicted {ev['lease_id']} ({ev['reason']}), gone in {took}")
    return 0


def run(args: argparse.Namespace) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per report is noise
    from colocate.broker.secret import default_secret_file, load_or_create_secret
    from colocate.config import AgentConfig, load_config
    from colocate.errors import ConfigError
    from colocate.units import parse_size

    config = load_config(args.config)
    updates = {
        key: value
        for key, value in (
            ("broker_url", args.broker),
            ("listen", args.listen),
            ("advertise_host", args.advertise_host),
            ("node", args.node),
            ("offer_cores", args.cores),
            ("offer_memory", args.memory),
            ("interval_s", args.interval),
            ("state_dir", args.state_dir),
            ("control_socket", args.control_socket),
            ("metrics_listen", args.metrics_listen),
        )
        if value is not None
    }
    agent_config = config.agent.model_copy(update=updates)
    if agent_config.interval_s <= 0:
        raise ConfigError("--interval must be positive")
    if (
        os.geteuid() != 0
        and args.state_dir is None
        and agent_config.state_dir == AgentConfig().state_dir
    ):
        # A user's laptop: /var/lib is root's; keep the state next to the user's secret.
        agent_config = agent_config.model_copy(
            update={"state_dir": str(default_secret_file().parent / "agent")}
        )
    node = agent_config.node or socket.gethostname().split(".")[0]
    if args.status:
        return _status(agent_config.control_socket, node, args.json)
    secret = load_or_create_secret(args.secret_file or config.broker.secret_file)
    if not args.standalone:
        from slurm_plugin.agent.daemon import run_slurm_agent

        return run_slurm_agent(config, agent_config, secret, node)
    memory = (
        parse_size(agent_config.offer_memory) if agent_config.offer_memory is not None else None
    )

    from slurm_plugin.agent import StandaloneNode
    from slurm_plugin.agent.daemon import run_standalone_agent

    source = StandaloneNode.from_machine(node, agent_config.offer_cores, memory)
    return run_standalone_agent(config, agent_config, secret, node, source)
