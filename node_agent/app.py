"""The node agent process: builds every component from config, in order, and runs them.

Order (nothing else constructs these):

1. :class:`~node_agent.attestation.store.SvidStore` — the agent SVID, key and bundle on disk;
2. :class:`~node_agent.server_client.ServerClient` — the one client to the servers
   (channels, failover, server verification, backoff, errors);
3. the node attestor the config names (:mod:`node_agent.attestation.catalog`) and
   :class:`~node_agent.attestation.session.AgentSession` — resume with the stored agent
   SVID or attest;
4. :class:`~node_agent.cache.manager.CacheManager` — the SVID cache (the Workload API's
   ``Manager``), seeded with the stored trust bundle;
5. :class:`~node_agent.sync.syncer.EntrySyncer` — the entry stream, feeding the cache;
6. the workload attestors the config names (:mod:`node_agent.workload.catalog`, combined)
   and :class:`~node_agent.workload_api.server.WorkloadApiServer` on the public socket, its
   internal socket in a :class:`~credo._rundir.RuntimeDir` under the data dir (removed on
   exit; one left by a crash is removed at the next start);
7. :class:`~node_agent.workload_api.admin.AdminServer` — gRPC health on the admin socket
   (live: a real Workload API call through the public socket; ready: also synced);
8. :class:`~node_agent.telemetry.AgentMetrics` on ``metrics_address``, when set.

The agent-SVID renewal loop, the sync stream and the cache's signing loop run side by
side under one :class:`asyncio.TaskGroup`, each supervised: one that ends (returns, raises,
or is cancelled from inside) is logged as an error and started again. SIGTERM or SIGINT
stops everything cleanly; a ban by the server ends the agent with a non-zero exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from credo._logging import setup_logging
from credo._rundir import RuntimeDir
from credo.bundle import Bundle
from credo.errors import CredoError
from node_agent.attestation.catalog import build_node_attestor
from node_agent.attestation.session import AgentSession, SessionConfig
from node_agent.attestation.store import SvidStore
from node_agent.audit_log import DeliveryLog
from node_agent.cache.manager import CacheConfig, CacheManager
from node_agent.config import AgentConfig
from node_agent.errors import AgentRemoved
from node_agent.priority import apply_priority
from node_agent.server_client import Backoff, BackoffPolicy, ServerClient, ServerClientConfig
from node_agent.sync.entries import TrustBundles
from node_agent.sync.syncer import EntrySyncer
from node_agent.telemetry import AgentMetrics
from node_agent.workload.catalog import build_workload_attestor
from node_agent.workload_api.admin import AdminServer
from node_agent.workload_api.server import WorkloadApiServer, WorkloadApiServerConfig

__all__ = ["run", "serve"]

log = logging.getLogger(__name__)


async def serve(
    config: AgentConfig,
    ready: asyncio.Event | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Run the agent until ``stop`` is set; set ``ready`` once the Workload API serves.

    Raises :class:`~node_agent.errors.AgentBanned` (or AgentEvicted) when the server removes
    the agent, and other :class:`~credo.errors.CredoError` subclasses when it cannot start.
    """
    stop = stop or asyncio.Event()
    trust_domain = config.trust_domain_obj
    store = SvidStore(config.data_dir)
    store.prepare()
    client = ServerClient(
        ServerClientConfig(
            server_addresses=config.server_addresses,
            trust_domain=trust_domain,
            backoff=BackoffPolicy(initial=config.sync_backoff_min, cap=config.sync_backoff_max),
        ),
        forget_agent_svid=store.delete,
    )
    session = AgentSession(
        SessionConfig(
            trust_domain=trust_domain,
            trust_bundle=config.trust_bundle,
            trust_bundle_url=config.trust_bundle_url,
            trust_bundle_format=config.trust_bundle_format,
            insecure_bootstrap=config.insecure_bootstrap,
        ),
        client,
        build_node_attestor(config),
        store,
    )
    workload_api: WorkloadApiServer | None = None
    runtime: RuntimeDir | None = None
    syncer: EntrySyncer | None = None

    def not_ready() -> str | None:
        if syncer is None or not syncer.synced.is_set():
            return "the first entry sync from the server has not completed"
        if session.svid.expires_at.timestamp() <= time.time():
            return f"the agent SVID expired at {session.svid.expires_at.isoformat()}"
        return None

    admin = AdminServer(config.admin_socket, config.socket_path, not_ready)
    metrics = AgentMetrics()
    stop_metrics: Callable[[], None] | None = None
    try:
        await session.start()
        cache = CacheManager(
            CacheConfig(
                trust_domain=trust_domain,
                max_size=config.svid_cache_max_size,
                svid_wait_timeout=config.svid_wait_timeout,
            ),
            client,
        )
        cache.update_bundles(TrustBundles(Bundle(trust_domain, session.authorities)))
        syncer = EntrySyncer(client, cache, session)
        runtime = RuntimeDir.create(config.data_dir, setting="data_dir")
        workload_api = WorkloadApiServer(
            WorkloadApiServerConfig(
                socket_path=str(config.socket_path), private_dir=str(runtime.path)
            ),
            cache,
            build_workload_attestor(config.workload_attestor),
            metrics=metrics,
            delivery_log=DeliveryLog(Path(config.data_dir) / "audit"),
        )
        metrics.set_gauge_sources(
            svids_cached=lambda: cache.size,
            entries=lambda: len(cache.served),
            sync_connected=lambda: 1.0 if cache.connected else 0.0,
            sync_last_event_id=lambda: syncer.state.last_event_id if syncer else 0,
            sync_resyncs=lambda: syncer.resyncs if syncer else 0,
        )
        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(_supervised(name, component), name=name)
                for name, component in (
                    ("agent-svid-renewal", session.run_renewal),
                    ("entry-sync", syncer.run),
                    ("svid-cache", cache.run),
                )
            ]
            await workload_api.start()
            await admin.start()
            if config.metrics_address:
                _, stop_metrics = await asyncio.to_thread(
                    metrics.serve_http, config.metrics_address
                )
            log.info(
                "agent running",
                extra={
                    "spiffe_id": str(session.agent_id),
                    "socket": str(config.socket_path),
                    "admin_socket": str(config.admin_socket),
                    "servers": ",".join(config.server_addresses),
                    "node_attestor": config.node_attestor.name,
                    "workload_attestors": ",".join(p.name for p in config.workload_attestor),
                },
            )
            if ready is not None:
                ready.set()
            await stop.wait()
            log.info("agent stopping")
            for task in tasks:
                task.cancel()
    except BaseExceptionGroup as group_error:
        removed = _find(group_error, AgentRemoved)
        if removed is not None:
            raise removed from None
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
        if stop_metrics is not None:
            await asyncio.to_thread(stop_metrics)
        if runtime is not None:
            runtime.close()
        await client.close()


