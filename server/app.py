"""The signing server, wired: every component is built here from the config, in order.

datastore -> key manager -> authority manager + CA -> entry cache -> node attestors ->
APIs -> endpoints; then the background loops (CA rotation, entry change feed, server
SVID refresh, housekeeping) run under one :class:`asyncio.TaskGroup` until ``stop``.
Nothing else constructs these components.

Endpoints:

* agent endpoint on ``bind_address``: TLS with the server's own SVID
  ``spiffe://<td>/credo/server`` (re-signed at half-life and whenever the CA or the
  bundle changes; new connections get the new one), client certificates optional (see
  :mod:`server.api.tls`), gRPC health;
* admin endpoint on the Unix socket ``admin_socket`` (directory 0700, socket 0600),
  gRPC health;
* Prometheus metrics on ``metrics_address`` when set.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import shutil
import signal
import socket
import ssl
import stat
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from credo._files import write_atomically
from credo._logging import setup_logging
from credo._proto.credo.server.v1 import admin_pb2_grpc, agent_pb2_grpc
from credo.errors import CredoError
from credo.keys import generate_private_key, private_key_to_pkcs8_pem
from credo.spiffe_id import TrustDomain
from server.api.admin import (
    AdminApiConfig,
    AgentsService,
    BundlesService,
    EntriesService,
    LocalAuthorityService,
    SvidsService,
)
from server.api.agent import AgentApiConfig, AgentService
from server.api.common import BundleSource
from server.api.tls import PeerRegistry, TlsFrontend, build_server_context
from server.attestation import NodeAttestor
from server.attestation.join_token import JoinTokenAttestor
from server.authorization import EntryCache
from server.ca.ca import CertificateAuthority
from server.ca.keymanager import DiskKeyManager
from server.ca.manager import AuthorityManager, AuthorityManagerConfig
from server.ca.pool import SigningPool
from server.ca.templates import DEFAULT_SERVER_DNS_NAMES
from server.config import ServerConfig
from server.datastore.protocol import DataStore
from server.datastore.sql import SqlDataStore
from server.telemetry import Metrics

__all__ = ["RunningServer", "load_server_id", "run", "serve"]

log = logging.getLogger(__name__)

SHUTDOWN_GRACE = 5.0
HOUSEKEEPING_INTERVAL = 60.0
EVENT_RETENTION = 24 * 3600
_MAX_MESSAGE = 64 * 1024 * 1024
_GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", _MAX_MESSAGE),
    ("grpc.max_send_message_length", _MAX_MESSAGE),
    ("grpc.so_reuseport", 0),
]
# The agent endpoint takes requests before any authentication (AttestAgent): do not let
# a caller make the server buffer 64 MiB per call. Its largest legitimate request, a
# batch of 500 CSRs, is well under 1 MiB; responses (sync, signed chains) may be larger.
_MAX_AGENT_REQUEST = 4 * 1024 * 1024
_AGENT_GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", _MAX_AGENT_REQUEST),
    ("grpc.max_send_message_length", _MAX_MESSAGE),
    ("grpc.so_reuseport", 0),
]


@dataclass(frozen=True)
class RunningServer:
    """What ``serve`` passes to ``ready`` once both endpoints accept calls."""

    agent_address: tuple[str, int]
    admin_socket: Path
    trust_domain: TrustDomain
    metrics_address: str = ""


def _private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) and make it 0700."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


def load_server_id(data_dir: Path) -> str:
    """This server's stable id, from ``<data-dir>/server_id`` (a random UUID made once).

    It names the owner of the CA authorities this server manages when several servers
    share one datastore. Created atomically: a temp file linked into place, so two
    processes racing on one data dir end up with the same id.
    """
    path = data_dir / "server_id"
    if not path.exists():
        _create_server_id(path)
    text = path.read_text().strip()
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise OSError(
            f"{path} holds {text[:40]!r}; expected a server id (a UUID). Remove the file only "
            "if this server's keys are gone too: a new id orphans this server's authorities"
        ) from None


def _create_server_id(path: Path) -> None:
    tmp = path.with_name(f".server_id.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(f"{uuid.uuid4()}\n")
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass  # another process won the race; use its id
    finally:
        tmp.unlink(missing_ok=True)


def _split_host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _server_dns_names(bind_host: str) -> tuple[str, ...]:
    names = list(DEFAULT_SERVER_DNS_NAMES)
    try:
        ipaddress.ip_address(bind_host)
    except ValueError:
        if bind_host and bind_host not in names:
            names.append(bind_host)
    return tuple(names)


class ServerIdentity:
    """The server's TLS SVID and the roots it trusts; rebuilt when either goes stale."""

    def __init__(
        self,
        manager: AuthorityManager,
        bundles: BundleSource,
        *,
        key_type: str,
        dns_names: tuple[str, ...],
    ) -> None:
        self._manager = manager
        self._bundles = bundles
        self._key = generate_private_key(key_type)
        self._dns_names = dns_names
        self._context: ssl.SSLContext | None = None
        self._renew_at = 0.0
        self._signed_by: object = None
        self._roots_pem = b""

    def context(self) -> ssl.SSLContext:
        if self._context is None:
            self.refresh()
        assert self._context is not None
        return self._context

    def refresh(self, *, force: bool = False) -> bool:
        """Re-sign the SVID at half-life, on CA change or on bundle change; True if rebuilt."""
        ca = self._manager.ca.x509_ca
        roots = b"".join(
            c.public_bytes(serialization.Encoding.PEM)
            for c in self._bundles.own_bundle().x509_authorities
        )
        now = time.time()
        if (
            not force
            and self._context is not None
            and now < self._renew_at
            and ca is self._signed_by
            and roots == self._roots_pem
        ):
            return False
        chain = self._manager.sign_server_svid(self._key, self._dns_names)
        leaf = chain[0]
        start = leaf.not_valid_before_utc.timestamp()
        self._renew_at = start + (leaf.not_valid_after_utc.timestamp() - start) / 2
        chain_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
        self._context = build_server_context(chain_pem, private_key_to_pkcs8_pem(self._key), roots)
        self._signed_by = ca
        self._roots_pem = roots
        log.info(
            "server SVID ready",
            extra={
                "serial": format(leaf.serial_number, "x"),
                "expires_at": leaf.not_valid_after_utc.isoformat(),
            },
        )
        return True

    async def run(self, stop: asyncio.Event, interval: float = 1.0) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
            if stop.is_set():
                return
            try:
                await asyncio.to_thread(self.refresh)
            except (CredoError, OSError, ssl.SSLError) as err:
                log.error("refreshing the server SVID failed", extra={"error": str(err)})


