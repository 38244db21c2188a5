"""The agent's admin socket: gRPC health, for ``credo-agent healthcheck`` and probes.

:class:`AdminServer` serves the standard ``grpc.health.v1.Health`` service on a Unix
socket in a private directory (0700); :func:`check_health` is the client side the CLI
uses. Both live here, beside the Workload API server, so that gRPC stays behind the two
edges of the agent: this package and :mod:`node_agent.server_client`.

Every ``Check`` looks, at that moment (as SPIRE's agent does):

* **live** (service ``""`` or ``"live"``): the Workload API answers a real call made the
  way a workload makes it. The agent dials its own public socket and calls
  ``FetchJWTSVID`` without an audience: that passes the relay, the internal socket, the
  security header check and the attestation of the agent's own process, and must come
  back as the Workload API's INVALID_ARGUMENT. Anything else (the socket gone, the
  internal socket directory removed, attestation failing) is NOT_SERVING.
* **ready** (service ``"ready"``): live, and the agent can hand out identities: its first
  entry sync has completed and its agent SVID has not expired. An agent that lost its
  server keeps serving what it has cached and stays ready.

A NOT_SERVING answer carries the reason in the trailing metadata key
:data:`REASON_KEY`, which the CLI prints.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from credo._proto import workload_pb2, workload_pb2_grpc
from credo.errors import CredoError
from node_agent.workload_api.handler import SECURITY_HEADER
from node_agent.workload_api.server import check_socket_directory

__all__ = [
    "LIVE",
    "READY",
    "REASON_KEY",
    "AdminServer",
    "AgentUnhealthy",
    "check_health",
    "probe_workload_api",
]

log = logging.getLogger(__name__)

LIVE: Final = "live"
READY: Final = "ready"
REASON_KEY: Final = "credo-health-reason"
"""Trailing metadata key of a NOT_SERVING answer: why."""

_PROBE_TIMEOUT = 3.0


class AgentUnhealthy(CredoError):
    """The agent's admin socket did not answer, or said it is not serving."""


async def probe_workload_api(socket_path: Path, timeout: float = _PROBE_TIMEOUT) -> str | None:
    """Call the Workload API on ``socket_path`` as a workload would; None if it answered
    as it should, else what went wrong (see the module docstring)."""
    target = f"unix:{os.path.abspath(socket_path)}"
    async with grpc.aio.insecure_channel(target) as channel:
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
        try:
            await stub.FetchJWTSVID(
                workload_pb2.JWTSVIDRequest(),
                metadata=((SECURITY_HEADER, "true"),),
                timeout=timeout,
            )
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.INVALID_ARGUMENT:
                return None
            details = " ".join((err.details() or "").split())
            return f"the Workload API on {socket_path} failed a call: {err.code().name}: {details}"
    return f"the Workload API on {socket_path} answered a request it must refuse"


class _AgentHealth(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """``Check`` runs the live (and ready) checks; see the module docstring."""

    def __init__(self, socket_path: Path, not_ready: Callable[[], str | None]) -> None:
        self._socket_path = socket_path
        self._not_ready = not_ready

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthCheckResponse:
        if request.service not in ("", LIVE, READY):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        problem = await probe_workload_api(self._socket_path)
        if problem is None and request.service == READY:
            problem = self._not_ready()
        if problem is None:
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)
        log.warning(
            "health check failed", extra={"check": request.service or LIVE, "reason": problem}
        )
        context.set_trailing_metadata(((REASON_KEY, problem),))
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.NOT_SERVING)


class AdminServer:
    """gRPC health on the private admin Unix socket (directory 0700).

    ``socket_path`` is the public Workload API socket the live check calls;
    ``not_ready`` says why the agent is not ready (None: it is).
    """

    def __init__(self, path: Path, socket_path: Path, not_ready: Callable[[], str | None]) -> None:
        self.path = path
        self.health = _AgentHealth(socket_path, not_ready)
        self._server: grpc.aio.Server | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        check_socket_directory(str(self.path.parent))
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if server.add_insecure_port(f"unix:{self.path.resolve()}") == 0:
            raise OSError(f"cannot listen on admin socket {self.path}")
        await server.start()
        self._server = server

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(1.0)
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _unreachable(path: Path) -> str | None:
    """Why the admin socket cannot be opened (one line), or None when it can."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(2.0)
        probe.connect(str(path))
    except PermissionError:
        return (
            f"permission denied opening the agent's admin socket {path}: run the healthcheck "
            "as the agent's user or root"
        )
    except FileNotFoundError:
        return f"no admin socket at {path}: is credo-agent running?"
    except ConnectionRefusedError:
        return f"nothing listens on the admin socket {path}: is credo-agent running?"
    except OSError as err:
        return f"cannot open the agent's admin socket {path}: {err.strerror or err}"
    finally:
        probe.close()
    return None


def check_health(admin_socket: str, timeout: float, *, ready: bool = False) -> None:
    """Return if the agent on ``admin_socket`` is live (``ready``: and ready); else raise
    :class:`AgentUnhealthy` saying why in one line."""
    path = Path(admin_socket).expanduser().absolute()
    why = _unreachable(path)
    if why is not None:
        raise AgentUnhealthy(f"agent is unhealthy: {why}")
    with grpc.insecure_channel(f"unix://{path}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply, call = stub.Check.with_call(
                health_pb2.HealthCheckRequest(service=READY if ready else LIVE), timeout=timeout
            )
        except grpc.RpcError as exc:
            code = exc.code().name if hasattr(exc, "code") else "UNKNOWN"
            raise AgentUnhealthy(
                f"agent is unhealthy: its admin socket {admin_socket} did not answer ({code})"
            ) from None
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        reasons = [v for k, v in call.trailing_metadata() or () if k == REASON_KEY]
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        raise AgentUnhealthy(
            f"agent is {'not ready' if ready else 'unhealthy'}: "
            + (str(reasons[0]) if reasons else f"status {status}")
        )
