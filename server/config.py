"""The signing server's configuration: defaults (SPIRE's), a TOML file, then flags.

Every setting has the same name in the TOML file (``[server]`` table or top level)
and as a flag (``--x509-svid-ttl`` for ``x509_svid_ttl``). Durations are seconds or
``90s`` / ``10m`` / ``1h`` / ``1d``.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from credo._logging import LOG_FORMATS, LOG_LEVELS
from credo.durations import parse_duration
from credo.errors import CredoError
from credo.spiffe_id import TrustDomain

__all__ = ["KEY_TYPES", "LOG_FORMATS", "LOG_LEVELS", "ConfigError", "ServerConfig", "load_config"]

KEY_TYPES = ("ec-p256", "ec-p384", "rsa-2048")
_DURATIONS = ("ca_ttl", "x509_svid_ttl", "jwt_svid_ttl", "agent_svid_ttl", "join_token_ttl")


def _default_signing_workers() -> int:
    return min(2, os.cpu_count() or 1)


class ConfigError(CredoError, ValueError):
    """A setting is missing, unknown or out of range; the message names it."""


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``credo-server run`` needs; durations in seconds."""

    trust_domain: str = "example.org"
    data_dir: Path = Path("./.credo/server")
    bind_address: str = "0.0.0.0:8081"
    admin_socket: Path = Path("/tmp/credo-server/private/api.sock")
    # SQLAlchemy-style URL; "" means SQLite at <data_dir>/datastore.sqlite3.
    datastore: str = ""
    ca_ttl: int = 24 * 3600
    x509_svid_ttl: int = 3600
    jwt_svid_ttl: int = 300
    # 0 means "same as x509_svid_ttl", as in SPIRE.
    agent_svid_ttl: int = 0
    ca_key_type: str = "ec-p256"
    jwt_key_type: str = "ec-p256"
    upstream_ca_cert: Path | None = None
    upstream_ca_key: Path | None = None
    join_token_ttl: int = 600
    log_level: str = "info"
    log_format: str = "text"
    # "" disables the Prometheus endpoint.
    metrics_address: str = ""
    # Node attestations per second per source address; signing calls per second per agent.
    attestation_rate_limit: float = 1.0
    signing_rate_limit: float = 500.0
    # How often the rotation loop looks at the CA and JWT key (seconds).
    rotation_check_interval: float = 5.0
    # Processes that check CSRs and sign large X509-SVID batches; 0 signs in-process.
    signing_workers: int = field(default_factory=_default_signing_workers)

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
        if self.attestation_rate_limit <= 0 or self.signing_rate_limit <= 0:
            raise ConfigError("rate limits must be positive")
        if not 0 <= self.signing_workers <= 64:
            raise ConfigError(
                f"signing_workers: expected 0 (sign in-process) to 64, got {self.signing_workers}"
            )
        return self


def _coerce(name: str, value: Any) -> Any:
    kinds = {f.name: f.type for f in dataclasses.fields(ServerConfig)}
    if name not in kinds:
        raise ConfigError(f"unknown setting {name!r}")
    if name in _DURATIONS:
        try:
            return parse_duration(value)
        except ValueError as exc:
            raise ConfigError(f"{name}: {exc}") from None
    kind = str(kinds[name])
    if "Path" in kind:
        return None if value in (None, "") else Path(value)
    if kind == "int":
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected an integer, got {value!r}") from None
    if kind == "float":
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected a number, got {value!r}") from None
    return str(value)


def load_config(path: Path | None, overrides: Mapping[str, Any]) -> ServerConfig:
    """Defaults, then the TOML file at ``path`` (if any), then ``overrides`` (flags set)."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            doc = tomllib.loads(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        table = doc.get("server", doc)
        for key, value in table.items():
            values[key.replace("-", "_")] = _coerce(key.replace("-", "_"), value)
    for key, value in overrides.items():
        if value is not None:
            values[key] = _coerce(key, value)
    return ServerConfig(**values).validate()
