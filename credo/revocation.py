"""Revocation lists a resource server can check JWT-SVIDs against without a round trip.

The signing server serves a signed list of every revoked, unexpired JWT-SVID ``jti`` of
its trust domain at ``GET /jwt-revocations`` on its HTTP front end. The list is itself a
JWT signed with the trust domain's JWT key (so the JWT bundle a verifier already has
checks it): ``sub`` is the trust domain's ID, ``aud`` is
:data:`REVOCATION_LIST_AUDIENCE`, ``exp`` a minute ahead, and the claim ``revoked`` holds
``[{"jti": ..., "exp": ...}, ...]``. A verifier polls it (well within its ``exp``) and
passes it to :meth:`credo.JwtSvid.parse_and_validate` as ``revoked=``::

    revoked = JwtRevocationList.fetch("https://credo.example.org/jwt-revocations", bundles)
    svid = JwtSvid.parse_and_validate(token, bundles, ["my-api"], revoked=revoked)
"""

from __future__ import annotations

import ssl
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from credo.bundle import BundleSet, JwtBundle
from credo.errors import InvalidJwtSvid
from credo.jwtsvid import JwtSvid

__all__ = ["REVOCATION_LIST_AUDIENCE", "REVOCATION_LIST_PATH", "JwtRevocationList"]

REVOCATION_LIST_AUDIENCE: Final = "credo-jwt-revocation-list"
"""The ``aud`` of a signed JWT revocation list (no JWT-SVID is issued for it)."""
REVOCATION_LIST_PATH: Final = "/jwt-revocations"
"""Where the server's HTTP front end serves the list."""
_MAX_BYTES: Final = 16 * 1024 * 1024


@dataclass(frozen=True)
class JwtRevocationList:
    """The revoked ``jti`` values of one trust domain, as of ``issued_at``; usable (as the
    ``revoked=`` container of ``parse_and_validate``) until ``expires_at``."""

    trust_domain: str
    revoked: frozenset[str]
    issued_at: datetime
    expires_at: datetime

    def __contains__(self, jti: object) -> bool:
        return jti in self.revoked

    @classmethod
    def parse(
        cls, token: str, bundles: JwtBundle | BundleSet, *, now: datetime | None = None
    ) -> JwtRevocationList:
        """Verify a signed list with the trust domain's JWT bundle; raise a JwtSvidError."""
        signed = JwtSvid.parse_and_validate(token, bundles, [REVOCATION_LIST_AUDIENCE], now=now)
        if signed.spiffe_id.path:
            raise InvalidJwtSvid("a revocation list is signed for the trust domain's own ID")
        items = signed.claims.get("revoked")
        if not isinstance(items, list) or not all(
            isinstance(i, dict) and isinstance(i.get("jti"), str) for i in items
        ):
            raise InvalidJwtSvid("'revoked' must be a list of {'jti': ..., 'exp': ...}")
        return cls(
            trust_domain=signed.spiffe_id.trust_domain.name,
            revoked=frozenset(i["jti"] for i in items),
            issued_at=signed.issued_at or datetime.fromtimestamp(0, UTC),
            expires_at=signed.expires_at,
        )

    @classmethod
    def fetch(
        cls,
        url: str,
        bundles: JwtBundle | BundleSet,
        *,
        context: ssl.SSLContext | None = None,
        timeout: float = 10.0,
    ) -> JwtRevocationList:
        """GET the signed list at ``url`` and verify it (``OSError`` if unreachable)."""
        with urllib.request.urlopen(url, context=context, timeout=timeout) as response:
            body = response.read(_MAX_BYTES + 1)
        if len(body) > _MAX_BYTES:
            raise InvalidJwtSvid("revocation list is too large")
        return cls.parse(body.decode("ascii", "replace").strip(), bundles)
