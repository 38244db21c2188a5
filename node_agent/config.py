"""The node agent's configuration: defaults (SPIRE's), a TOML file, then flags.

Every scalar setting has the same name in the TOML file (``[agent]`` table or top level)
and as a flag (``--data-dir`` for ``data_dir``). Durations are seconds or ``90s`` / ``10m``.
``server_address`` (one string) and ``server_addresses`` (a list) are both accepted; the
agent fails over between the addresses in order.

Plugins are TOML tables, config file only, named as in SPIRE::

    [agent.node_attestor.join_token]      # exactly one node attestor
    [agent.workload_attestor.unix]        # one or more workload attestors, combined
    workload_size_limit = 67108864

Each table parses into its plugin's own frozen dataclass (listed in
:mod:`node_agent.attestation.catalog` and :mod:`node_agent.workload.catalog`); an error
names the key by its full path (``agent.workload_attestor.unix.proc_root: ...``). With no
``[agent.node_attestor.*]`` table the node attestor is ``join_token`` (``--join-token``
gives its token); with no ``[agent.workload_attestor.*]`` table it is ``unix``.

The flat ``workload_size_limit`` key and its flag ``--workload-size-limit`` from before the
plugin tables still work: they set the ``unix`` attestor's ``workload_size_limit`` (over
the table's value) and the agent logs a deprecation warning at start saying where the key
moved.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from credo._config import from_table, plugin_tables, read_toml
from credo._logging import LOG_FORMATS, LOG_LEVELS
from credo.errors import ConfigError
from credo.spiffe_id import TrustDomain
from node_agent.attestation.catalog import DEFAULT_NODE_ATTESTOR, NODE_ATTESTORS
from node_agent.paths import default_agent_admin_socket, default_workload_socket
from node_agent.workload.catalog import DEFAULT_WORKLOAD_ATTESTORS, WORKLOAD_ATTESTORS

__all__ = [
    "LOG_FORMATS",
    "LOG_LEVELS",
    "AgentConfig",
    "ConfigError",
    "PluginConfig",
    "load_config",
]

# Aliases users may write in TOML (the flag spellings).
_ALIASES = {
    "socket": "socket_path",
    "server_address": "server_addresses",
    "svid_cache_size": "svid_cache_max_size",
}
# Flat keys that moved into a plugin table: key -> (plugin kind, plugin name).
_MOVED = {"workload_size_limit": ("workload_attestor", "unix")}


@dataclass(frozen=True)
class PluginConfig:
    """One configured plugin: its name in the catalog and its parsed table."""

    name: str
    config: Any
    """The plugin's own frozen config dataclass."""


def _default_node_attestor() -> PluginConfig:
    return PluginConfig(DEFAULT_NODE_ATTESTOR, NODE_ATTESTORS[DEFAULT_NODE_ATTESTOR].config())


def _default_workload_attestors() -> tuple[PluginConfig, ...]:
    return tuple(
        PluginConfig(name, WORKLOAD_ATTESTORS[name].config()) for name in DEFAULT_WORKLOAD_ATTESTORS
    )


