"""The one place where domain errors become gRPC status codes.

======================================  ===================
error                                   status
======================================  ===================
:class:`ApiError`                       its own code
datastore ``NotFound``                  NOT_FOUND
datastore ``AlreadyExists``             ALREADY_EXISTS
CA ``AuthorityNotFound``                NOT_FOUND
other ``CaError`` (wrong state, ...)    FAILED_PRECONDITION
``AttestationError``                    PERMISSION_DENIED
``ValueError`` (invalid input)          INVALID_ARGUMENT
other ``DataStoreError``                UNAVAILABLE
======================================  ===================

Anything else is a bug: it propagates and gRPC answers UNKNOWN (and logs it).
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc

from server.attestation import AttestationError
from server.ca.errors import AuthorityNotFound, CaError
from server.datastore.errors import AlreadyExists, DataStoreError, NotFound

__all__ = ["ApiError", "abort", "handle_errors", "handle_stream_errors", "status_for"]

_R = TypeVar("_R")


class ApiError(Exception):
    """Raised inside a handler to end the call with ``code`` and ``message``."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(message)


_MAPPED = (ApiError, DataStoreError, CaError, AttestationError, ValueError)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message for a domain error (see the module table)."""
    if isinstance(exc, ApiError):
        return exc.code, exc.message
    if isinstance(exc, NotFound | AuthorityNotFound):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, AlreadyExists):
        return grpc.StatusCode.ALREADY_EXISTS, str(exc)
    if isinstance(exc, CaError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, AttestationError):
        return grpc.StatusCode.PERMISSION_DENIED, str(exc)
    if isinstance(exc, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, DataStoreError):
        return grpc.StatusCode.UNAVAILABLE, f"datastore unavailable: {exc}"
    raise TypeError(f"no status mapping for {type(exc).__name__}") from exc


async def abort(context: grpc.aio.ServicerContext, exc: BaseException) -> NoReturn:
    code, message = status_for(exc)
    await context.abort(code, message)
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
