"""``[server.delegation]``: token exchange settings and the people's identity providers.

::

    [server.delegation]
    issuer = "https://credo.example.com:8443"   # "iss" of the tokens Credo issues; default:
                                                # the HTTP front end's URL
    introspection_allowed = ["spiffe://example.org/resource/git"]   # who may call /introspect

    [server.delegation.issuers.corp]            # one table per trusted subject issuer
    issuer = "https://login.example.com"        # its "iss", exactly
    jwks_file = "/etc/credo/corp-jwks.json"     # or jwks_url, or neither: OIDC discovery
    audience = ["credo"]                        # the person's token must name one of these
    algorithms = ["RS256", "ES256"]
    clock_skew = "30s"

A person's token (an ID token or a JWT access token) must come from one of these issuers;
a delegation policy names the table (``--subject-issuer corp``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from credo._config import duration_field, named_tables_field
from credo.errors import ConfigError

__all__ = ["ALGORITHMS", "DelegationConfig", "SubjectIssuerConfig"]

ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512")


def _is_https_url(url: str) -> bool:
    return url.startswith("https://") and len(url) > len("https://")


@dataclass(frozen=True)
class SubjectIssuerConfig:
    """One ``[server.delegation.issuers.<name>]`` table."""

    issuer: str = ""
    jwks_file: Path | None = None
    jwks_url: str = ""
    audience: tuple[str, ...] = ()
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    clock_skew: int = duration_field(30)
    # Trust anchors (PEM) for jwks_url and discovery; default: the system's.
    ca_file: Path | None = None

    def validate(self) -> None:
        if not self.issuer:
            raise ConfigError("issuer: is required (the identity provider's 'iss')")
        if self.jwks_file is not None and self.jwks_url:
            raise ConfigError("jwks_file: give jwks_file or jwks_url, not both")
        if self.jwks_url and not self.jwks_url.startswith(("https://", "http://")):
            raise ConfigError(f"jwks_url: expected an https:// URL, got {self.jwks_url!r}")
        if self.jwks_file is None and not self.jwks_url and not _is_https_url(self.issuer):
            raise ConfigError(
                "issuer: OIDC discovery needs an https:// issuer; or set jwks_file / jwks_url"
            )
        if not self.audience:
            raise ConfigError("audience: is required (what the person's token is issued for)")
        if not self.algorithms:
            raise ConfigError("algorithms: at least one is required")
        for alg in self.algorithms:
            if alg not in ALGORITHMS:
                raise ConfigError(f"algorithms: {alg!r} is not one of {', '.join(ALGORITHMS)}")
        if self.clock_skew > 300:
            raise ConfigError("clock_skew: at most 5m")


@dataclass(frozen=True)
class DelegationConfig:
    """The ``[server.delegation]`` table."""

    issuer: str = ""
    introspection_allowed: tuple[str, ...] = ()
    issuers: Mapping[str, SubjectIssuerConfig] = named_tables_field(SubjectIssuerConfig)

    def validate(self) -> None:
        if self.issuer and not self.issuer.startswith(("https://", "http://")):
            raise ConfigError(f"issuer: expected an https:// URL, got {self.issuer!r}")
        for spiffe_id in self.introspection_allowed:
            if not spiffe_id.startswith("spiffe://"):
                raise ConfigError(f"introspection_allowed: {spiffe_id!r} is not a SPIFFE ID")
