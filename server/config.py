"""The signing server's configuration: defaults (SPIRE's), a TOML file, then flags.

Every scalar setting has the same name in the TOML file (``[server]`` table or top level)
and as a flag (``--x509-svid-ttl`` for ``x509_svid_ttl``). Durations are seconds or
``90s`` / ``10m`` / ``1h`` / ``1d``.

Tables are set in the file only (:data:`FILE_ONLY_SETTINGS`), except the settings in
:data:`TABLE_FLAGS` (``--http-bind-address`` sets ``[server.http] bind_address``)::

    [server.http]                         # the HTTP front end (see server.http.config)
    bind_address = "0.0.0.0:8443"
    dns_names = ["credo.example.com"]

    [server.node_attestor.join_token]     # one table per node attestor (see
                                          # server.attestation.catalog)
    [server.node_attestor.k8s_psat.clusters.prod]
    service_account_allow_list = ["credo:credo-agent"]

    [server.bundle_publisher.k8s_configmap]   # bundle publishers (see
    namespace = "credo"                       # server.bundle_publisher.catalog)
    name = "credo-bundle"

Without any ``[server.node_attestor.*]`` table, ``join_token`` is enabled, as it was
before plugin tables existed; without ``[server.bundle_publisher.*]`` tables no publisher
runs.

Reading the file and converting each value is :mod:`credo._config`'s job (shared with the
agent); this module declares the settings and checks how they fit together.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from credo._config import duration_field, from_table, read_toml
from credo._logging import LOG_FORMATS, LOG_LEVELS
from credo.errors import ConfigError
from credo.spiffe_id import TrustDomain
from server.attestation.catalog import DEFAULT_NODE_ATTESTORS, WHERE, parse_node_attestors
from server.bundle_publisher.catalog import parse_bundle_publishers
from server.delegation.config import DelegationConfig
from server.http.config import HttpConfig
from server.paths import default_admin_socket

__all__ = [
    "FILE_ONLY_SETTINGS",
    "KEY_TYPES",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "TABLE_FLAGS",
    "ConfigError",
    "ServerConfig",
    "load_config",
]

KEY_TYPES = ("ec-p256", "ec-p384", "rsa-2048")
_DURATIONS = (
    "ca_ttl",
    "x509_svid_ttl",
    "jwt_svid_ttl",
    "wit_svid_ttl",
    "agent_svid_ttl",
    "join_token_ttl",
    "join_token_max_ttl",
    "audit_checkpoint_interval",
    "crl_next_update",
)

FILE_ONLY_SETTINGS: Final = frozenset({"node_attestor", "bundle_publisher", "http", "delegation"})
"""Settings made of nested tables: config file only (but see :data:`TABLE_FLAGS`)."""

TABLE_FLAGS: Final = {"http_bind_address": ("http", "bind_address")}
"""Flags that set one key of a table: flag name -> (table, key)."""


def _default_signing_workers() -> int:
    return min(2, os.cpu_count() or 1)


def _default_node_attestors() -> dict[str, Any]:
    return dict(DEFAULT_NODE_ATTESTORS)


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``credo-server run`` needs; durations in seconds."""

    trust_domain: str = "example.org"
    data_dir: Path = Path("./.credo/server")
    bind_address: str = "0.0.0.0:8081"
    # /run/credo-server/private/api.sock as root, else /tmp/credo-server-<uid>/private/api.sock.
    admin_socket: Path = field(default_factory=default_admin_socket)
    # SQLAlchemy-style URL; "" means SQLite at <data_dir>/datastore.sqlite3.
    datastore: str = ""
    ca_ttl: int = duration_field(24 * 3600)
    x509_svid_ttl: int = duration_field(3600)
    jwt_svid_ttl: int = duration_field(300)
    # WIT-SVIDs (Workload Identity Tokens); the agent renews them at half-life.
    wit_svid_ttl: int = duration_field(3600)
    # 0 means "same as x509_svid_ttl", as in SPIRE.
    agent_svid_ttl: int = duration_field(0)
    ca_key_type: str = "ec-p256"
    jwt_key_type: str = "ec-p256"
    # The ``iss`` of every JWT-SVID and the OIDC discovery issuer (SPIRE's jwt_issuer); ""
    # signs tokens without ``iss``. An https URL, e.g. "https://oidc.example.org".
    jwt_issuer: str = ""
    # The bundle's spiffe_refresh_hint: how often federated servers (and agents fetching
    # trust_bundle_url) re-fetch it. 0: a tenth of ca_ttl, at most 5 minutes.
    bundle_refresh_hint: int = duration_field(0)
    upstream_ca_cert: Path | None = None
    upstream_ca_key: Path | None = None
    join_token_ttl: int = duration_field(600)
    # Longest lifetime `token generate --ttl` may ask for: a join token admits a node until
    # it is used, so it should not outlive the provisioning it is made for.
    join_token_max_ttl: int = duration_field(24 * 3600)
    # How far ahead each X.509 authority's CRL says its next update comes (RFC 5280
    # nextUpdate); CRLs are re-signed at half of it, and on every revocation.
    crl_next_update: int = duration_field(600)
    log_level: str = "info"
    log_format: str = "text"
    # "" disables the Prometheus endpoint.
    metrics_address: str = ""
    # Node attestations per second per source address; signing calls per second per agent.
    attestation_rate_limit: float = 1.0
    signing_rate_limit: float = 500.0
    # How often the audit trail's head is signed into it (a checkpoint), when it changed.
    audit_checkpoint_interval: int = duration_field(600)
    # How often the rotation loop looks at the CA and JWT key (seconds).
    rotation_check_interval: float = 5.0
    # Seconds of quiet after which an agent's sync stream carries a heartbeat; 0: never.
    sync_heartbeat_interval: float = 5.0
    # Processes that check CSRs and sign large X509-SVID batches; 0 signs in-process.
    signing_workers: int = field(default_factory=_default_signing_workers)
    # Refuse registration entries without an owner (the accountable person or team).
    require_entry_owner: bool = False
    # [server.node_attestor.<name>] tables: plugin name -> its config dataclass.
    node_attestor: Mapping[str, Any] = field(default_factory=_default_node_attestors)
    # [server.bundle_publisher.<name>] tables: plugin name -> its config dataclass.
    bundle_publisher: Mapping[str, Any] = field(default_factory=dict)
    # [server.http]: the HTTP front end (off unless bind_address is set).
    http: HttpConfig = field(default_factory=HttpConfig)
    # [server.delegation]: token exchange and its trusted subject issuers.
    delegation: DelegationConfig = field(default_factory=DelegationConfig)

    @property
    def datastore_url(self) -> str:
        if self.datastore:
            return self.datastore
        return f"sqlite:///{(self.data_dir / 'datastore.sqlite3').resolve()}"

    @property
    def effective_agent_svid_ttl(self) -> int:
        return self.agent_svid_ttl or self.x509_svid_ttl

    def validate(self) -> ServerConfig:
        """Raise :class:`ConfigError` naming the first bad setting; return self."""
        try:
            TrustDomain.parse(self.trust_domain)
        except ValueError as exc:
            raise ConfigError(f"trust_domain: {exc}") from None
        for name in _DURATIONS:
            if int(getattr(self, name)) < 0 or (
                name != "agent_svid_ttl" and getattr(self, name) == 0
            ):
                raise ConfigError(f"{name}: must be a positive duration, got {getattr(self, name)}")
        if self.x509_svid_ttl > self.ca_ttl:
            raise ConfigError(
                f"x509_svid_ttl ({self.x509_svid_ttl}s) must not exceed ca_ttl ({self.ca_ttl}s)"
            )
        if self.join_token_ttl > self.join_token_max_ttl:
            raise ConfigError(
                f"join_token_ttl ({self.join_token_ttl}s) must not exceed join_token_max_ttl "
                f"({self.join_token_max_ttl}s)"
            )
        for name, allowed in (
            ("ca_key_type", KEY_TYPES),
            ("jwt_key_type", KEY_TYPES),
            ("log_level", LOG_LEVELS),
            ("log_format", LOG_FORMATS),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"{name}: {getattr(self, name)!r} is not one of {', '.join(allowed)}"
                )
        if (self.upstream_ca_cert is None) != (self.upstream_ca_key is None):
            raise ConfigError("upstream_ca_cert and upstream_ca_key must be given together")
        host, sep, port = self.bind_address.rpartition(":")
        if not sep or not port.isdigit() or not host:
            raise ConfigError(f"bind_address: expected host:port, got {self.bind_address!r}")
        if self.jwt_issuer:
            _check_issuer(self.jwt_issuer)
        if self.attestation_rate_limit <= 0 or self.signing_rate_limit <= 0:
            raise ConfigError("rate limits must be positive")
        if not 0 <= self.sync_heartbeat_interval <= 3600:
            raise ConfigError(
                "sync_heartbeat_interval: expected 0 (no heartbeats) to 3600 seconds, got "
                f"{self.sync_heartbeat_interval}"
            )
        if not 0 <= self.signing_workers <= 64:
            raise ConfigError(
                f"signing_workers: expected 0 (sign in-process) to 64, got {self.signing_workers}"
            )
        if not self.node_attestor:
            raise ConfigError(f"{WHERE}: no node attestor configured")
        return self


