"""The admin API client: a gRPC channel to the server's Unix socket, and gRPC errors in words.

The admin endpoint trusts whoever can open its socket (filesystem permissions), so the
channel carries no credentials; every call declares the caller's uid and pid in its
metadata, which the server's audit trail records as the actor. Every call goes through
:meth:`AdminClient.call`, which turns a gRPC status into a
:class:`~server.cli.errors.CliError` a person can act on.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar

import grpc

from credo._paths import check_path_chain
from credo._proto.credo.server.v1 import admin_pb2_grpc
from server.audit.context import ADMIN_PID_KEY, ADMIN_UID_KEY
from server.cli.errors import CliError
from server.paths import default_admin_socket

__all__ = [
    "DEFAULT_SOCKET",
    "DEFAULT_TIMEOUT",
    "SOCKET_ENV",
    "AdminClient",
    "channel_target",
    "check_admin_socket",
    "describe_rpc_error",
]

DEFAULT_SOCKET = str(default_admin_socket())
"""``/run/credo-server/private/api.sock`` as root, else ``/tmp/credo-server-<uid>/...``."""
SOCKET_ENV = "CREDO_SERVER_SOCKET"
DEFAULT_TIMEOUT = 30.0

R = TypeVar("R")


def channel_target(socket_path: str) -> str:
    """The gRPC target for a Unix socket path (``unix:/abs/path`` or ``unix:rel/path``)."""
    return "unix:" + os.fspath(socket_path)


def cannot_connect(socket_path: str) -> str:
    """The message for a server that does not answer on ``socket_path``."""
    return f"cannot connect to the server at {socket_path}: is credo-server running?"


def describe_rpc_error(err: grpc.RpcError, socket_path: str, noun: str = "") -> str:
    """Say in words what a failed admin call means; ``noun`` names what was asked for."""
    code = err.code() if callable(getattr(err, "code", None)) else None
    details = (err.details() if callable(getattr(err, "details", None)) else None) or ""
    subject = noun or "object"
    if code == grpc.StatusCode.UNAVAILABLE:
        if "permission denied" in details.lower():
            return (
                f"cannot connect to the server at {socket_path}: permission denied "
                "(the admin socket is open only to the user running credo-server)"
            )
        return cannot_connect(socket_path)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"the server at {socket_path} did not answer in time"
    if code == grpc.StatusCode.NOT_FOUND:
        return f"{subject} not found: {details}" if details else f"{subject} not found"
    if code == grpc.StatusCode.ALREADY_EXISTS:
        return f"{subject} already exists: {details}" if details else f"{subject} already exists"
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return f"invalid request: {details}"
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return f"permission denied: {details}"
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return f"refused: {details}"
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return f"too many requests or request too large: {details}"
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return f"the server does not support this command: {details}"
    name = code.name.lower() if code is not None else "unknown"
    return f"server error ({name}): {details}" if details else f"server error ({name})"


class _DeclareCaller(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Add the caller's uid and pid to every call's metadata. The server names the admin
    actor by the connection's ``SO_PEERCRED`` and ignores these (kept for older servers)."""

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> Any:
        metadata = [
            *(client_call_details.metadata or ()),
            (ADMIN_UID_KEY, str(os.getuid())),
            (ADMIN_PID_KEY, str(os.getpid())),
        ]
        return continuation(client_call_details._replace(metadata=metadata), request)


def check_admin_socket(socket_path: str) -> None:
    """Refuse to dial an admin socket under a directory another user owns or may write to
    (:func:`~credo._paths.check_path_chain`): they could have put their own socket there."""
    check_path_chain(os.path.dirname(os.path.abspath(socket_path)), "admin socket directory")


class AdminClient:
    """Stubs for every admin service over one channel; use as a context manager."""

    def __init__(self, socket_path: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        check_admin_socket(socket_path)
        self._raw_channel = grpc.insecure_channel(channel_target(socket_path))
        self._channel = grpc.intercept_channel(self._raw_channel, _DeclareCaller())
        self.entries = admin_pb2_grpc.EntriesStub(self._channel)
        self.agents = admin_pb2_grpc.AgentsStub(self._channel)
        self.bundles = admin_pb2_grpc.BundlesStub(self._channel)
        self.svids = admin_pb2_grpc.SvidsStub(self._channel)
        self.authorities = admin_pb2_grpc.LocalAuthorityStub(self._channel)
        self.audit = admin_pb2_grpc.AuditStub(self._channel)
        self.delegation = admin_pb2_grpc.DelegationStub(self._channel)
        self.federation = admin_pb2_grpc.FederationStub(self._channel)

    @property
    def channel(self) -> grpc.Channel:
        return self._channel

    def call(self, method: Callable[..., R], request: Any, *, noun: str = "") -> R:
        """Call one unary method; a gRPC error becomes a one-line :class:`CliError`."""
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as err:
            raise CliError(describe_rpc_error(err, self.socket_path, noun)) from None

    def close(self) -> None:
        self._raw_channel.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
