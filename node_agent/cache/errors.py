"""Errors of the agent's SVID cache.

::

    CredoError
    └── CacheError
        ├── JwtSvidUnavailable           the server could not be asked for a JWT-SVID
        │   └── JwtSvidRateLimited       the server said: not now (rate limited)
        ├── JwtSvidRefused               the server refused the request (code, reason)
        └── WitSvidUnavailable           no WIT-SVID could be had (server unreachable, refused)

The Workload API handler maps these to gRPC status codes; nothing here does.
"""

from __future__ import annotations

from credo.errors import CredoError

__all__ = [
    "CacheError",
    "JwtSvidRateLimited",
    "JwtSvidRefused",
    "JwtSvidUnavailable",
    "WitSvidUnavailable",
]


class CacheError(CredoError):
    """The SVID cache could not serve a request."""


class JwtSvidUnavailable(CacheError):
    """No JWT-SVID could be obtained from the server now (unreachable, or rate limited)."""


class JwtSvidRateLimited(JwtSvidUnavailable):
    """The server rate-limited the JWT-SVID request; the same request may succeed later."""


class JwtSvidRefused(CacheError):
    """The server refused to sign a JWT-SVID for this request.

    ``code`` is the server's status name (``"INVALID_ARGUMENT"``), ``reason`` its words.
    """

    def __init__(self, spiffe_id: str, code: str, reason: str) -> None:
        self.spiffe_id = spiffe_id
        self.code = code
        self.reason = reason
        super().__init__(f"the server refused a JWT-SVID for {spiffe_id}: {reason}")


class WitSvidUnavailable(CacheError):
    """No WIT-SVID could be obtained for a workload now (server unreachable or refusing)."""
