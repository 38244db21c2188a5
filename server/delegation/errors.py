"""The token endpoint's refusals: the RFC 6749 / RFC 8693 error codes as exceptions.

::

    CredoError
     └── OAuthError(description)              error code, HTTP status
          ├── InvalidRequest                  invalid_request        400
          ├── InvalidClient                   invalid_client         401
          ├── InvalidGrant                    invalid_grant          400
          ├── UnauthorizedClient              unauthorized_client    400
          ├── UnsupportedGrantType            unsupported_grant_type 400
          ├── InvalidScope                    invalid_scope          400
          └── InvalidTarget                   invalid_target         400

The exchange raises them; only the HTTP edge (:mod:`server.delegation.routes`) turns them
into ``{"error": ..., "error_description": ...}``. A description says what was wrong and
what would be accepted, never a token.
"""

from __future__ import annotations

from typing import ClassVar

from credo.errors import CredoError

__all__ = [
    "InvalidClient",
    "InvalidGrant",
    "InvalidRequest",
    "InvalidScope",
    "InvalidTarget",
    "OAuthError",
    "UnauthorizedClient",
    "UnsupportedGrantType",
]


class OAuthError(CredoError):
    """A refused token request; ``error`` is the RFC code, ``status`` the HTTP status."""

    error: ClassVar[str] = "invalid_request"
    status: ClassVar[int] = 400

    def __init__(self, description: str) -> None:
        super().__init__(description)
        self.description = description


class InvalidRequest(OAuthError):
    error = "invalid_request"


class InvalidClient(OAuthError):
    error = "invalid_client"
    status = 401


class InvalidGrant(OAuthError):
    error = "invalid_grant"


class UnauthorizedClient(OAuthError):
    error = "unauthorized_client"


class UnsupportedGrantType(OAuthError):
    error = "unsupported_grant_type"


class InvalidScope(OAuthError):
    error = "invalid_scope"


class InvalidTarget(OAuthError):
    error = "invalid_target"
