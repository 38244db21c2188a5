"""Errors of the agent's SVID cache.

::

    CredoError
    └── CacheError
        └── JwtSvidUnavailable           the server could not be asked for a JWT-SVID

The Workload API handler maps these to gRPC status codes; nothing here does.
"""

from __future__ import annotations

from credo.errors import CredoError

__all__ = ["CacheError", "JwtSvidUnavailable"]


class CacheError(CredoError):
    """The SVID cache could not serve a request."""


class JwtSvidUnavailable(CacheError):
    """No JWT-SVID could be obtained from the server (unreachable or refused)."""
