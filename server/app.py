"""The signing server, wired: every component is built here from the config, in order.

datastore -> key manager -> authority manager + CA (+ signing workers) -> entry cache ->
CRL signer ->
node attestors (those the config names, from :mod:`server.attestation.catalog`) -> bundle
publishers (:mod:`server.bundle_publisher.catalog`) -> agent flows (:mod:`server.agents`,
:mod:`server.issuance`) -> APIs -> server identity (:mod:`server.identity`) and
endpoints (and the HTTP front end, :mod:`server.http`); then the background loops (CA
rotation, entry change feed, server SVID refresh, the HTTP certificate, housekeeping, bundle
publishing, federated bundle refresh, CRL signing, audit checkpoints) run under one
:class:`asyncio.TaskGroup` until ``stop``. Nothing else constructs these components. Where
things live on disk is
:mod:`server.paths`.

Endpoints:

* agent endpoint on ``bind_address``: TLS with the server's own SVID
  ``spiffe://<td>/credo/server`` (re-signed at half-life and whenever the CA or the
  bundle changes; new connections get the new one), client certificates optional (see
  :mod:`server.api.tls`), gRPC health; the TLS front end relays to gRPC over sockets in a
  :class:`~credo._rundir.RuntimeDir` under the data dir (removed on exit, and at the next
  start after a crash);
* admin endpoint on the Unix socket ``admin_socket`` (directory 0700, socket 0600),
  gRPC health;
* Prometheus metrics on ``metrics_address`` when set;
* the HTTP front end (:mod:`server.http`) on ``[server.http] bind_address`` when set: every
  HTTP endpoint, added by :func:`_http_routes`; TLS with a certificate the server issues
  itself for ``[server.http] dns_names`` (a second :class:`ServerIdentity`) or from files.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from credo._files import write_atomically
from credo._logging import setup_logging
from credo._paths import check_private_file
from credo._proto.credo.server.v1 import admin_pb2_grpc, agent_pb2_grpc
from credo._protocol import AGENT_SERVER_KEEPALIVE
from credo._rundir import RuntimeDir
from credo.bundle import Bundle
from credo.errors import CredoError
from credo.spiffe_id import SpiffeId, TrustDomain
from server import audit
from server.agents.attestation import NodeAttestation
from server.agents.authn import AgentAuthenticator
from server.agents.sync import AuthorizedEntries, SyncView
from server.api.admin import (
    AdminActorInterceptor,
    AdminApiConfig,
    AgentsService,
    AuditService,
    BundlesService,
    EntriesService,
    FederationService,
    LocalAuthorityService,
    SvidsService,
)
from server.api.agent import AgentService
from server.api.common import BundleSource
from server.api.delegation import DelegationService
from server.api.peercred import AdminSocketRelay
from server.api.tls import PeerRegistry, TlsFrontend
from server.attestation.catalog import PluginContext, build_node_attestors
from server.audit.checkpoint import Checkpointer
from server.authorization import EntryCache, Subscription
from server.bundle_publisher.catalog import PublisherContext, build_bundle_publishers
from server.bundle_publisher.runner import BundlePublishing
from server.ca.ca import CertificateAuthority
from server.ca.crl import CrlSigner, crl_routes
from server.ca.keymanager import DiskKeyManager
from server.ca.manager import AuthorityManager, AuthorityManagerConfig
from server.ca.pool import SigningPool
from server.config import ServerConfig
from server.datastore.models import (
    DelegationPolicy,
    ListRegistrationEntriesRequest,
)
from server.datastore.protocol import DataStore
from server.datastore.sql import SqlDataStore
from server.delegation.exchange import Recent, TokenExchange
from server.delegation.policy import agent_patterns_for
from server.delegation.routes import DelegationEndpoints, delegation_routes
from server.delegation.subjects import SubjectIssuers
from server.federation.endpoint import bundle_endpoint_routes
from server.federation.refresher import BundleRefresher
from server.housekeeping import run_housekeeping
from server.http import FileCertificate, HttpFrontend, IssuedCertificate, build_http_context
from server.http.tls import CertificateSource
from server.identity import ServerIdentity, server_dns_names
from server.issuance import Issuer
from server.oidc import oidc_routes
from server.paths import load_server_id, prepare_admin_socket, private_dir
from server.revocation import jwt_revocation_routes
from server.telemetry import Metrics

__all__ = ["RunningServer", "run", "serve"]

log = logging.getLogger(__name__)

SHUTDOWN_GRACE = 5.0
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
    *AGENT_SERVER_KEEPALIVE,
]


@dataclass(frozen=True)
class RunningServer:
    """What ``serve`` passes to ``ready`` once both endpoints accept calls."""

    agent_address: tuple[str, int]
    admin_socket: Path
    trust_domain: TrustDomain
    metrics_address: str = ""
    # "https://host:port" of the HTTP front end; "" when it is off.
    http_url: str = ""


def _split_host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


@dataclass
class _Server:
    """The built components and the resources to release on shutdown."""

    config: ServerConfig
    datastore: DataStore
    manager: AuthorityManager
    cache: EntryCache
    identity: ServerIdentity
    checkpointer: Checkpointer
    metrics: Metrics
    stopping: asyncio.Event
    runtime: RuntimeDir
    agent_grpc: grpc.aio.Server
    admin_grpc: grpc.aio.Server
    admin_relay: AdminSocketRelay
    frontend: TlsFrontend
    publishing: BundlePublishing
    crl_signer: CrlSigner
    crl_events: Subscription
    federation: BundleRefresher
    health: list[health.aio.HealthServicer] = field(default_factory=list)
    stop_metrics: Callable[[], None] | None = None
    signing_pool: SigningPool | None = None
    http: HttpFrontend | None = None
    http_identity: ServerIdentity | None = None
    closed: bool = False

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.stopping.set()
        self.frontend.stop_accepting()
        if self.http is not None:
            self.http.stop_accepting()
        for servicer in self.health:
            with contextlib.suppress(Exception):
                await servicer.enter_graceful_shutdown()
        await asyncio.gather(
            self.agent_grpc.stop(SHUTDOWN_GRACE),
            self.admin_grpc.stop(SHUTDOWN_GRACE),
        )
        await self.frontend.close()
        await self.admin_relay.close()
        if self.http is not None:
            await self.http.close()
        if self.signing_pool is not None:
            await asyncio.to_thread(self.signing_pool.close)
        if self.stop_metrics is not None:
            await asyncio.to_thread(self.stop_metrics)
        with contextlib.suppress(OSError):
            os.unlink(self.config.admin_socket)
        self.runtime.close()
        self.datastore.close()
        log.info("server stopped")


async def _build(config: ServerConfig, stop: asyncio.Event) -> _Server:
    td = TrustDomain.parse(config.trust_domain)
    data_dir = private_dir(Path(config.data_dir))
    if config.datastore_url.startswith("sqlite:///"):
        check_private_file(config.datastore_url.removeprefix("sqlite:///"), "datastore file")

    # 1. datastore
    datastore: DataStore = await asyncio.to_thread(SqlDataStore.open, config.datastore_url)
    runtime: RuntimeDir | None = None
    try:
        # 2. key manager, 3. authority manager + CA
        metrics = Metrics()
        key_manager = DiskKeyManager(private_dir(data_dir / "keys", "key directory"))
        ca = CertificateAuthority(td, on_sign=metrics.on_sign, jwt_issuer=config.jwt_issuer)
        server_id = load_server_id(data_dir)
        log.info("server id", extra={"server_id": server_id})
        audit.set_server_actor(server_id)  # the actor of what the server does by itself
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

        # 4b. CRLs of this server's X.509 authorities, re-signed on every revocation
        crl_signer = CrlSigner(
            datastore, key_manager, server_id, next_update=config.crl_next_update
        )
        await asyncio.to_thread(crl_signer.sign_due)
        crl_events = cache.subscribe()

        # 5. node attestors: exactly the plugins the config names
        attestors = build_node_attestors(config.node_attestor, PluginContext(td, datastore))

        # 5b. bundle publishers: keep copies of the bundle where agents find it
        bundles = BundleSource(datastore, td)
        publishing = BundlePublishing(
            build_bundle_publishers(config.bundle_publisher, PublisherContext(td)),
            bundles.own_bundle,
            cache,
            td.name,
        )

        # 6. agent flows (authentication, attestation, authorization, sync, issuance), APIs
        stopping = asyncio.Event()
        authn = AgentAuthenticator(
            td,
            datastore,
            ca,
            agent_svid_ttl=config.effective_agent_svid_ttl,
            signing_rate_limit=config.signing_rate_limit,
        )
        attestation = NodeAttestation(
            datastore,
            ca,
            attestors,
            agent_svid_ttl=config.effective_agent_svid_ttl,
            rate_limit=config.attestation_rate_limit,
            metrics=metrics,
        )
        issuer = Issuer(
            ca,
            x509_svid_ttl=config.x509_svid_ttl,
            jwt_svid_ttl=config.jwt_svid_ttl,
            wit_svid_ttl=config.wit_svid_ttl,
            pool=signing_pool,
            metrics=metrics,
            audit_writer=datastore,
            issued=datastore,
        )
        peers = PeerRegistry()
        agent_api = AgentService(
            attestation=attestation,
            authn=authn,
            authorized=AuthorizedEntries(cache),
            sync=SyncView(
                cache,
                datastore,
                authn,
                stopping,
                heartbeat_interval=config.sync_heartbeat_interval,
            ),
            issuer=issuer,
            bundles=bundles,
            peers=peers,
        )
        admin_config = AdminApiConfig(
            trust_domain=td,
            x509_svid_ttl=config.x509_svid_ttl,
            jwt_svid_ttl=config.jwt_svid_ttl,
            wit_svid_ttl=config.wit_svid_ttl,
            join_token_ttl=config.join_token_ttl,
            join_token_max_ttl=config.join_token_max_ttl,
            require_entry_owner=config.require_entry_owner,
        )

        # 7. servers
        bind_host, bind_port = _split_host_port(config.bind_address)
        identity = ServerIdentity(
            manager, bundles, key_type="ec-p256", dns_names=server_dns_names(bind_host)
        )
        await asyncio.to_thread(identity.refresh)
        checkpointer = Checkpointer(datastore, identity, config.audit_checkpoint_interval)
        # The TLS front end's relay sockets: private, under the data dir, gone on exit.
        runtime = RuntimeDir.create(data_dir, setting="data_dir")
        relay_dir = runtime.path
        agent_health = health.aio.HealthServicer()
        agent_grpc = grpc.aio.server(options=_AGENT_GRPC_OPTIONS)
        agent_pb2_grpc.add_AgentServicer_to_server(agent_api, agent_grpc)
        health_pb2_grpc.add_HealthServicer_to_server(agent_health, agent_grpc)
        agent_grpc.add_insecure_port(f"unix:{relay_dir / 'agent.sock'}")

        admin_health = health.aio.HealthServicer()
        admin_socket = Path(config.admin_socket).absolute()
        # The admin socket is a relay that reads each caller's SO_PEERCRED (the audit
        # trail's admin actor); gRPC listens on a private socket behind it.
        admin_relay = AdminSocketRelay(
            admin_socket, upstream=relay_dir / "admin.sock", relay_dir=relay_dir
        )
        admin_grpc = grpc.aio.server(
            options=_GRPC_OPTIONS, interceptors=[AdminActorInterceptor(admin_relay)]
        )
        admin_pb2_grpc.add_EntriesServicer_to_server(
            EntriesService(admin_config, datastore), admin_grpc
        )
        admin_pb2_grpc.add_AgentsServicer_to_server(
            AgentsService(admin_config, datastore), admin_grpc
        )
        admin_pb2_grpc.add_BundlesServicer_to_server(
            BundlesService(admin_config, datastore, bundles), admin_grpc
        )
        admin_pb2_grpc.add_SvidsServicer_to_server(
            SvidsService(admin_config, ca, datastore), admin_grpc
        )
        admin_pb2_grpc.add_AuditServicer_to_server(
            AuditService(datastore, checkpointer), admin_grpc
        )
        admin_pb2_grpc.add_FederationServicer_to_server(
            FederationService(admin_config, datastore), admin_grpc
        )
        admin_pb2_grpc.add_LocalAuthorityServicer_to_server(
            LocalAuthorityService(manager), admin_grpc
        )
        admin_pb2_grpc.add_DelegationServicer_to_server(
            DelegationService(td, datastore, config.delegation.issuers), admin_grpc
        )
        health_pb2_grpc.add_HealthServicer_to_server(admin_health, admin_grpc)
        prepare_admin_socket(admin_socket)
        admin_grpc.add_insecure_port(f"unix:{relay_dir / 'admin.sock'}")

        frontend = TlsFrontend(
            bind_host,
            bind_port,
            upstream=relay_dir / "agent.sock",
            relay_dir=relay_dir,
            context_provider=identity.context,
            peers=peers,
        )
        # 8. the HTTP front end and its endpoints
        http, http_identity = _build_http(config, data_dir, manager, bundles, metrics)
        if http is not None:
            http.add_routes(
                _http_routes(
                    config,
                    bundles,
                    datastore,
                    ca,
                    _delegation_endpoints(config, td, datastore, ca, bundles, http),
                )
            )

        metrics.set_gauge_sources(
            entries=lambda: len(cache.index),
            agents=datastore.count_attested_nodes,
            ca_expiry=lambda: (
                ca.x509_ca.not_after.timestamp() - time.time() if ca.x509_ca is not None else 0.0
            ),
            datastore_statements=lambda: datastore.statements_executed,
        )
        return _Server(
            config=config,
            datastore=datastore,
            manager=manager,
            cache=cache,
            identity=identity,
            checkpointer=checkpointer,
            metrics=metrics,
            stopping=stopping,
            runtime=runtime,
            agent_grpc=agent_grpc,
            admin_grpc=admin_grpc,
            admin_relay=admin_relay,
            frontend=frontend,
            publishing=publishing,
            federation=BundleRefresher(datastore, td, on_refresh=metrics.on_federation_refresh),
            crl_signer=crl_signer,
            crl_events=crl_events,
            health=[agent_health, admin_health],
            signing_pool=signing_pool,
            http=http,
            http_identity=http_identity,
        )
    except BaseException:
        datastore.close()
        if runtime is not None:
            runtime.close()
        raise


def _build_http(
    config: ServerConfig,
    data_dir: Path,
    manager: AuthorityManager,
    bundles: BundleSource,
    metrics: Metrics,
) -> tuple[HttpFrontend | None, ServerIdentity | None]:
    """The HTTP front end (None when ``[server.http] bind_address`` is unset) and, when it
    presents a certificate the server issues itself, the identity that keeps it fresh."""
    http_config = config.http
    if not http_config.enabled:
        return None, None
    identity: ServerIdentity | None = None
    certificate: CertificateSource | None = None
    if http_config.insecure_http:
        certificate = None
    elif http_config.tls_cert_file is not None and http_config.tls_key_file is not None:
        certificate = FileCertificate(http_config.tls_cert_file, http_config.tls_key_file)
    else:
        identity = ServerIdentity(
            manager,
            bundles,
            key_type="ec-p256",
            dns_names=_http_dns_names(http_config.dns_names),
            context_factory=build_http_context,
            name="http certificate",
        )
        identity.refresh()
        certificate = IssuedCertificate(identity.context)
    frontend = HttpFrontend(
        http_config, certificate=certificate, metrics=metrics, data_dir=data_dir
    )
    return frontend, identity


def _http_dns_names(configured: tuple[str, ...]) -> tuple[str, ...]:
    names = list(configured)
    if "localhost" not in names:
        names.append("localhost")
    return tuple(names)


def _http_routes(
    config: ServerConfig,
    bundles: BundleSource,
    datastore: DataStore,
    ca: CertificateAuthority,
    delegation: DelegationEndpoints,
) -> list[web.AbstractRouteDef]:
    """Every HTTP endpoint, from the packages that own them."""
    routes: list[web.AbstractRouteDef] = []
    # OIDC discovery + JWKS for JWT-SVIDs (server/oidc.py)
    routes += oidc_routes(bundles.own_bundle, config.jwt_issuer)
    # token exchange, introspection, OAuth metadata (server/delegation/routes.py)
    routes += delegation_routes(delegation)
    # the SPIFFE bundle endpoint for federated trust domains (server/federation/endpoint.py)
    routes += bundle_endpoint_routes(bundles.own_bundle)
    # the X.509 authorities' CRLs (server/ca/crl.py)
    routes += crl_routes(datastore)
    # the signed JWT revocation list (server/revocation.py)
    routes += jwt_revocation_routes(datastore, ca)
    return routes


def _delegation_endpoints(
    config: ServerConfig,
    td: TrustDomain,
    datastore: DataStore,
    ca: CertificateAuthority,
    bundles: BundleSource,
    http: HttpFrontend,
) -> DelegationEndpoints:
    """The token exchange and its endpoints; ``iss`` is ``[server.delegation] issuer``, else
    ``jwt_issuer``, else the front end's URL."""
    configured = config.delegation.issuer or config.jwt_issuer
    names = config.http.dns_names

    def issuer() -> str:
        if configured:
            return configured
        port = http.address[1]
        return f"{http.scheme}://{names[0] if names else 'localhost'}:{port}"

    def owner_of(agent: SpiffeId) -> str | None:
        now = time.time()
        found = [
            e
            for e in datastore.list_registration_entries(
                ListRegistrationEntriesRequest(by_spiffe_id=str(agent))
            ).entries
            if (not e.expires_at or e.expires_at > now)
            and datastore.fetch_entry_revocation(e.id) is None
        ]
        if not found:
            return None
        return next((e.owner for e in found if e.owner), "")

    # The bundle, owners and each agent's delegation policies are re-read at most every
    # second: an exchange then costs no query (but a budget update when the policy has
    # budgets), and a change to any of them reaches the token endpoint within a second.
    recent_bundle: Recent[None, Bundle] = Recent(lambda _: bundles.own_bundle(), 1.0)

    def policies_for(agent: SpiffeId) -> tuple[DelegationPolicy, ...]:
        return tuple(datastore.list_delegation_policies(by_agent_ids=agent_patterns_for(agent)))

    exchange = TokenExchange(
        trust_domain=td,
        datastore=datastore,
        subjects=SubjectIssuers.from_config(config.delegation.issuers),
        issuer=issuer,
        jwt_key=lambda: ca.jwt_key,
        bundle=lambda: recent_bundle(None),
        owner_of=Recent(owner_of, 1.0),
        policies_for=Recent(policies_for, 1.0),
    )
    return DelegationEndpoints(exchange, config.delegation.introspection_allowed)