_RESTART_POLICY = BackoffPolicy(initial=1.0, cap=30.0)


async def _supervised(name: str, component: Callable[[], Awaitable[None]]) -> None:
    """Run ``component`` for the agent's whole life, starting it again if it ends.

    Each component loops forever and lets only AgentRemoved (a ban) escape; one that
    returns, raises or is cancelled from inside (gRPC cancels the calls of a closed
    channel with CancelledError) would otherwise vanish from the task group without a
    word, and the agent would keep serving stale state. It is logged as an error with
    its name and started again after a backoff. The agent stopping (this task cancelled)
    and AgentRemoved end it.
    """
    backoff = Backoff(_RESTART_POLICY)
    while True:
        started = time.monotonic()
        try:
            await component()
            how = "returned"
        except AgentRemoved:
            raise
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the agent is stopping
            how = "was cancelled"
        except Exception as exc:
            log.exception("agent component failed", extra={"component": name})
            how = f"failed ({type(exc).__name__}: {exc})"
        if time.monotonic() - started > 60:
            backoff.reset()
        delay = backoff.next()
        log.error(
            f"agent component {how}; restarting it",
            extra={"component": name, "retry_in": round(delay, 1)},
        )
        await asyncio.sleep(delay)


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
    for message in config.deprecations:
        log.warning(message)
    _raise_open_file_limit()
    # Before asyncio and gRPC start threads (they inherit it; apply_priority sets any
    # already running too).
    log.info("scheduling priority", extra=apply_priority(config.nice))

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
    except AgentRemoved as exc:
        log.error(f"agent {exc.action}; exiting", extra={"spiffe_id": exc.agent_id})
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    except (CredoError, OSError) as exc:
        message = " ".join(str(exc).split())
        log.error("agent failed", extra={"error": message})
        print(f"Error: {message}", file=sys.stderr)
        return 1
    log.info("agent stopped", extra={"pid": os.getpid()})
    return 0