@dataclass(frozen=True)
class AgentConfig:
    """Everything ``credo-agent run`` needs; durations in seconds."""

    # host:port of each signing server; the agent fails over between them in order.
    server_addresses: tuple[str, ...] = ()
    trust_domain: str = "example.org"
    # PEM bootstrap bundle (``credo-server bundle show --format pem``).
    trust_bundle: Path | None = None
    # Or fetch it over HTTPS (web PKI) from this URL, e.g. the server's bundle endpoint;
    # trust_bundle_format says what it serves: "pem" or "spiffe" (SPIRE's settings).
    trust_bundle_url: str = ""
    trust_bundle_format: str = "pem"
    # Skip server verification for the first attestation only (warns loudly).
    insecure_bootstrap: bool = False
    # The join_token node attestor's token.
    join_token: str | None = None
    # Under /run/credo-agent as root, else under /tmp/credo-agent (paths.py).
    socket_path: Path = field(default_factory=default_workload_socket)
    admin_socket: Path = field(default_factory=default_agent_admin_socket)
    data_dir: Path = Path("./.credo/agent")
    log_level: str = "info"
    log_format: str = "text"
    # Soft bound on cached X509-SVIDs; identities of active subscriptions are always kept.
    svid_cache_max_size: int = 1000
    # Backoff of every retry to the server (sync reconnects, signing, agent-SVID renewal,
    # attestation): exponential with jitter between these bounds.
    sync_backoff_min: float = 0.2
    sync_backoff_max: float = 30.0
    # How long a new subscription waits for SVIDs of matching entries to be signed.
    svid_wait_timeout: float = 5.0
    # Nice value of the agent's processes where it may set it (root), and of its session's
    # autogroup when it leads its session (a service manager started it): see
    # node_agent/priority.py. A local user churning connections must not starve it.
    nice: int = -10
    # host:port of the Prometheus endpoint (port 0: any free one); "" disables it.
    metrics_address: str = ""
    # [agent.node_attestor.<name>]: exactly one.
    node_attestor: PluginConfig = field(default_factory=_default_node_attestor)
    # [agent.workload_attestor.<name>]: one or more, their selectors combined.
    workload_attestor: tuple[PluginConfig, ...] = field(default_factory=_default_workload_attestors)
    # Deprecated settings that were used, as messages to log at start.
    deprecations: tuple[str, ...] = field(default=(), compare=False)

    @property
    def trust_domain_obj(self) -> TrustDomain:
        """The parsed trust domain."""
        return TrustDomain.parse(self.trust_domain)

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad setting."""
        try:
            TrustDomain.parse(self.trust_domain)
        except ValueError as exc:
            raise ConfigError(f"trust_domain: {exc}") from None
        if not self.server_addresses:
            raise ConfigError(
                "server_addresses: at least one server address is required "
                "(--server-address host:port)"
            )
        for address in self.server_addresses:
            host, sep, port = address.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(f"server_addresses: expected host:port, got {address!r}")
        if self.trust_bundle is not None and self.insecure_bootstrap:
            raise ConfigError("trust_bundle and insecure_bootstrap are mutually exclusive")
        if self.trust_bundle_url:
            parts = urlsplit(self.trust_bundle_url)
            if parts.scheme != "https" or not parts.hostname:
                raise ConfigError(
                    f"trust_bundle_url: expected an https URL, got {self.trust_bundle_url!r}"
                )
            if self.trust_bundle is not None or self.insecure_bootstrap:
                raise ConfigError(
                    "trust_bundle_url: give one of trust_bundle, trust_bundle_url and "
                    "insecure_bootstrap"
                )
        if self.trust_bundle_format not in ("pem", "spiffe"):
            raise ConfigError(
                f"trust_bundle_format: {self.trust_bundle_format!r} is not one of pem, spiffe"
            )
        for name, allowed in (("log_level", LOG_LEVELS), ("log_format", LOG_FORMATS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"{name}: {getattr(self, name)!r} is not one of {', '.join(allowed)}"
                )
        if self.svid_cache_max_size < 1:
            raise ConfigError(
                f"svid_cache_max_size: must be at least 1, got {self.svid_cache_max_size}"
            )
        if not 0 < self.sync_backoff_min <= self.sync_backoff_max:
            raise ConfigError(
                "sync_backoff_min/sync_backoff_max: expected 0 < min <= max, got "
                f"{self.sync_backoff_min} and {self.sync_backoff_max}"
            )
        if self.metrics_address:
            host, sep, port = self.metrics_address.rpartition(":")
            if not sep or not port.isdigit() or int(port) > 65535:
                raise ConfigError(
                    f"metrics_address: expected host:port, got {self.metrics_address!r}"
                )
        if not -20 <= self.nice <= 19:
            raise ConfigError(f"nice: expected -20 to 19, got {self.nice}")
        if self.svid_wait_timeout < 0:
            raise ConfigError(f"svid_wait_timeout: must be >= 0, got {self.svid_wait_timeout}")
        if self.join_token is not None:
            if not self.join_token.strip():
                raise ConfigError("join_token: is empty")
            if self.node_attestor.name != "join_token":
                raise ConfigError(
                    "join_token: only the join_token node attestor uses a join token; "
                    f"the config names [agent.node_attestor.{self.node_attestor.name}]"
                )


def _lower(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value.lower()


def _addresses(value: Any, key: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{key}: expected a list of host:port, got {value!r}")
    return tuple(v.strip() for v in value)


def _normalise(table: Mapping[str, Any]) -> dict[str, Any]:
    """Keys with ``_`` for ``-`` and aliases resolved."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        out[_ALIASES.get(name, name)] = value
    return out


