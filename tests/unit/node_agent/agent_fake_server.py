"""A fake signing server for node-agent unit tests: a real in-process ``grpc.aio`` Agent
servicer over TLS that signs with credo, and helpers that point the agent's real
:class:`~node_agent.server_client.ServerClient` at it.

It keeps entries and an event log, pushes changes to open ``SyncEntries`` streams, signs
CSRs with a CA of its own (no backdating, so short TTLs renew quickly), and can be told
to ban the agent, refuse calls with a status and a ``credo-refusal`` reason, taint or
remove an authority, or fail calls. With ``require_client_auth`` it records the serial of
the client certificate of every mTLS call.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from credo._proto.credo.server.v1 import agent_pb2, agent_pb2_grpc, types_pb2
from credo._protocol import REFUSAL_KEY
from credo._reserved import SERVER_TLS_NAME
from credo.jwtsvid import sign_jwt_svid
from credo.keys import PrivateKey, generate_private_key, private_key_to_pkcs8_pem
from credo.spiffe_id import SpiffeId, TrustDomain
from credo.x509svid import X509Svid, ca_certificate_template, x509_svid_template
from node_agent.server_client import BackoffPolicy, ServerClient, ServerClientConfig

TD = TrustDomain.parse("example.org")
AGENT_ID = SpiffeId.parse("spiffe://example.org/credo/agent/join_token/test")


@dataclass
class Authority:
    cert: x509.Certificate
    key: PrivateKey
    tainted: bool = False


def make_authority(now: datetime | None = None) -> Authority:
    """A fresh self-signed CA for the fake trust domain."""
    now = now or datetime.now(UTC)
    key = generate_private_key()
    cert = ca_certificate_template(
        TD,
        key.public_key(),
        not_before=now - timedelta(minutes=1),
        not_after=now + timedelta(days=1),
    ).sign(key, hashes.SHA256())
    return Authority(cert, key)


@dataclass
class FakeState:
    """What the fake server has seen and holds."""

    entries: dict[str, types_pb2.RegistrationEntry] = field(default_factory=dict)
    events: list[agent_pb2.SyncEntriesResponse] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)
    resume_requests: list[int] = field(default_factory=list)
    jwt_calls: int = 0


class FakeAgentServer(agent_pb2_grpc.AgentServicer):
    """The ``Agent`` service, in memory."""

    def __init__(
        self,
        x509_ttl: float = 3600.0,
        jwt_ttl: float = 300.0,
        *,
        name: str = "server",
        journal: list[str] | None = None,
    ) -> None:
        self.x509_ttl = x509_ttl
        self.name = name
        # Shared by several fakes: the names of the servers called, in call order.
        self.journal = journal
        self.jwt_ttl = jwt_ttl
        self.authorities = [make_authority()]
        self.jwt_key = generate_private_key()
        self.jwt_tainted = False
        self.state = FakeState()
        self.banned = False
        # (status, message, credo-refusal value or None): every mTLS call is refused so.
        self.refuse: tuple[grpc.StatusCode, str, str | None] | None = None
        self.client_serials: list[int] = []
        self.can_resume = True
        self.fail_batch: grpc.StatusCode | None = None
        self._streams: list[asyncio.Queue[agent_pb2.SyncEntriesResponse | None]] = []
        self._ids = itertools.count(1)
        self._event_ids = itertools.count(1)
        self.event_id = 0
        self.server: grpc.aio.Server | None = None
        self.address = ""
        self.server_spiffe_id = "spiffe://example.org/credo/server"
        self.server_dns_names: tuple[str, ...] = (SERVER_TLS_NAME, "localhost")
        self.join_tokens: set[str] = set()
        self.attest_calls = 0
        self.renew_calls = 0

    # --- control ------------------------------------------------------------------

    async def start(
        self, port: int = 0, *, tls: bool = True, require_client_auth: bool = False
    ) -> str:
        """Serve on 127.0.0.1; with ``tls`` present :meth:`server_svid_pem`, and with
        ``require_client_auth`` demand a client certificate from the fake CA."""
        self.server = grpc.aio.server()
        agent_pb2_grpc.add_AgentServicer_to_server(self, self.server)
        if tls:
            key_pem, chain_pem = self.server_svid_pem()
            credentials = grpc.ssl_server_credentials(
                [(key_pem, chain_pem)],
                root_certificates=self.authorities[0].cert.public_bytes(serialization.Encoding.PEM)
                if require_client_auth
                else None,
                require_client_auth=require_client_auth,
            )
            bound = self.server.add_secure_port(f"127.0.0.1:{port}", credentials)
        else:
            bound = self.server.add_insecure_port(f"127.0.0.1:{port}")
        await self.server.start()
        self.address = f"127.0.0.1:{bound}"
        return self.address

    async def stop(self) -> None:
        for queue in self._streams:
            queue.put_nowait(None)
        if self.server is not None:
            await self.server.stop(None)
            self.server = None

    def server_svid_pem(self) -> tuple[bytes, bytes]:
        """(key PEM, cert PEM) of the server's SVID: ``server_spiffe_id`` + ``server_dns_names``."""
        import ipaddress

        authority = self.authorities[0]
        key = generate_private_key()
        now = datetime.now(UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(authority.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=1))
            .not_valid_after(now + timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.UniformResourceIdentifier(self.server_spiffe_id),
                        *(x509.DNSName(name) for name in self.server_dns_names),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    ]
                ),
                critical=False,
            )
            .sign(authority.key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return key_pem, cert.public_bytes(serialization.Encoding.PEM)

    def _sign_agent(self, spiffe_id: str, csr_der: bytes) -> types_pb2.X509Svid:
        authority = self.signing_authority()
        now = datetime.now(UTC)
        csr = x509.load_der_x509_csr(csr_der)
        cert = x509_svid_template(
            SpiffeId.parse(spiffe_id),
            csr.public_key(),  # type: ignore[arg-type]
            issuer=authority.cert,
            not_before=now,
            not_after=now + timedelta(seconds=self.x509_ttl),
        ).sign(authority.key, hashes.SHA256())
        return types_pb2.X509Svid(
            spiffe_id=spiffe_id,
            cert_chain=[cert.public_bytes(serialization.Encoding.DER)],
            expires_at=int(cert.not_valid_after_utc.timestamp()),
        )

    def agent_svid(self, spiffe_id: SpiffeId = AGENT_ID) -> X509Svid:
        """A fresh agent SVID (and key) signed by the fake CA, as attestation would give."""
        key = generate_private_key()
        csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
        proto = self._sign_agent(
            str(spiffe_id), csr.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)
        )
        return X509Svid.parse(b"".join(proto.cert_chain), private_key_to_pkcs8_pem(key))

    def signing_authority(self) -> Authority:
        return next((a for a in reversed(self.authorities) if not a.tainted), self.authorities[-1])

    def bundle_proto(self) -> types_pb2.Bundle:
        return types_pb2.Bundle(
            trust_domain=str(TD),
            x509_authorities=[
                types_pb2.X509Authority(
                    asn1=a.cert.public_bytes(serialization.Encoding.DER), tainted=a.tainted
                )
                for a in self.authorities
            ],
            jwt_authorities=[
                types_pb2.JwtAuthority(
                    public_key=self.jwt_key.public_key().public_bytes(
                        serialization.Encoding.DER,
                        serialization.PublicFormat.SubjectPublicKeyInfo,
                    ),
                    key_id="jwt-1",
                    tainted=self.jwt_tainted,
                )
            ],
            sequence_number=self.event_id,
        )

    def _push(self, message: agent_pb2.SyncEntriesResponse) -> None:
        self.state.events.append(message)
        for queue in self._streams:
            queue.put_nowait(message)

    def create_entry(
        self,
        spiffe_id: str,
        selectors: list[str],
        *,
        parent_id: str = str(AGENT_ID),
        hint: str = "",
        created_at: int | None = None,
        push: bool = True,
    ) -> str:
        entry_id = f"entry-{next(self._ids):05d}"
        sels = [
            types_pb2.Selector(type=s.split(":", 1)[0], value=s.split(":", 1)[1]) for s in selectors
        ]
        entry = types_pb2.RegistrationEntry(
            id=entry_id,
            spiffe_id=spiffe_id,
            parent_id=parent_id,
            selectors=sels,
            hint=hint,
            created_at=created_at if created_at is not None else int(time.time()),
        )
        self.state.entries[entry_id] = entry
        self.event_id = next(self._event_ids)
        if push:
            self._push(agent_pb2.SyncEntriesResponse(event_id=self.event_id, entries=[entry]))
        return entry_id

    def delete_entry(self, entry_id: str) -> None:
        del self.state.entries[entry_id]
        self.event_id = next(self._event_ids)
        self._push(
            agent_pb2.SyncEntriesResponse(event_id=self.event_id, deleted_entry_ids=[entry_id])
        )

    def bundle_changed(self) -> None:
        """Push the current bundle (after tainting, adding or removing an authority)."""
        self.event_id = next(self._event_ids)
        self._push(
            agent_pb2.SyncEntriesResponse(event_id=self.event_id, bundle=self.bundle_proto())
        )

    def revoke(self, *serials: int) -> bytes:
        """Push a CRL of the first authority revoking ``serials`` (crl_set only); its DER."""
        authority = self.authorities[0]
        now = datetime.now(UTC)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(authority.cert.subject)
            .last_update(now)
            .next_update(now + timedelta(minutes=10))
        )
        for serial in serials:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
            )
        der = builder.sign(authority.key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)
        self.event_id = next(self._event_ids)
        self._push(
            agent_pb2.SyncEntriesResponse(
                event_id=self.event_id,
                crl_set=agent_pb2.CrlSet(crls=[types_pb2.Crl(authority_id="a", der=der)]),
            )
        )
        return der

    def drop_streams(self) -> None:
        """End every open sync stream (as a server restart would)."""
        for queue in self._streams:
            queue.put_nowait(None)

    # --- Agent service ----------------------------------------------------------------

    async def _check_ban(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """What the real server checks on every mTLS call: records the client certificate,
        refuses a banned agent (in words only, as servers before credo-refusal did) and
        applies ``refuse``."""
        pem = context.auth_context().get("x509_pem_cert")
        if pem:
            self.client_serials.append(x509.load_pem_x509_certificate(pem[0]).serial_number)
        if self.banned:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "agent is banned")
        await self._refuse(context)

    async def _refuse(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if self.journal is not None:
            self.journal.append(self.name)
        if self.refuse is not None:
            code, message, reason = self.refuse
            metadata = ((REFUSAL_KEY, reason),) if reason is not None else ()
            await context.abort(code, message, trailing_metadata=metadata)

    async def AttestAgent(self, request: Any, context: Any) -> Any:
        self.attest_calls += 1
        await self._refuse(context)
        token = request.attestation_data.payload.decode()
        if request.attestation_data.type != "join_token" or token not in self.join_tokens:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "join token is unknown or used")
        self.join_tokens.discard(token)
        svid = self._sign_agent(f"spiffe://example.org/credo/agent/join_token/{token}", request.csr)
        return agent_pb2.AttestAgentResponse(svid=svid, bundle=self.bundle_proto())

    async def RenewAgent(self, request: Any, context: Any) -> Any:
        await self._check_ban(context)
        self.renew_calls += 1
        return agent_pb2.RenewAgentResponse(svid=self._sign_agent(str(AGENT_ID), request.csr))

    async def SyncEntries(self, request: Any, context: Any) -> Any:
        await self._check_ban(context)
        self.state.resume_requests.append(request.resume_after_event_id)
        queue: asyncio.Queue[agent_pb2.SyncEntriesResponse | None] = asyncio.Queue()
        self._streams.append(queue)
        try:
            after = request.resume_after_event_id
            if after and self.can_resume:
                for event in self.state.events:
                    if event.event_id > after:
                        yield event
            else:
                yield agent_pb2.SyncEntriesResponse(
                    event_id=self.event_id,
                    full=True,
                    entries=list(self.state.entries.values()),
                    bundle=self.bundle_proto(),
                )
            while True:
                message = await queue.get()
                if message is None:
                    return
                yield message
        finally:
            self._streams.remove(queue)

    async def BatchNewX509SVID(self, request: Any, context: Any) -> Any:
        await self._check_ban(context)
        if self.fail_batch is not None:
            await context.abort(self.fail_batch, "injected failure")
        self.state.batch_sizes.append(len(request.params))
        authority = self.signing_authority()
        now = datetime.now(UTC)
        results = []
        for param in request.params:
            entry = self.state.entries.get(param.entry_id)
            if entry is None:
                results.append(
                    agent_pb2.BatchNewX509SVIDResponse.Result(
                        entry_id=param.entry_id,
                        status=types_pb2.Status(
                            code=grpc.StatusCode.NOT_FOUND.value[0], message="no such entry"
                        ),
                    )
                )
                continue
            csr = x509.load_der_x509_csr(param.csr)
            cert = x509_svid_template(
                SpiffeId.parse(entry.spiffe_id),
                csr.public_key(),  # type: ignore[arg-type]
                issuer=authority.cert,
                not_before=now,
                not_after=now + timedelta(seconds=self.x509_ttl),
            ).sign(authority.key, hashes.SHA256())
            results.append(
                agent_pb2.BatchNewX509SVIDResponse.Result(
                    entry_id=param.entry_id,
                    status=types_pb2.Status(code=0),
                    svid=types_pb2.X509Svid(
                        spiffe_id=entry.spiffe_id,
                        cert_chain=[cert.public_bytes(serialization.Encoding.DER)],
                        expires_at=int(cert.not_valid_after_utc.timestamp()),
                    ),
                )
            )
        return agent_pb2.BatchNewX509SVIDResponse(results=results)

    async def GetBundle(self, request: Any, context: Any) -> Any:
        await self._check_ban(context)
        return agent_pb2.GetBundleResponse(bundle=self.bundle_proto())

    async def NewJWTSVID(self, request: Any, context: Any) -> Any:
        await self._check_ban(context)
        self.state.jwt_calls += 1
        entry = self.state.entries[request.entry_id]
        now = datetime.now(UTC)
        expires = now + timedelta(seconds=self.jwt_ttl)
        token = sign_jwt_svid(
            SpiffeId.parse(entry.spiffe_id),
            list(request.audience),
            key=self.jwt_key,
            key_id="jwt-1",
            expires_at=expires,
            now=now,
        )
        return agent_pb2.NewJWTSVIDResponse(
            svid=types_pb2.JwtSvid(
                spiffe_id=entry.spiffe_id,
                token=token,
                expires_at=int(expires.timestamp()),
                issued_at=int(now.timestamp()),
            )
        )


