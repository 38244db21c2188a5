"""``credo-server healthcheck``: ask the gRPC health service on the admin socket."""

from __future__ import annotations

import click
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.cli.client import channel_target, check_admin_socket, describe_rpc_error
from server.cli.errors import CliError
from server.cli.output import emit
from server.cli.params import admin_options

__all__ = ["healthcheck"]


@click.command()
@admin_options
@click.option("--timeout", type=float, default=5.0, show_default=True, help="Seconds to wait.")
def healthcheck(socket_path: str, output: str, timeout: float) -> None:
    """Check that the server is up and serving; exit 1 if not."""
    check_admin_socket(socket_path)
    with grpc.insecure_channel(channel_target(socket_path)) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError as exc:
            raise CliError(
                "server is unhealthy: " + describe_rpc_error(exc, socket_path, "health service")
            ) from None
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        raise CliError(f"server is unhealthy: status {status}")
    emit(output, {"healthy": True, "status": status}, "server is healthy")
