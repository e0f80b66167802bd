"""The Slurm-integrated agent as a process (``colocate agent`` without ``--standalone``).

Wires the parts together: the live monitor (:class:`~slurm_plugin.agent.slurm_node.SlurmNode`),
the configured policy with its guard, the executor supervisor (lease cgroups under the
agent's own ``colocate/<node>/`` subtree), the metrics (:class:`colocate.metrics.AgentMetrics`
on ``agent.metrics_listen``), the control socket for the hooks
(:class:`~slurm_plugin.agent.slurm_control.SlurmControl`) and the HTTP API for the broker.

Stopping: SIGTERM or SIGINT evicts every lease and tells the broker. SIGUSR1 restarts without
harm (an upgrade): the agent exits leaving its executors running; the next agent started on
this node within ``executor.adopt_window_s`` with the same ``state_dir`` adopts them, and their
clients see no error. A SIGKILLed or crashed agent's executors are adopted the same way.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
from typing import TYPE_CHECKING

from colocate.config import AgentConfig, Config
from colocate.errors import ConfigError

if TYPE_CHECKING:
    from colocate.metrics import AgentMetrics
    from policies.model import Policy
    from slurm_plugin.agent.agent import Agent
    from slurm_plugin.agent.node_source import NodeSource, StandaloneNode

log = logging.getLogger(__name__)


def control_uids(users: tuple[str, ...]) -> frozenset[int]:
    """Uids besides root allowed on the control socket; a missing default ``slurm`` user
    (SlurmUser=root) is skipped, any other unknown name is a ConfigError."""
    import pwd

    from slurm_plugin.control import resolve_uids

    present: list[str] = []
    for user in users:
        if user == "slurm":
            try:
                pwd.getpwnam(user)
            except KeyError:
                log.info("no user 'slurm' on this node; the control socket serves root only")
                continue
        present.append(user)
    return resolve_uids(present)


def check_node(node: str) -> None:
    """ConfigError when this machine has no Slurm or Slurm has no node ``node``; a Slurm
    that does not answer now is only a warning (the monitor retries)."""
    import shutil

    from colocate.errors import SlurmUnavailable
    from slurm_plugin.slurm.cli import CliSlurm

    if shutil.which("sinfo") is None:
        raise ConfigError(
            "Slurm's sinfo is not installed here; run `colocate agent --standalone` on a machine without Slurm"
        )
    try:
        CliSlurm(timeout_s=5.0).node_info(node)
    except ConfigError as exc:
        raise ConfigError(f"{exc}, or --standalone to run without Slurm") from None
    except SlurmUnavailable as exc:
        log.warning("Slurm does not answer yet (%s); the agent offers nothing until it does", exc)


def open_agent(
    stack: contextlib.ExitStack,
    config: Config,
    agent_config: AgentConfig,
    secret: bytes,
    node: str,
    source: NodeSource,
    policy: Policy,
    metrics: AgentMetrics | None = None,
) -> tuple[Agent, socket.socket, str]:
    """Bind the agent's API, start its executor supervisor (closed by ``stack``) and build the
    :class:`Agent` over ``source`` and ``policy``: the wiring both agent modes share."""
    from colocate.auth.node import node_key
    from colocate.broker.service import bind, url_of
    from colocate.executor import ExecutorSupervisor
    from slurm_plugin.agent.agent import Agent

    secret = node_key(
        secret, node
    )  # this node's own key: reports, broker calls, lease tokens (issue 12)

    sock = bind(agent_config.listen, 8643)
    url = url_of(sock)
    host = sock.getsockname()[0]
    if agent_config.advertise_host:
        host = agent_config.advertise_host
    elif host in ("0.0.0.0", "::"):
        host = socket.getfqdn()
    try:
        supervisor = ExecutorSupervisor(
            config.executor, secret, node=node, host=host, state_dir=agent_config.state_dir
        )
    except OSError as exc:
        raise ConfigError(
            f"cannot set up executors in {agent_config.state_dir} ({exc}); pass a short, writable --state-dir"
        ) from None
    stack.callback(supervisor.close)

    def restart(_signum: int, _frame: object) -> None:
        log.warning("SIGUSR1: exiting for a restart; the next agent adopts the executors")
        supervisor.detach()
        os.kill(os.getpid(), signal.SIGTERM)

    with contextlib.suppress(ValueError):  # not the main thread (tests): no restart signal
        signal.signal(signal.SIGUSR1, restart)
    limits = config.policy.limits
    if agent_config.interference_table:  # the site's measured table caps the function share
        from colocate.config import load_interference_table
        from policies.interference import guarded_limits

        limits = guarded_limits(limits, load_interference_table(agent_config.interference_table))
    agent = Agent(
        source,
        policy,
        supervisor,
        secret=secret,
        url=url.replace(sock.getsockname()[0], host) if agent_config.advertise_host else url,
        broker_url=agent_config.broker_url,
        limits=limits,
        interval_s=agent_config.interval_s,
        eviction_grace_s=agent_config.eviction_grace_s,
        growth_recheck_s=agent_config.growth_recheck_s,
        max_payload_bytes=config.executor.max_payload_bytes,
        metrics=metrics,
    )
    if agent_config.record_file:  # issue 11: decisions recorded for the replay
        from slurm_plugin.agent.recorder import DecisionRecorder

        agent.recorder = DecisionRecorder(
            agent_config.record_file,
            agent_config.record_max_bytes,
            policy.name,
            limits,
        )
        stack.callback(agent.recorder.close)
    return agent, sock, url


def run_standalone_agent(
    config: Config, agent_config: AgentConfig, secret: bytes, node: str, source: StandaloneNode
) -> int:
    """Offer ``source`` (a share of this machine) with the ``unallocated`` policy, no Slurm."""
    from colocate.broker.service import serve
    from policies.unallocated import UnallocatedPolicy
    from slurm_plugin.agent.app import create_app

    with contextlib.ExitStack() as stack:
        agent, sock, url = open_agent(
            stack, config, agent_config, secret, node, source, UnallocatedPolicy()
        )
        cleaned = agent.recover()
        print(
            f"colocate agent: node {node} listening on {url}, offering {len(source.cpu_ids)} cores and "
            f"{source.memory_bytes} bytes to {agent_config.broker_url}"
            + (f"; cleaned up {len(cleaned)} executors of a previous run" if cleaned else ""),
            flush=True,
        )
        serve(create_app(agent), sock)
    return 0


def run_slurm_agent(config: Config, agent_config: AgentConfig, secret: bytes, node: str) -> int:
    """Run until SIGTERM/SIGINT; on exit every lease is evicted and the broker told."""
    from colocate.broker.service import serve
    from colocate.metrics import AgentMetrics
    from policies import get_policy
    from slurm_plugin.agent.app import create_app
    from slurm_plugin.agent.memory_watch import MemoryWatch
    from slurm_plugin.agent.slurm_control import SlurmControl
    from slurm_plugin.agent.slurm_node import SlurmNode
    from slurm_plugin.control import ControlServer, socket_path_for
    from slurm_plugin.hooks import choice_dir_for
    from slurm_plugin.slurm.cli import CliSlurm

    try:
        policy = get_policy(config.policy.name)
    except ValueError as exc:
        raise ConfigError(str(exc), key="policy.name") from None
    check_node(node)
    uids = control_uids(agent_config.control_users)
    control_path = socket_path_for(agent_config.control_socket, node)
    with contextlib.ExitStack() as stack:
        source = SlurmNode.live(
            node,
            psi_groups=agent_config.psi_groups,
            default_colocate=agent_config.default_colocate == "allow",
            slurm_backend=agent_config.slurm_backend,
        )
        stack.callback(source.close)
        metrics = AgentMetrics(node, config.prices, listen=agent_config.metrics_listen)
        stack.callback(metrics.close)
        agent, sock, url = open_agent(
            stack, config, agent_config, secret, node, source, policy, metrics
        )
        watch = MemoryWatch.for_node(node, agent.wake).start()
        stack.callback(watch.close)
        handler = SlurmControl(
            agent, source, CliSlurm(timeout_s=2.0), choice_dir_for(control_path)
        )  # within the prolog's wait
        handler.watch_choices(agent_config.interval_s)
        stack.callback(handler.close)
        control = ControlServer(control_path, handler, allowed_uids=uids)
        control.start()
        stack.callback(control.close)
        cleaned = agent.recover()
        metrics_url = metrics.server.url if metrics.server is not None else "(not served)"
        print(
            f"colocate agent: node {node} listening on {url}, control socket {control_path}, "
            f"metrics {metrics_url}, policy {config.policy.name}, reporting to {agent_config.broker_url}"
            + (f"; cleaned up {len(cleaned)} executors of a previous run" if cleaned else ""),
            flush=True,
        )
        serve(create_app(agent), sock)
    return 0
