"""The Workload API server: a ``grpc.aio`` server behind the peer-tracking relay.

Workloads connect to ``socket_path`` (directory 0755, socket 0777: any local process may
call — who it is, the kernel tells). The gRPC server itself listens on a socket in a
private 0700 directory and is reached only through
:class:`~node_agent.workload.tracker.PeerTrackingProxy`, which is how the handler learns
each caller's pid (see that module for why).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from grpc import aio

from credo._paths import check_path_chain
from credo._proto import workload_pb2_grpc
from node_agent.audit_log import DeliveryLog
from node_agent.paths import default_workload_socket
from node_agent.workload.attestor import WorkloadAttestor
from node_agent.workload.tracker import PeerTrackingProxy
from node_agent.workload_api.handler import WorkloadApiMetrics, WorkloadApiServicer
from node_agent.workload_api.manager import Manager

__all__ = [
    "DEFAULT_SOCKET_PATH",
    "WorkloadApiServer",
    "WorkloadApiServerConfig",
    "check_socket_directory",
]

log = logging.getLogger(__name__)

DEFAULT_SOCKET_PATH = str(default_workload_socket())


@dataclass(frozen=True)
class WorkloadApiServerConfig:
    """Where to serve: the public socket path, and optionally the private relay directory.

    ``private_dir`` (default: a fresh 0700 temp directory) holds the internal gRPC socket;
    keep its path short, Unix socket paths are limited to 107 bytes.
    """

    socket_path: str = DEFAULT_SOCKET_PATH
    private_dir: str | None = None
    allow_unauthenticated_verifiers: bool = False


def check_socket_directory(directory: str) -> None:
    """Refuse a socket directory another local user could tamper with.

    The default lives under ``/tmp``: a user who created ``/tmp/credo-agent`` (or
    ``public``) first, or owns any directory on the way, could later swap ``api.sock`` for
    a socket of their own and serve every workload forged bundles (and collect the JWT-SVIDs
    sent to ``ValidateJWTSVID``). Every component of the path must be owned by root or by
    the agent's user, and a directory others may write to must be sticky (like ``/tmp``).
    """
    check_path_chain(directory, "socket directory", skip_leaf_mode=True)


class WorkloadApiServer:
    """Serves the SPIFFE Workload API on a Unix socket; ``start()`` then ``stop()``."""

    def __init__(
        self,
        config: WorkloadApiServerConfig,
        manager: Manager,
        attestor: WorkloadAttestor,
        *,
        metrics: WorkloadApiMetrics | None = None,
        delivery_log: DeliveryLog | None = None,
    ) -> None:
        self._delivery_log = delivery_log
        self.config = config
        self._manager = manager
        self._attestor = attestor
        self._metrics = metrics
        self._proxy: PeerTrackingProxy | None = None
        self._server: aio.Server | None = None
        self._servicer: WorkloadApiServicer | None = None

    @property
    def servicer(self) -> WorkloadApiServicer | None:
        """The handler while serving (None before :meth:`start` and after :meth:`stop`)."""
        return self._servicer

    async def start(self) -> None:
        """Create the socket directory (0755), remove a stale socket, and start serving."""
        directory = os.path.dirname(os.path.abspath(self.config.socket_path))
        os.makedirs(directory, mode=0o755, exist_ok=True)
        check_socket_directory(directory)
        os.chmod(directory, 0o755)
        proxy = PeerTrackingProxy(self.config.socket_path, self.config.private_dir)
        server = aio.server()
        servicer = WorkloadApiServicer(
            self._manager,
            self._attestor,
            proxy,
            allow_unauthenticated_verifiers=self.config.allow_unauthenticated_verifiers,
            metrics=self._metrics,
            delivery_log=self._delivery_log,
        )
        workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(servicer, server)
        if server.add_insecure_port(proxy.internal_address) == 0:
            raise OSError(f"cannot listen on {proxy.internal_address}")
        await server.start()
        try:
            await proxy.start()
        except BaseException:
            await server.stop(None)
            await proxy.stop()
            servicer.close()
            raise
        self._proxy, self._server, self._servicer = proxy, server, servicer
        log.info("workload API started", extra={"socket": self.config.socket_path})

    async def stop(self, grace: float | None = 5.0) -> None:
        """Stop accepting, let calls finish for ``grace`` seconds, then close everything."""
        proxy, server, servicer = self._proxy, self._server, self._servicer
        self._proxy = self._server = self._servicer = None
        if proxy is not None:
            proxy.stop_accepting()
        if server is not None:
            await server.stop(grace)
        if proxy is not None:
            await proxy.stop()
        if servicer is not None:
            servicer.close()
        log.info("workload API stopped", extra={"socket": self.config.socket_path})