async def _housekeeping(ds: DataStore, stop: asyncio.Event, interval: float) -> None:
    """Prune expired join tokens and entries, and events older than the retention."""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
        if stop.is_set():
            return
        now = int(time.time())
        try:
            tokens = await asyncio.to_thread(ds.prune_join_tokens, now)
            entries = await asyncio.to_thread(ds.prune_registration_entries, now)
            events = await asyncio.to_thread(ds.prune_events, now - EVENT_RETENTION)
        except CredoError as err:
            log.error("housekeeping failed", extra={"error": str(err)})
            continue
        if tokens or entries or events:
            log.info(
                "pruned expired records",
                extra={"join_tokens": tokens, "entries": entries, "events": events},
            )


@dataclass
class _Server:
    """The built components and the resources to release on shutdown."""

    config: ServerConfig
    datastore: DataStore
    manager: AuthorityManager
    cache: EntryCache
    identity: ServerIdentity
    metrics: Metrics
    stopping: asyncio.Event
    relay_dir: Path
    agent_grpc: grpc.aio.Server
    admin_grpc: grpc.aio.Server
    frontend: TlsFrontend
    health: list[health.aio.HealthServicer] = field(default_factory=list)
    stop_metrics: Callable[[], None] | None = None
    signing_pool: SigningPool | None = None
    closed: bool = False

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.stopping.set()
        self.frontend.stop_accepting()
        for servicer in self.health:
            with contextlib.suppress(Exception):
                await servicer.enter_graceful_shutdown()
        await asyncio.gather(
            self.agent_grpc.stop(SHUTDOWN_GRACE),
            self.admin_grpc.stop(SHUTDOWN_GRACE),
        )
        await self.frontend.close()
        if self.signing_pool is not None:
            await asyncio.to_thread(self.signing_pool.close)
        if self.stop_metrics is not None:
            await asyncio.to_thread(self.stop_metrics)
        with contextlib.suppress(OSError):
            os.unlink(self.config.admin_socket)
        shutil.rmtree(self.relay_dir, ignore_errors=True)
        self.datastore.close()
        log.info("server stopped")


