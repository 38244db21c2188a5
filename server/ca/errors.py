"""Errors raised by the signing server's certificate authority and its rotation manager.

::

    CredoError
    └── CaError
        ├── AuthorityNotFound          no authority of that kind has that id
        ├── InvalidAuthorityState      the authority is not in the state the operation needs
        │                              (activate a non-prepared one, taint the active one,
        │                              revoke an untainted one, sign with no active CA)
        ├── UpstreamCaError            the upstream CA certificate or key is unusable
        └── PoolUnavailable            the signing worker pool cannot take this batch (not
                                       started, closed, a worker died): sign it in-process

Messages are lower-case, name the authority id, and say what was expected. The API
layer maps these to gRPC status codes; nothing here knows about gRPC.
"""

from __future__ import annotations

from credo.errors import CredoError

__all__ = [
    "AuthorityNotFound",
    "CaError",
    "InvalidAuthorityState",
    "PoolUnavailable",
    "UpstreamCaError",
]


class CaError(CredoError):
    """Root of every error the CA and the authority manager raise on purpose."""


class AuthorityNotFound(CaError):
    """No authority of ``kind`` has ``authority_id``."""

    def __init__(self, kind: str, authority_id: str) -> None:
        self.kind = kind
        self.authority_id = authority_id
        super().__init__(f"no {kind} authority with id {authority_id!r}")


class InvalidAuthorityState(CaError):
    """The authority is not in the state the requested operation needs."""

    def __init__(self, kind: str, authority_id: str, message: str) -> None:
        self.kind = kind
        self.authority_id = authority_id
        super().__init__(message)


class UpstreamCaError(CaError):
    """The upstream CA certificate or key cannot be used to sign the intermediate CA."""


class PoolUnavailable(CaError):
    """The signing worker pool cannot sign this batch (not started, closed, or a worker died).

    Never reaches a caller: the issuer signs the batch in-process instead.
    """