def _check_issuer(issuer: str) -> None:
    """An OIDC issuer: an https URL with a host and no query or fragment (OpenID Connect
    Discovery 1.0, 2; relying parties build ``<issuer>/.well-known/openid-configuration``)."""
    parts = urlsplit(issuer)
    if parts.scheme != "https" or not parts.hostname:
        raise ConfigError(
            f"jwt_issuer: expected an https URL like https://oidc.example.org, got {issuer!r}"
        )
    if parts.query or parts.fragment or issuer.endswith("/") or parts.username is not None:
        raise ConfigError(
            f"jwt_issuer: {issuer!r} must have no query, fragment, user info or trailing '/'"
        )


_SETTINGS = frozenset(f.name for f in fields(ServerConfig))


def _server_table(path: Path) -> dict[str, Any]:
    """The ``[server]`` table of the file at ``path`` (or its top level), keys with ``_``."""
    doc = read_toml(path)
    table = doc.get("server", doc)
    if not isinstance(table, dict):
        raise ConfigError(f"config file {path}: [server] must be a table")
    values: dict[str, Any] = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in _SETTINGS:
            raise ConfigError(
                f"unknown setting {key!r} in config file {path}; expected one of: "
                f"{', '.join(sorted(_SETTINGS))}"
            )
        values[name] = value
    return values