def _prepare_admin_socket(path: Path) -> None:
    """Make the socket's directory private (0700), refusing one that others can reach.

    A directory Credo creates is made 0700. An existing one is never chmod'ed: pointing
    ``--admin-socket`` at ``/tmp/api.sock`` must not lock everyone else out of ``/tmp``,
    and a directory others can enter would let them reach the admin API.
    """
    parent = path.parent
    if parent.exists():
        st = parent.stat()
        if st.st_uid != os.geteuid():
            raise OSError(
                f"admin socket directory {parent} is owned by uid {st.st_uid}, not by this "
                f"server's uid {os.geteuid()}"
            )
        if st.st_mode & 0o077:
            raise OSError(
                f"admin socket directory {parent} is open to other users (mode "
                f"{stat.S_IMODE(st.st_mode):o}); the admin socket needs a private (0700) "
                "directory of its own, e.g. /tmp/credo-server/private/api.sock"
            )
    else:
        _private_dir(parent)
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise OSError(f"admin socket path {path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # stale socket of a server that is gone
        else:
            raise OSError(f"admin socket {path} is in use by another server")
        finally:
            probe.close()


async def _build(config: ServerConfig, stop: asyncio.Event) -> _Server:
    td = TrustDomain.parse(config.trust_domain)
    data_dir = _private_dir(Path(config.data_dir))

    # 1. datastore
    datastore: DataStore = await asyncio.to_thread(SqlDataStore.open, config.datastore_url)
    relay_dir: Path | None = None
    try:
        # 2. key manager, 3. authority manager + CA
        metrics = Metrics()
        key_manager = DiskKeyManager(_private_dir(data_dir / "keys"))
        ca = CertificateAuthority(td, on_sign=metrics.on_sign)
        server_id = load_server_id(data_dir)
        log.info("server id", extra={"server_id": server_id})
        manager = AuthorityManager(
            AuthorityManagerConfig.from_server_config(config, server_id),
            datastore,
            key_manager,
            ca=ca,
        )
        await asyncio.to_thread(manager.start)

        # Signing workers load the CA key from the key directory themselves; they are
        # spawned in the background once the endpoints start.
        signing_pool = (
            SigningPool(config.signing_workers, key_manager.directory, td)
            if config.signing_workers > 0
            else None
        )

        # 4. entry cache (authorization)
        cache = EntryCache(datastore)
        await asyncio.to_thread(cache.load)

        # 5. node attestors
        attestors: dict[str, NodeAttestor] = {}
        join_token = JoinTokenAttestor(datastore, td)
        attestors[join_token.type] = join_token

        # 6. APIs
        bundles = BundleSource(datastore, td)
        peers = PeerRegistry()
        stopping = asyncio.Event()
        agent_api = AgentService(
            AgentApiConfig(
                trust_domain=td,
                x509_svid_ttl=config.x509_svid_ttl,
                jwt_svid_ttl=config.jwt_svid_ttl,
                agent_svid_ttl=config.effective_agent_svid_ttl,
                attestation_rate_limit=config.attestation_rate_limit,
                signing_rate_limit=config.signing_rate_limit,
            ),
            datastore=datastore,
            ca=ca,
            bundles=bundles,
            cache=cache,
            attestors=attestors,
            peers=peers,
            metrics=metrics,
            stopping=stopping,
            signing_pool=signing_pool,
        )
        admin_config = AdminApiConfig(
            trust_domain=td,
            x509_svid_ttl=config.x509_svid_ttl,
            jwt_svid_ttl=config.jwt_svid_ttl,
            join_token_ttl=config.join_token_ttl,
        )

        # 7. servers
        bind_host, bind_port = _split_host_port(config.bind_address)
        identity = ServerIdentity(
            manager, bundles, key_type="ec-p256", dns_names=_server_dns_names(bind_host)
        )
        await asyncio.to_thread(identity.refresh)
        relay_dir = Path(tempfile.mkdtemp(prefix="credo-relay-"))
        agent_health = health.aio.HealthServicer()
        agent_grpc = grpc.aio.server(options=_AGENT_GRPC_OPTIONS)
        agent_pb2_grpc.add_AgentServicer_to_server(agent_api, agent_grpc)
        health_pb2_grpc.add_HealthServicer_to_server(agent_health, agent_grpc)
        agent_grpc.add_insecure_port(f"unix:{relay_dir / 'agent.sock'}")

        admin_health = health.aio.HealthServicer()
        admin_grpc = grpc.aio.server(options=_GRPC_OPTIONS)
        admin_pb2_grpc.add_EntriesServicer_to_server(
            EntriesService(admin_config, datastore), admin_grpc
        )
        admin_pb2_grpc.add_AgentsServicer_to_server(
            AgentsService(admin_config, datastore), admin_grpc
        )
        admin_pb2_grpc.add_BundlesServicer_to_server(
            BundlesService(admin_config, datastore, bundles), admin_grpc
        )
        admin_pb2_grpc.add_SvidsServicer_to_server(SvidsService(admin_config, ca), admin_grpc)
        admin_pb2_grpc.add_LocalAuthorityServicer_to_server(
            LocalAuthorityService(manager), admin_grpc
        )
        health_pb2_grpc.add_HealthServicer_to_server(admin_health, admin_grpc)
        admin_socket = Path(config.admin_socket).absolute()
        _prepare_admin_socket(admin_socket)
        admin_grpc.add_insecure_port(f"unix:{admin_socket}")

        frontend = TlsFrontend(
            bind_host,
            bind_port,
            upstream=relay_dir / "agent.sock",
            relay_dir=relay_dir,
            context_provider=identity.context,
            peers=peers,
        )
        metrics.set_gauge_sources(
            entries=lambda: len(cache.index),
            agents=datastore.count_attested_nodes,
            ca_expiry=lambda: (
                ca.x509_ca.not_after.timestamp() - time.time() if ca.x509_ca is not None else 0.0
            ),
        )
        return _Server(
            config=config,
            datastore=datastore,
            manager=manager,
            cache=cache,
            identity=identity,
            metrics=metrics,
            stopping=stopping,
            relay_dir=relay_dir,
            agent_grpc=agent_grpc,
            admin_grpc=admin_grpc,
            frontend=frontend,
            health=[agent_health, admin_health],
            signing_pool=signing_pool,
        )
    except BaseException:
        datastore.close()
        if relay_dir is not None:
            shutil.rmtree(relay_dir, ignore_errors=True)
        raise


async def _start_endpoints(server: _Server) -> RunningServer:
    config = server.config
    await server.agent_grpc.start()
    await server.admin_grpc.start()
    os.chmod(config.admin_socket, 0o600)
    await server.frontend.start()
    host, port = server.frontend.address
    data_dir = Path(config.data_dir)
    write_atomically(data_dir / "server.addr", f"{host}:{port}\n".encode(), 0o644)
    for servicer in server.health:
        await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        for name in ("credo.server.v1.Agent", "credo.server.v1.Entries"):
            await servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    metrics_address = ""
    if config.metrics_address:
        metrics_address, server.stop_metrics = server.metrics.serve_http(config.metrics_address)
    log.info(
        "server started",
        extra={
            "trust_domain": config.trust_domain,
            "agent_address": f"{host}:{port}",
            "admin_socket": str(config.admin_socket),
            "entries": len(server.cache.index),
        },
    )
    return RunningServer(
        agent_address=(host, port),
        admin_socket=Path(config.admin_socket),
        trust_domain=TrustDomain.parse(config.trust_domain),
        metrics_address=metrics_address,
    )


async def serve(
    config: ServerConfig,
    *,
    ready: Callable[[RunningServer], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Build the server from ``config`` and run it until ``stop`` is set.

    ``ready(RunningServer)`` is called once both endpoints accept calls. Returns after a
    clean shutdown; raises if a component fails to start or a background loop crashes.
    """
    stop = stop if stop is not None else asyncio.Event()
    started = time.perf_counter()
    server = await _build(config, stop)
    try:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(server.manager.run(stop), name="authority-manager")
            tasks.create_task(server.cache.run(stop), name="entry-cache")
            tasks.create_task(server.identity.run(stop), name="server-identity")
            tasks.create_task(
                _housekeeping(server.datastore, stop, HOUSEKEEPING_INTERVAL), name="housekeeping"
            )
            if server.signing_pool is not None:
                server.signing_pool.start_background()
            info = await _start_endpoints(server)
            log.info("server ready", extra={"seconds": round(time.perf_counter() - started, 3)})
            if ready is not None:
                ready(info)
            await stop.wait()
            log.info("server stopping")
            await server.aclose()
    finally:
        stop.set()
        await server.aclose()


def run(config: ServerConfig) -> int:
    """``credo-server run``: log setup, serve until SIGTERM/SIGINT; return the exit code."""
    setup_logging(config.log_level, config.log_format)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(config, stop=stop)

    failures: list[BaseException] = []
    try:
        asyncio.run(main())
    except* (CredoError, OSError) as group:
        failures.extend(group.exceptions)
    for err in failures:
        log.error("server failed", extra={"error": str(err)})
    return 1 if failures else 0
