"""The node agent's configuration: defaults (SPIRE's), a TOML file, then flags.

Every setting has the same name in the TOML file (``[agent]`` table or top level) and
as a flag (``--data-dir`` for ``data_dir``). Durations are seconds or ``90s`` / ``10m``.
``server_address`` (one string) and ``server_addresses`` (a list) are both accepted; the
agent fails over between the addresses in order.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from credo._logging import LOG_FORMATS, LOG_LEVELS
from credo.errors import CredoError
from credo.spiffe_id import TrustDomain

__all__ = ["LOG_FORMATS", "LOG_LEVELS", "AgentConfig", "ConfigError", "load_config"]


_PATHS = ("trust_bundle", "socket_path", "admin_socket", "data_dir")
_FLOATS = ("sync_backoff_min", "sync_backoff_max", "svid_wait_timeout")
_INTS = ("svid_cache_max_size", "workload_size_limit")
# Aliases users may write in TOML (the flag spellings).
_ALIASES = {
    "socket": "socket_path",
    "server_address": "server_addresses",
    "svid_cache_size": "svid_cache_max_size",
}


class ConfigError(CredoError, ValueError):
    """A setting is missing, unknown or out of range; the message names it."""


@dataclass(frozen=True)
class AgentConfig:
    """Everything ``credo-agent run`` needs; durations in seconds."""

    # host:port of each signing server; the agent fails over between them in order.
    server_addresses: tuple[str, ...] = ()
    trust_domain: str = "example.org"
    # PEM bootstrap bundle (``credo-server bundle show --format pem``).
    trust_bundle: Path | None = None
    # Skip server verification for the first attestation only (warns loudly).
    insecure_bootstrap: bool = False
    join_token: str | None = None
    socket_path: Path = Path("/tmp/credo-agent/public/api.sock")
    admin_socket: Path = Path("/tmp/credo-agent/private/admin.sock")
    data_dir: Path = Path("./.credo/agent")
    log_level: str = "info"
    log_format: str = "text"
    # Soft bound on cached X509-SVIDs; identities of active subscriptions are always kept.
    svid_cache_max_size: int = 1000
    # unix:sha256 is computed only for binaries up to this many bytes; 0 = no limit,
    # negative = never hash (SPIRE's semantics).
    workload_size_limit: int = 64 * 1024 * 1024
    # Reconnect backoff of the sync stream: exponential with jitter between these bounds.
    sync_backoff_min: float = 0.2
    sync_backoff_max: float = 30.0
    # How long a new subscription waits for SVIDs of matching entries to be signed.
    svid_wait_timeout: float = 5.0

    @property
    def trust_domain_obj(self) -> TrustDomain:
        """The parsed trust domain."""
        return TrustDomain.parse(self.trust_domain)

    def validate(self) -> AgentConfig:
        """Raise :class:`ConfigError` naming the first bad setting; return self."""
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
        if self.svid_wait_timeout < 0:
            raise ConfigError(f"svid_wait_timeout: must be >= 0, got {self.svid_wait_timeout}")
        if self.join_token is not None and not self.join_token.strip():
            raise ConfigError("join_token: is empty")
        return self


def _coerce(name: str, value: Any) -> Any:
    """Convert a TOML or flag value for setting ``name`` to the field's type."""
    name = _ALIASES.get(name, name)
    if name not in {f.name for f in dataclasses.fields(AgentConfig)}:
        raise ConfigError(f"unknown setting {name!r}")
    if name == "server_addresses":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"server_addresses: expected a list of host:port, got {value!r}")
        return tuple(v.strip() for v in value)
    if name in _PATHS:
        return None if value in (None, "") else Path(value).expanduser()
    if name == "insecure_bootstrap":
        if not isinstance(value, bool):
            raise ConfigError(f"insecure_bootstrap: expected true or false, got {value!r}")
        return value
    if name in _INTS:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected an integer, got {value!r}") from None
    if name in _FLOATS:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected a number, got {value!r}") from None
    if name == "join_token":
        return None if value in (None, "") else str(value)
    if name in ("log_level", "log_format"):
        return str(value).lower()
    return str(value)


def load_config(path: Path | None, overrides: Mapping[str, Any]) -> AgentConfig:
    """Defaults, then the TOML file at ``path`` (if any), then ``overrides`` (flags set).

    Overrides whose value is None (flag not given) are ignored; an empty tuple for
    ``server_addresses`` also counts as "not given".
    """
    values: dict[str, Any] = {}
    if path is not None:
        try:
            doc = tomllib.loads(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        table = doc.get("agent", doc)
        if not isinstance(table, dict):
            raise ConfigError(f"config file {path}: [agent] must be a table")
        for key, value in table.items():
            name = _ALIASES.get(key.replace("-", "_"), key.replace("-", "_"))
            values[name] = _coerce(name, value)
    for key, value in overrides.items():
        if value is None or (key in ("server_addresses", "server_address") and not value):
            continue
        name = _ALIASES.get(key, key)
        values[name] = _coerce(name, value)
    return AgentConfig(**values).validate()