def _node_attestors(value: Any, key: str) -> dict[str, Any]:
    return parse_node_attestors(value)


def _bundle_publishers(value: Any, key: str) -> dict[str, Any]:
    return parse_bundle_publishers(value)


def _http(value: Any, key: str) -> HttpConfig:
    if isinstance(value, HttpConfig):
        return value
    return from_table(HttpConfig, value, "server.http")


def _delegation(value: Any, key: str) -> DelegationConfig:
    if isinstance(value, DelegationConfig):
        return value
    return from_table(DelegationConfig, value, "server.delegation")


def load_config(path: Path | None, overrides: Mapping[str, Any]) -> ServerConfig:
    """Defaults, then the TOML file at ``path`` (if any), then ``overrides`` (flags set)."""
    values = _server_table(path) if path is not None else {}
    for key, value in overrides.items():
        if key in TABLE_FLAGS:
            if value is not None:
                table_name, table_key = TABLE_FLAGS[key]
                table = values.get(table_name) or {}
                if not isinstance(table, Mapping):
                    raise ConfigError(f"server.{table_name}: expected a table, got {table!r}")
                values[table_name] = {**table, table_key: value}
            continue
        if key in FILE_ONLY_SETTINGS:
            raise ConfigError(
                f"{key}: is set in the config file only ([server.{key}.<name>] tables)"
            )
        if value is not None:
            values[key] = value
    return from_table(
        ServerConfig,
        values,
        convert={
            "node_attestor": _node_attestors,
            "bundle_publisher": _bundle_publishers,
            "http": _http,
            "delegation": _delegation,
        },
    ).validate()
