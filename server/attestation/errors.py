"""Errors raised by the server's node attestation plugins and their catalog.

::

    CredoError
    └── AttestationError                   the payload proves nothing: refuse the agent
        ├── UnknownNodeAttestor (also ValueError)
        │                                  no configured node attestor handles that type
        └── AttestationUnavailable         what the plugin checks the payload against (the
                                           Kubernetes API) did not answer: try again later

Messages are lower case and written for the agent's operator (they reach the agent). The
API layer maps these to gRPC status codes; nothing here knows about gRPC.
"""

from __future__ import annotations

from collections.abc import Iterable

from credo.errors import CredoError

__all__ = ["AttestationError", "AttestationUnavailable", "UnknownNodeAttestor"]


class AttestationError(CredoError):
    """The attestation data was refused; the message says why, for the agent's operator."""


class AttestationUnavailable(AttestationError):
    """The plugin could not check the payload now (its source of truth did not answer); the
    same payload may be accepted later."""


class UnknownNodeAttestor(AttestationError, ValueError):
    """No node attestor of this server handles attestation data of type ``kind``."""

    def __init__(self, kind: str, known: Iterable[str]) -> None:
        self.kind = kind
        self.known = tuple(sorted(known))
        super().__init__(
            f"unknown node attestor {kind!r}; this server supports: "
            f"{', '.join(self.known) or 'none'}"
        )