def load_config(
    path: Path | None,
    overrides: Mapping[str, Any],
    *,
    node_attestors: Mapping[str, type[Any]] | None = None,
    workload_attestors: Mapping[str, type[Any]] | None = None,
) -> AgentConfig:
    """Defaults, then the TOML file at ``path`` (if any), then ``overrides`` (flags set).

    Overrides whose value is None (flag not given) are ignored; an empty tuple for
    ``server_addresses`` also counts as "not given". ``node_attestors`` and
    ``workload_attestors`` map plugin names to config classes (default: the catalogs).
    """
    if node_attestors is None:
        node_attestors = {name: p.config for name, p in NODE_ATTESTORS.items()}
    if workload_attestors is None:
        workload_attestors = {name: p.config for name, p in WORKLOAD_ATTESTORS.items()}
    values: dict[str, Any] = {}
    prefix = ""
    if path is not None:
        doc = read_toml(path)
        table = doc.get("agent", doc)
        if not isinstance(table, dict):
            raise ConfigError(f"config file {path}: [agent] must be a table")
        prefix = "agent." if "agent" in doc else ""
        values.update(_normalise(table))
    for key, value in _normalise(overrides).items():
        if value is None or (key == "server_addresses" and not value):
            continue
        if key in ("node_attestor", "workload_attestor"):
            raise ConfigError(f"{key}: plugin tables are set in the config file only")
        values[key] = value
    deprecations = []
    for key, (kind, plugin) in _MOVED.items():
        if key not in values:
            continue
        deprecations.append(
            f"{key} is deprecated: set it in [agent.{kind}.{plugin}]; the flat key and "
            f"--{key.replace('_', '-')} will be removed"
        )
        tables = values.get(kind)
        if tables is None:
            tables = {plugin: {}}
        if not isinstance(tables, Mapping) or plugin not in tables:
            raise ConfigError(
                f"{key}: moved to [agent.{kind}.{plugin}], but the config names no "
                f"{plugin} {kind.replace('_', ' ')}"
            )
        values[kind] = {**tables, plugin: {**(tables[plugin] or {}), key: values.pop(key)}}

    def node_attestor(tables: Any, key: str) -> PluginConfig:
        parsed = plugin_tables(tables, node_attestors, prefix + key)
        if len(parsed) != 1:
            got = ", ".join(parsed) or "none"
            raise ConfigError(
                f"{prefix}{key}: exactly one node attestor table is required, got {got}"
            )
        ((name, config),) = parsed.items()
        return PluginConfig(name, config)

    def workload_attestor(tables: Any, key: str) -> tuple[PluginConfig, ...]:
        parsed = plugin_tables(tables, workload_attestors, prefix + key)
        if not parsed:
            raise ConfigError(f"{prefix}{key}: at least one workload attestor table is required")
        return tuple(PluginConfig(name, config) for name, config in parsed.items())

    config = from_table(
        AgentConfig,
        values,
        convert={
            "server_addresses": _addresses,
            "log_level": _lower,
            "log_format": _lower,
            "node_attestor": node_attestor,
            "workload_attestor": workload_attestor,
            "deprecations": _not_a_setting,
        },
    )
    return replace(config, deprecations=tuple(deprecations)) if deprecations else config


def _not_a_setting(value: Any, key: str) -> Any:
    """``deprecations`` is filled by the loader, not by the user."""
    raise ConfigError(f"{key}: unknown setting")