async def _start_endpoints(server: _Server) -> RunningServer:
    config = server.config
    await server.agent_grpc.start()
    await server.admin_grpc.start()
    await server.admin_relay.start()
    os.chmod(config.admin_socket, 0o600)
    await server.frontend.start()
    host, port = server.frontend.address
    # The HTTP front end is up before server.addr appears, so "started" means both.
    http_url = ""
    if server.http is not None:
        await server.http.start()
        http_url = server.http.url
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
        http_url=http_url,
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

    def generation() -> tuple[int, int]:
        # What moves when the CA journal or the federation relationships may have changed:
        # the feed's position (another server's write publishes an event: a journal write
        # the bundle) and this server's own committed writes (server/datastore/snapshot.py).
        return server.cache.event_id, server.datastore.writes_committed

    try:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(
                server.manager.run(stop, journal_generation=generation), name="authority-manager"
            )
            tasks.create_task(server.cache.run(stop), name="entry-cache")
            tasks.create_task(
                server.identity.run(stop, bundle_generation=lambda: server.cache.bundle_events),
                name="server-identity",
            )
            tasks.create_task(server.checkpointer.run(stop), name="audit-checkpoints")
            if server.http_identity is not None:
                tasks.create_task(
                    server.http_identity.run(
                        stop, bundle_generation=lambda: server.cache.bundle_events
                    ),
                    name="http-certificate",
                )
            tasks.create_task(run_housekeeping(server.datastore, stop), name="housekeeping")
            tasks.create_task(server.publishing.run(stop), name="bundle-publishing")
            tasks.create_task(
                server.crl_signer.run(stop, server.crl_events.wait), name="crl-signer"
            )
            tasks.create_task(
                server.federation.run(stop, generation=generation),
                name="federation",
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