FAST_BACKOFF = BackoffPolicy(initial=0.05, cap=0.5)


def make_client(
    *addresses: str,
    backoff: BackoffPolicy = FAST_BACKOFF,
    forget_agent_svid: Any = lambda: None,
) -> ServerClient:
    """The agent's real server client for ``addresses`` (no credentials yet)."""
    return ServerClient(
        ServerClientConfig(server_addresses=addresses, trust_domain=TD, backoff=backoff),
        forget_agent_svid=forget_agent_svid,
    )


def attested_client(server: FakeAgentServer, *addresses: str, **settings: Any) -> ServerClient:
    """A real server client holding an agent SVID from ``server``'s CA, as after attestation;
    it calls ``addresses`` (default: the server's own)."""
    client = make_client(*(addresses or (server.address,)), **settings)
    client.set_credentials(server.agent_svid(), (server.authorities[0].cert,))
    return client


class TrustRecorder:
    """Stands in for the agent session as the syncer's trust listener: keeps what it gets
    (and leaves the client's channels alone, so a test may replace the fake's CA)."""

    def __init__(self) -> None:
        self.authorities: tuple[x509.Certificate, ...] = ()
        self.tainted: frozenset[bytes] = frozenset()

    def set_authorities(
        self, authorities: tuple[x509.Certificate, ...], tainted: frozenset[bytes] = frozenset()
    ) -> None:
        self.authorities = authorities
        self.tainted = tainted


class RunningAgent:
    """A cache manager fed by a real syncer, both running on the real server client
    against a fake server."""

    def __init__(
        self, server: FakeAgentServer, client: ServerClient, **cache_settings: Any
    ) -> None:
        from node_agent.cache.manager import CacheConfig, CacheManager
        from node_agent.sync.syncer import EntrySyncer

        self.server = server
        self.client = client
        self.trust = TrustRecorder()
        self.cache = CacheManager(CacheConfig(trust_domain=TD, **cache_settings), client)
        self.syncer = EntrySyncer(client, self.cache, self.trust)
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> RunningAgent:
        self._tasks = [
            asyncio.create_task(self.syncer.run()),
            asyncio.create_task(self.cache.run()),
        ]
        await asyncio.wait_for(self.syncer.synced.wait(), 5)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.client.close()


async def wait_until(predicate: Any, timeout: float = 5.0, interval: float = 0.02) -> None:
    """Poll ``predicate`` until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)
