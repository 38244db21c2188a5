"""The agent's admin socket: gRPC health, for ``credo-agent healthcheck`` and probes.

:class:`AdminServer` serves the standard ``grpc.health.v1.Health`` service on a Unix
socket in a private directory (0700); :func:`check_health` is the client side the CLI
uses. Both live here, beside the Workload API server, so that gRPC stays behind the two
edges of the agent: this package and :mod:`node_agent.server_client`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from credo.errors import CredoError
from node_agent.workload_api.server import check_socket_directory

__all__ = ["AdminServer", "AgentUnhealthy", "check_health"]


class AgentUnhealthy(CredoError):
    """The agent's admin socket did not answer, or said it is not serving."""


class AdminServer:
    """gRPC health on the private admin Unix socket (directory 0700)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        check_socket_directory(str(self.path.parent))
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if server.add_insecure_port(f"unix://{self.path.resolve()}") == 0:
            raise OSError(f"cannot listen on admin socket {self.path}")
        await server.start()
        self._server = server
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)

    async def stop(self) -> None:
        if self._server is not None:
            await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
            await self._server.stop(1.0)
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def check_health(admin_socket: str, timeout: float) -> None:
    """Return if the agent on ``admin_socket`` says SERVING; else :class:`AgentUnhealthy`."""
    target = f"unix://{Path(admin_socket).expanduser().resolve()}"
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code().name if hasattr(exc, "code") else "UNKNOWN"
            raise AgentUnhealthy(
                f"agent is unhealthy: cannot reach its admin socket {admin_socket} ({code})"
            ) from None
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        raise AgentUnhealthy(f"agent is unhealthy: status {status}")
