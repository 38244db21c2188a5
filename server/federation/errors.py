"""Federation errors.

::

    CredoError
     └── FederationError             one-line reason
         ├── InvalidRelationship     a relationship's fields do not fit together
         └── BundleFetchFailed       the endpoint could not be reached, refused, or sent
                                     something that is not this trust domain's bundle
"""

from __future__ import annotations

from credo.errors import CredoError

__all__ = ["BundleFetchFailed", "FederationError", "InvalidRelationship"]


class FederationError(CredoError):
    """Root of the federation errors."""


class InvalidRelationship(FederationError, ValueError):
    """A federation relationship that cannot work; ``field`` names what is wrong."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class BundleFetchFailed(FederationError):
    """Fetching a federated bundle failed; the last good bundle stays."""
