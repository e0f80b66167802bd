"""One TOML file, validated by frozen pydantic models; unknown keys are errors.

Environment overrides: ``COLOCATE_<SECTION>__<KEY>=value`` (e.g. ``COLOCATE_AGENT__INTERVAL_S=2``).
Defaults live in the models below and nowhere else.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from colocate.errors import ConfigError
from colocate.protocol import DEFAULT_MAX_PAYLOAD_BYTES
from policies.interference import InterferenceTable
from policies.limits import Limits
from policies.prices import Prices


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PolicyConfig(_Section):
    name: str = "headroom"
    limits: Limits = Limits()


class ExecutorConfig(_Section):
    max_payload_bytes: int = Field(DEFAULT_MAX_PAYLOAD_BYTES, gt=0)
    hot_timeout_s: float = Field(0.005, ge=0, description="busy-poll this long before blocking")
    # "owner": a lease's workers run as its owner's uid, gid and groups (like a Slurm job step);
    # "pool": as a uid of their own from lease_uid_range. A lease without an owner (standalone
    # agent without authentication) or owned by root runs as the pool uid or run_as_user.
    run_as: Literal["owner", "pool"] = "owner"
    run_as_user: str = "nobody"
    # Imported once by the fork server, before workers drop to run_as_user (who may not be
    # allowed to read the Python installation, e.g. a pyenv under /root).
    preload_modules: tuple[str, ...] = ()
    eviction_notice_s: float = Field(
        0.1,
        ge=0,
        description="with no grace, longest wait for workers to notify clients and exit before SIGKILL",
    )
    # A uid of its own per lease, from [first, last] (group of run_as_user), so that one lease's
    # functions cannot signal another lease's workers. None: every lease runs as run_as_user.
    lease_uid_range: tuple[int, int] | None = None
    # The sandbox per lease (Linux namespaces): private /tmp and /dev/shm, /proc of the lease only,
    # no network. "outbound": the host's network, with cgroup BPF refusing every address of this
    # host (127/8, ::1, the node's own), where batch jobs listen.
    sandbox: bool = True
    network: Literal["none", "outbound"] = "none"
    pids_max: int = Field(
        256, ge=8, description="processes and threads per lease (cgroup pids, RLIMIT_NPROC)"
    )
    fsize_max_bytes: int = Field(
        1024**3, gt=0, description="largest file a function may write (RLIMIT_FSIZE)"
    )
    tmp_max_bytes: int | None = Field(
        None, gt=0, description="size of /tmp and /dev/shm each (default: the lease's memory)"
    )
    expiry_grace_s: float = Field(
        2.0, ge=0, description="a worker ends itself this long after its lease expired"
    )
    adopt_window_s: float = Field(
        30.0,
        ge=0,
        description="after the agent dies, how long executors wait for a restarted agent",
    )
    hello_timeout_s: float = Field(
        2.0, gt=0, description="a connection without a valid lease token is closed after this"
    )
    max_pending_connections: int = Field(
        64, ge=1, description="per worker, connections that have not presented a token"
    )


def _size_or_none(value: Any) -> Any:
    from colocate.units import parse_size

    return parse_size(value) if isinstance(value, str) else value


class AuthConfig(_Section):
    """Who may call the broker: MUNGE (the cluster's munged) and/or Slurm JWT (HS256)."""

    methods: tuple[Literal["munge", "jwt"], ...] = Field(("munge",), min_length=1)
    jwt_key_file: str | None = None  # Slurm's AuthAltParameters=jwt_key= file
    admin_users: tuple[str, ...] = ()  # besides root: may see, renew and release every lease
    admin_groups: tuple[str, ...] = ()


class Quota(_Section):
    """Limits for one user or one account; None: unlimited."""

    cores: int | None = Field(None, ge=0, description="cores held at once")
    memory: Annotated[
        int | None, BeforeValidator(_size_or_none), Field(ge=0, description="bytes held at once")
    ] = None
    leases: int | None = Field(None, ge=0, description="concurrent leases")
    duration_s: float | None = Field(None, gt=0, description="longest lease, seconds")
    core_hours_per_day: float | None = Field(
        None, ge=0, description="core-hours granted since midnight UTC"
    )


class QuotaConfig(_Section):
    default_user: Quota = Quota()  # every user without an entry in ``users``
    users: dict[str, Quota] = Field(default_factory=dict)
    default_account: Quota = Quota()
    accounts: dict[str, Quota] = Field(default_factory=dict)


class BrokerConfig(_Section):
    listen: str = "127.0.0.1:8642"
    placement: Literal["first_fit", "best_fit"] = "best_fit"
    secret_file: str | None = None  # cluster secret for lease tokens; generated when absent
    node_timeout_s: float = Field(
        10.0, gt=0, description="a node silent this long gets no new leases"
    )
    max_lease_s: float = Field(86400.0, gt=0, description="longest lease duration granted, seconds")
    agent_timeout_s: float = Field(
        5.0, gt=0, description="how long the broker waits for an agent, seconds"
    )
    auth: AuthConfig = AuthConfig()
    # user -> Slurm accounts they may charge (the first is their default); "*" matches every
    # user. Empty: any account name is accepted (like Slurm without slurmdbd).
    accounts: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    default_account: str = ""  # when the user names none and has no entry in ``accounts``
    quotas: QuotaConfig = QuotaConfig()
    # The accounting ledger: a SQLite file (WAL) or a postgresql:// URL; "" disables it.
    # None: ledger.db next to the cluster secret (/var/lib/colocate/ledger.db for root).
    ledger: str | None = None
    max_connections: int = Field(
        900, ge=1, description="open HTTP connections served at once; more get 503"
    )
    max_in_flight: int = Field(
        256,
        ge=2,
        description="requests served at once; more get 503 with Retry-After (node reports from half of it)",
    )


class AgentConfig(_Section):
    node: str | None = None  # defaults to the short hostname
    broker_url: str = "http://127.0.0.1:8642"
    interval_s: float = Field(1.0, gt=0)
    control_socket: str = "/run/colocate/agent.sock"
    default_colocate: Literal["allow", "deny"] = "allow"
    metrics_listen: str = "0.0.0.0:9642"
    listen: str = "127.0.0.1:8643"  # the agent's HTTP API, called by the broker
    advertise_host: str | None = None  # host in executor addresses; defaults to the listen host
    offer_cores: int | None = Field(
        None, ge=1, description="standalone: cores offered (default all)"
    )
    offer_memory: str | None = None  # standalone: memory offered, e.g. "4GiB" (default half of RAM)
    eviction_grace_s: float = Field(
        1.0, ge=0, description="revocations: executor grace period, seconds"
    )
    growth_recheck_s: float | None = Field(
        None,
        gt=0,
        description="while a job's growth into a lent core awaits its confirming sample, sample again after this (default interval_s / 4; interval_s: off)",
    )
    state_dir: str = "/var/lib/colocate"
    # Besides root, who may use the control socket (the prolog/epilog run as SlurmUser). A
    # missing "slurm" user (SlurmUser=root sites, the dev cluster) is skipped; other names
    # must exist.
    control_users: tuple[str, ...] = ("slurm",)
    # v1 only: give each job a tracking group in the unified hierarchy so PSI evictions see
    # the job's own pressure (node-wide PSI otherwise).
    psi_groups: bool = False
    # How the agent asks Slurm: "cli" (squeue/sinfo/scontrol) or "pyslurm" (in-process, about
    # 9x faster per query; needs pyslurm built for this Slurm release, see deploy/README.md).
    slurm_backend: Literal["cli", "pyslurm"] = "cli"
    # Record every decision (view, state, offer, evictions) as JSON lines for
    # `colocate replay --from-agent-log`; off when unset. Rotates to FILE.1 past record_max_bytes.
    record_file: str | None = None
    record_max_bytes: int = Field(
        64 * 1024**2, ge=4096, description="decision record: rotate past this size"
    )
    # A site's interference table (`colocate calibrate --out`): the guard caps the function
    # share of a node where the table's typical slowdown would pass limits.slowdown_budget.
    interference_table: str | None = None


class Config(_Section):
    policy: PolicyConfig = PolicyConfig()
    prices: Prices = Prices()
    agent: AgentConfig = AgentConfig()
    broker: BrokerConfig = BrokerConfig()
    executor: ExecutorConfig = ExecutorConfig()


def _env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in env.items():
        if not key.startswith("COLOCATE_") or "__" not in key:
            continue
        path = key.removeprefix("COLOCATE_").lower().split("__")
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Read ``path`` (or defaults when None), apply environment overrides, validate.

    Raises ConfigError naming the file and the offending key.
    """
    data: dict[str, Any] = {}
    where = str(path) if path else "<defaults>"
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError("file not found; pass an existing TOML file", path=where) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"not valid TOML ({exc})", path=where) from None
    data = _merge(data, _env_overrides(os.environ if env is None else env))
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        raise ConfigError(
            f"{err['msg']} (see deploy/ for an example config)", path=where, key=key
        ) from None


def load_interference_table(path: str | Path) -> InterferenceTable:
    """The table ``colocate calibrate --out`` wrote; ConfigError naming the file and field."""
    import json

    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(
            f"cannot read the interference table ({exc.strerror}); write one with "
            "`colocate calibrate --out`",
            path=str(path),
        ) from None
    except ValueError as exc:
        raise ConfigError(f"not JSON: {exc}", path=str(path)) from None
    try:
        return InterferenceTable.from_mapping(data, where="table")
    except ValueError as exc:
        raise ConfigError(str(exc).removeprefix("table: "), path=str(path)) from None
