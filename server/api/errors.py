"""The one place where domain errors become gRPC status codes (and refusal codes).

======================================  ===================  =======================
error                                   status               ``credo-refusal``
======================================  ===================  =======================
:class:`ApiError`                       its own code         its own (or none)
agent ``NoAgentSvid``                   UNAUTHENTICATED      ``no_agent_svid``
agent ``AgentSvidExpired``              UNAUTHENTICATED      ``svid_expired``
agent ``UntrustedAuthority``            UNAUTHENTICATED      ``untrusted_authority``
agent ``RateLimited``                   RESOURCE_EXHAUSTED   ``rate_limited``
other ``AgentRefused`` (banned,         PERMISSION_DENIED    its ``reason``
evicted, not current, not authorized,
not an agent, may not re-attest)
``UnknownNodeAttestor``                 INVALID_ARGUMENT     ``attestation_refused``
``AttestationUnavailable``              UNAVAILABLE          ``attestation_refused``
other ``AttestationError``              PERMISSION_DENIED    ``attestation_refused``
``ServerStopping``                      UNAVAILABLE
datastore ``NotFound``                  NOT_FOUND
datastore ``AlreadyExists``             ALREADY_EXISTS
CA ``AuthorityNotFound``                NOT_FOUND
other ``CaError`` (wrong state, ...)    FAILED_PRECONDITION
``ValueError`` (invalid input)          INVALID_ARGUMENT
other ``DataStoreError``                UNAVAILABLE
======================================  ===================  =======================

A refusal code goes in the call's trailing metadata under ``credo-refusal``
(:mod:`credo._protocol`, the contract agents read). Anything else is a bug: it propagates
and gRPC answers UNKNOWN (and logs it).
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc

from credo._protocol import REFUSAL_KEY, Refusal
from server.agents.errors import (
    AgentRefused,
    AgentSvidExpired,
    NoAgentSvid,
    RateLimited,
    ServerStopping,
    UntrustedAuthority,
)
from server.attestation.errors import (
    AttestationError,
    AttestationUnavailable,
    UnknownNodeAttestor,
)
from server.ca.errors import AuthorityNotFound, CaError
from server.datastore.errors import AlreadyExists, DataStoreError, NotFound

__all__ = [
    "ApiError",
    "abort",
    "handle_errors",
    "handle_stream_errors",
    "refusal_for",
    "status_for",
]

_R = TypeVar("_R")


class ApiError(Exception):
    """Raised inside a handler to end the call with ``code``, ``message`` and ``refusal``."""

    def __init__(self, code: grpc.StatusCode, message: str, refusal: Refusal | None = None) -> None:
        self.code = code
        self.message = message
        self.refusal = refusal
        super().__init__(message)


_MAPPED = (
    ApiError,
    AgentRefused,
    ServerStopping,
    DataStoreError,
    CaError,
    AttestationError,
    ValueError,
)
# First match wins: subclasses before their bases.
_STATUSES: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], grpc.StatusCode], ...]
_STATUSES = (
    ((NoAgentSvid, AgentSvidExpired, UntrustedAuthority), grpc.StatusCode.UNAUTHENTICATED),
    (RateLimited, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (AgentRefused, grpc.StatusCode.PERMISSION_DENIED),
    (UnknownNodeAttestor, grpc.StatusCode.INVALID_ARGUMENT),
    (AttestationUnavailable, grpc.StatusCode.UNAVAILABLE),
    (AttestationError, grpc.StatusCode.PERMISSION_DENIED),
    (ServerStopping, grpc.StatusCode.UNAVAILABLE),
    ((NotFound, AuthorityNotFound), grpc.StatusCode.NOT_FOUND),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (CaError, grpc.StatusCode.FAILED_PRECONDITION),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message for a domain error (see the module table)."""
    if isinstance(exc, ApiError):
        return exc.code, exc.message
    for kinds, code in _STATUSES:
        if isinstance(exc, kinds):
            return code, str(exc)
    if isinstance(exc, DataStoreError):
        return grpc.StatusCode.UNAVAILABLE, f"datastore unavailable: {exc}"
    raise TypeError(f"no status mapping for {type(exc).__name__}") from exc


def refusal_for(exc: BaseException) -> Refusal | None:
    """The ``credo-refusal`` code of a domain error; None when it is not a refusal."""
    if isinstance(exc, ApiError):
        return exc.refusal
    if isinstance(exc, AgentRefused):
        return exc.reason
    if isinstance(exc, AttestationError):
        return Refusal.ATTESTATION_REFUSED
    return None


async def abort(context: grpc.aio.ServicerContext, exc: BaseException) -> NoReturn:
    code, message = status_for(exc)
    refusal = refusal_for(exc)
    metadata = ((REFUSAL_KEY, refusal.value),) if refusal is not None else ()
    await context.abort(code, message, trailing_metadata=metadata)
    raise AssertionError("unreachable: context.abort raises")


def handle_errors(
    method: Callable[..., Awaitable[_R]],
) -> Callable[..., Awaitable[_R]]:
    """Wrap a unary handler ``(self, request, context)``: map domain errors to statuses."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> _R:
        try:
            return await method(self, request, context)
        except _MAPPED as exc:
            await abort(context, exc)

    return wrapper


def handle_stream_errors(
    method: Callable[..., AsyncIterator[_R]],
) -> Callable[..., AsyncIterator[_R]]:
    """Wrap a server-streaming handler: map domain errors to statuses."""

    @functools.wraps(method)
    async def wrapper(
        self: Any, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[_R]:
        try:
            async for item in method(self, request, context):
                yield item
        except _MAPPED as exc:
            await abort(context, exc)

    return wrapper
