"""The node agent process: builds every component from config, in order, and runs them.

Order (nothing else constructs these):

1. :class:`~node_agent.attestation.session.AgentSession` — resume with the stored agent
   SVID or attest with the join token; mTLS channels to the servers;
2. :class:`~node_agent.cache.manager.CacheManager` — the SVID cache (the Workload API's
   ``Manager``), seeded with the stored trust bundle;
3. :class:`~node_agent.sync.syncer.EntrySyncer` — the entry stream, feeding the cache;
4. :class:`~node_agent.workload.unix.UnixAttestor` and
   :class:`~node_agent.workload_api.server.WorkloadApiServer` on the public socket;
5. the admin socket (gRPC health, for ``credo-agent healthcheck``).

The agent-SVID renewal loop, the sync stream and the cache's signing loop run side by
side under one :class:`asyncio.TaskGroup`. SIGTERM or SIGINT stops everything cleanly;
a ban by the server ends the agent with a non-zero exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from credo._logging import setup_logging
from credo.bundle import Bundle
from credo.errors import CredoError
from node_agent.attestation.errors import AgentBanned
from node_agent.attestation.session import AgentSession, SessionConfig
from node_agent.cache.manager import CacheConfig, CacheManager
from node_agent.config import AgentConfig
from node_agent.sync.entries import TrustBundles
from node_agent.sync.syncer import EntrySyncer, SyncerConfig
from node_agent.workload.unix import UnixAttestor, UnixAttestorConfig
from node_agent.workload_api.server import (
    WorkloadApiServer,
    WorkloadApiServerConfig,
    check_socket_directory,
)

__all__ = ["run", "serve"]

log = logging.getLogger(__name__)


class _AdminServer:
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


async def serve(
    config: AgentConfig,
    ready: asyncio.Event | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Run the agent until ``stop`` is set; set ``ready`` once the Workload API serves.

    Raises :class:`~node_agent.attestation.errors.AgentBanned` when the server bans the
    agent, and other :class:`~credo.errors.CredoError` subclasses when it cannot start.
    """
    stop = stop or asyncio.Event()
    trust_domain = config.trust_domain_obj
    session = AgentSession(
        SessionConfig(
            server_addresses=config.server_addresses,
            trust_domain=trust_domain,
            data_dir=config.data_dir,
            trust_bundle=config.trust_bundle,
            insecure_bootstrap=config.insecure_bootstrap,
            join_token=config.join_token,
        )
    )
    workload_api: WorkloadApiServer | None = None
    admin = _AdminServer(config.admin_socket)
    try:
        await session.start()
        cache = CacheManager(
            CacheConfig(
                trust_domain=trust_domain,
                max_size=config.svid_cache_max_size,
                svid_wait_timeout=config.svid_wait_timeout,
            ),
            session,
        )
        cache.update_bundles(TrustBundles(Bundle(trust_domain, session.authorities)))
        syncer = EntrySyncer(
            session,
            cache,
            SyncerConfig(backoff_min=config.sync_backoff_min, backoff_max=config.sync_backoff_max),
        )
        attestor = UnixAttestor(UnixAttestorConfig(workload_size_limit=config.workload_size_limit))
        workload_api = WorkloadApiServer(
            WorkloadApiServerConfig(socket_path=str(config.socket_path)), cache, attestor
        )
        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(session.run_renewal(), name="agent-svid-renewal"),
                group.create_task(syncer.run(), name="entry-sync"),
                group.create_task(cache.run(), name="svid-cache"),
            ]
            await workload_api.start()
            await admin.start()
            log.info(
                "agent running",
                extra={
                    "spiffe_id": str(session.agent_id),
                    "socket": str(config.socket_path),
                    "admin_socket": str(config.admin_socket),
                    "servers": ",".join(config.server_addresses),
                },
            )
            if ready is not None:
                ready.set()
            await stop.wait()
            log.info("agent stopping")
            for task in tasks:
                task.cancel()
    except BaseExceptionGroup as group_error:
        banned = _find(group_error, AgentBanned)
        if banned is not None:
            raise banned from None
        failure = _find(group_error, CredoError) or _find(group_error, OSError)
        if failure is not None:
            raise failure from None
        raise
    finally:
        with contextlib.suppress(Exception):
            await admin.stop()
        if workload_api is not None:
            with contextlib.suppress(Exception):
                await workload_api.stop(1.0)
        await session.close()


def _find(
    group: BaseExceptionGroup[BaseException], kind: type[BaseException]
) -> BaseException | None:
    """The first exception of ``kind`` in ``group`` (nested groups included)."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            found = _find(exc, kind)
            if found is not None:
                return found
        elif isinstance(exc, kind):
            return exc
    return None


def _raise_open_file_limit() -> None:
    """Lift the soft open-file limit to the hard one: each workload connection holds a few
    descriptors, and a default soft limit of 1024 would cap the agent at a few hundred."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def run(config: AgentConfig) -> int:
    """Run the agent until SIGTERM/SIGINT; return the process exit code.

    0 after a clean shutdown; 1 when the agent cannot start or was banned (the reason is
    logged and printed as one line on stderr).
    """
    setup_logging(config.log_level, config.log_format)
    _raise_open_file_limit()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        try:
            await serve(config, stop=stop)
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)

    try:
        asyncio.run(main())
    except AgentBanned as exc:
        log.error("agent banned; exiting", extra={"spiffe_id": exc.agent_id})
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    except (CredoError, OSError) as exc:
        message = " ".join(str(exc).split())
        log.error("agent failed", extra={"error": message})
        print(f"Error: {message}", file=sys.stderr)
        return 1
    log.info("agent stopped", extra={"pid": os.getpid()})
    return 0
