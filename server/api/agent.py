"""The agent endpoint's ``Agent`` service: attestation, sync, and signing for node agents.

Every call except ``AttestAgent`` needs the agent's SVID as the TLS client certificate
(see :mod:`server.api.tls`); :meth:`AgentService._authenticate` then checks, on every
call, that the agent is attested, not banned, and that the certificate's serial is the
agent's current one or the one issued by its last renewal (which, once used, becomes
the current one and retires the previous: SPIRE's rule).

Sync (``SyncEntries``): the first message has ``full=True`` and the whole authorized
set (split over several messages above :data:`SYNC_CHUNK` entries: the first has
``full=True`` and ``event_id=0``, the following ones ``full=False``, and only the last
carries the event id; an agent must not resume from a message with ``event_id=0``).
Then, whenever the change feed moves, the stream sends what changed for this agent:
created or updated entries, ``deleted_entry_ids`` for entries deleted or no longer
authorized, and the bundle when a bundle changed. With ``resume_after_event_id=N`` the
server replays what changed after ``N`` instead of the full set, when it still has
that history; otherwise it sends the full set.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Final

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from credo._proto.credo.server.v1 import agent_pb2, agent_pb2_grpc, types_pb2
from credo.errors import InvalidX509Svid
from credo.selector import Selector
from credo.spiffe_id import SpiffeId, TrustDomain
from credo.x509svid import leaf_spiffe_id
from server.api.common import BundleSource
from server.api.convert import (
    InvalidField,
    entry_to_proto,
    jwt_expiry,
    parse_csr,
    x509_svid_to_proto,
)
from server.api.errors import ApiError, handle_errors, handle_stream_errors, status_for
from server.api.tls import PeerRegistry
from server.attestation import AttestationError, NodeAttestor
from server.authorization import EntryCache, Subscription
from server.ca.ca import CertificateAuthority
from server.ca.errors import CaError
from server.ca.pool import ERROR_INVALID, PoolUnavailable, SigningPool, SignItem
from server.datastore.errors import AlreadyExists
from server.datastore.models import AttestedNode, Event, EventKind, RegistrationEntry
from server.datastore.protocol import DataStore
from server.ratelimit import KeyedRateLimiter
from server.telemetry import KIND_X509, RESULT_FAILURE, RESULT_SUCCESS, Metrics

__all__ = ["MAX_CSRS_PER_CALL", "SYNC_CHUNK", "AgentApiConfig", "AgentService"]

log = logging.getLogger(__name__)

MAX_CSRS_PER_CALL: Final = 500
SYNC_CHUNK: Final = 5000
AGENT_PATH_PREFIX: Final = "/credo/agent/"
_BUNDLE_EVENTS = frozenset({EventKind.BUNDLE_UPDATED, EventKind.BUNDLE_DELETED})
_NODE_EVENTS = frozenset({EventKind.NODE_CREATED, EventKind.NODE_UPDATED, EventKind.NODE_DELETED})


@dataclass(frozen=True)
class AgentApiConfig:
    """Settings of the agent API; TTLs in seconds."""

    trust_domain: TrustDomain
    x509_svid_ttl: int = 3600
    jwt_svid_ttl: int = 300
    agent_svid_ttl: int = 3600
    attestation_rate_limit: float = 1.0
    signing_rate_limit: float = 500.0


@dataclass(frozen=True)
class _Caller:
    agent_id: str
    node: AttestedNode
    certificate: x509.Certificate | None = None


def _serial(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


def _not_after(cert: x509.Certificate) -> int:
    return int(cert.not_valid_after_utc.timestamp())


def _result(
    entry_id: str, code: grpc.StatusCode, message: str
) -> agent_pb2.BatchNewX509SVIDResponse.Result:
    """A failed batch item (a successful one has the default, OK, status)."""
    return agent_pb2.BatchNewX509SVIDResponse.Result(
        entry_id=entry_id, status=types_pb2.Status(code=code.value[0], message=message)
    )


class AgentService(agent_pb2_grpc.AgentServicer):
    """Implements ``credo.server.v1.Agent``."""

    def __init__(
        self,
        config: AgentApiConfig,
        *,
        datastore: DataStore,
        ca: CertificateAuthority,
        bundles: BundleSource,
        cache: EntryCache,
        attestors: Mapping[str, NodeAttestor],
        peers: PeerRegistry,
        metrics: Metrics | None = None,
        stopping: asyncio.Event | None = None,
        signing_pool: SigningPool | None = None,
    ) -> None:
        self._config = config
        self._pool = signing_pool
        self._ds = datastore
        self._ca = ca
        self._bundles = bundles
        self._cache = cache
        self._attestors = dict(attestors)
        self._peers = peers
        self._metrics = metrics
        self._stopping = stopping or asyncio.Event()
        # Bursts of a few attestations (an agent fleet restarting behind one NAT) are
        # allowed; the sustained rate is the configured one.
        self._attest_limiter = KeyedRateLimiter(
            config.attestation_rate_limit, burst=max(5.0, config.attestation_rate_limit)
        )
        self._sign_limiter = KeyedRateLimiter(config.signing_rate_limit)
        self._authorized: OrderedDict[
            str, tuple[int, tuple[object, ...], dict[str, RegistrationEntry], float]
        ]
        self._authorized = OrderedDict()
        # Authority certificates by DER, and (authority DER, SVID signature) pairs verified.
        self._ca_certs: dict[bytes, x509.Certificate] = {}
        self._issuer_memo: OrderedDict[tuple[bytes, bytes], None] = OrderedDict()

    # --- caller identity --------------------------------------------------------------

    async def _authenticate(self, context: grpc.aio.ServicerContext) -> _Caller:
        """The calling agent, checked against its datastore record (every call)."""
        peer = self._peers.lookup(context.peer())
        if peer is None or peer.certificate is None:
            raise ApiError(
                grpc.StatusCode.UNAUTHENTICATED,
                "this call needs the agent's SVID as the TLS client certificate; attest first",
            )
        cert = peer.certificate
        try:
            spiffe_id = leaf_spiffe_id(cert)
        except InvalidX509Svid as err:
            raise ApiError(grpc.StatusCode.UNAUTHENTICATED, f"client certificate: {err}") from None
        if not (
            spiffe_id.is_member_of(self._config.trust_domain)
            and spiffe_id.path.startswith(AGENT_PATH_PREFIX)
        ):
            raise ApiError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"caller {spiffe_id} is not an agent of trust domain {self._config.trust_domain}",
            )
        if cert.not_valid_after_utc <= datetime.now(UTC):
            raise ApiError(grpc.StatusCode.UNAUTHENTICATED, "agent SVID expired; attest again")
        if not await asyncio.to_thread(self._issued_by_live_authority, cert):
            # The TLS handshake verified it against the bundle of its time; the
            # authority has since been revoked (or pruned): no longer trusted.
            raise ApiError(
                grpc.StatusCode.UNAUTHENTICATED,
                "agent SVID was signed by an authority that is no longer trusted; attest again",
            )
        agent_id = str(spiffe_id)
        node = await asyncio.to_thread(self._ds.fetch_attested_node, agent_id)
        if node is None:
            raise ApiError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"agent {agent_id} is not attested (it may have been evicted); attest again",
            )
        if node.banned:
            raise ApiError(grpc.StatusCode.PERMISSION_DENIED, "agent is banned")
        serial = _serial(cert)
        if serial == node.cert_serial:
            return _Caller(agent_id, node, cert)
        if node.new_cert_serial and serial == node.new_cert_serial:
            # The agent uses its renewed SVID: from now on only that one is accepted.
            node = await asyncio.to_thread(
                self._ds.update_attested_node,
                replace(
                    node,
                    cert_serial=node.new_cert_serial,
                    cert_not_after=node.new_cert_not_after,
                    new_cert_serial="",
                    new_cert_not_after=0,
                ),
            )
            return _Caller(agent_id, node, cert)
        raise ApiError(grpc.StatusCode.PERMISSION_DENIED, "agent SVID is not current")

    def _issued_by_live_authority(self, cert: x509.Certificate) -> bool:
        """True if ``cert`` was signed by an X.509 authority still in the CA journal."""
        for row in self._ds.list_authorities("x509"):
            der = bytes(row.public_data)
            memo_key = (der, cert.signature)
            if memo_key in self._issuer_memo:
                return True
            ca_cert = self._ca_certs.get(der)
            if ca_cert is None:
                ca_cert = self._ca_certs[der] = x509.load_der_x509_certificate(der)
            if ca_cert.subject != cert.issuer:
                continue
            try:
                cert.verify_directly_issued_by(ca_cert)
            except (ValueError, TypeError, InvalidSignature):
                continue
            self._issuer_memo[memo_key] = None
            while len(self._issuer_memo) > 4096:
                self._issuer_memo.popitem(last=False)
            return True
        return False

    def _check_sign_rate(self, agent_id: str) -> None:
        if not self._sign_limiter.allow(agent_id):
            raise ApiError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many signing calls from {agent_id}; at most "
                f"{self._config.signing_rate_limit:g} per second",
            )

    def _authorized_for(self, caller: _Caller) -> dict[str, RegistrationEntry]:
        """The caller's authorized entries, memoised per cache version and node selectors.

        A memo is good only until the first expiry among the entries (and node aliases)
        it relied on: an entry that expires later is no longer authorized, nor its children.
        """
        key = (caller.node.selectors,)
        now = time.time()
        cached = self._authorized.get(caller.agent_id)
        if (
            cached is not None
            and cached[0] == self._cache.version
            and cached[1] == key
            and now < cached[3]
        ):
            self._authorized.move_to_end(caller.agent_id)
            return cached[2]
        index = self._cache.index
        found = index.authorized(caller.agent_id, caller.node.selectors, now)
        valid_until = min(
            [e.expires_at for e in found.values() if e.expires_at]
            + [
                a.expires_at
                for a in index.matching_aliases(caller.node.selectors)
                if a.expires_at > now
            ],
            default=float("inf"),
        )
        self._authorized[caller.agent_id] = (self._cache.version, key, found, valid_until)
        while len(self._authorized) > 1024:
            self._authorized.popitem(last=False)
        return found

    # --- attestation ------------------------------------------------------------------

    @handle_errors
    async def AttestAgent(
        self, request: agent_pb2.AttestAgentRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.AttestAgentResponse:
        peer = self._peers.lookup(context.peer())
        source = peer.host if peer is not None else context.peer()
        if not self._attest_limiter.allow(source):
            raise ApiError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many node attestations from {source}; at most "
                f"{self._config.attestation_rate_limit:g} per second",
            )
        kind = request.attestation_data.type
        attestor = self._attestors.get(kind)
        if attestor is None:
            known = ", ".join(sorted(self._attestors)) or "none"
            raise InvalidField(
                "attestation_data.type",
                f"unknown node attestor {kind!r}; this server supports: {known}",
            )
        public_key = parse_csr(request.csr, "csr")
        try:
            result = await asyncio.to_thread(attestor.attest, request.attestation_data.payload)
        except AttestationError as err:
            self._count_attestation(RESULT_FAILURE)
            log.warning(
                "node attestation refused",
                extra={"attestation_type": kind, "source": source, "error": str(err)},
            )
            raise
        agent_id = str(result.agent_id)
        existing = await asyncio.to_thread(self._ds.fetch_attested_node, agent_id)
        if existing is not None and existing.banned:
            self._count_attestation(RESULT_FAILURE)
            log.warning("banned agent refused", extra={"agent_id": agent_id, "source": source})
            raise ApiError(grpc.StatusCode.PERMISSION_DENIED, "agent is banned")
        chain = await asyncio.to_thread(
            self._ca.sign_agent_svid, result.agent_id, public_key, self._config.agent_svid_ttl
        )
        node = AttestedNode(
            spiffe_id=agent_id,
            attestation_type=attestor.type,
            selectors=tuple(result.selectors),
            cert_serial=_serial(chain[0]),
            cert_not_after=_not_after(chain[0]),
        )
        await asyncio.to_thread(self._record_node, node, existing is not None)
        if result.alias_id is not None:
            await asyncio.to_thread(self._create_alias, agent_id, str(result.alias_id))
        self._count_attestation(RESULT_SUCCESS)
        log.info(
            "attested agent",
            extra={"agent_id": agent_id, "attestation_type": attestor.type, "source": source},
        )
        bundle = await asyncio.to_thread(self._bundles.own)
        return agent_pb2.AttestAgentResponse(svid=x509_svid_to_proto(chain), bundle=bundle)

    def _record_node(self, node: AttestedNode, exists: bool) -> None:
        if not exists:
            try:
                self._ds.create_attested_node(node)
                return
            except AlreadyExists:
                pass  # re-attested concurrently: update below
        self._ds.update_attested_node(node)

    def _create_alias(self, agent_id: str, alias_id: str) -> None:
        entry = RegistrationEntry(
            spiffe_id=alias_id,
            parent_id=agent_id,
            selectors=(Selector("spiffe_id", agent_id),),
        )
        try:
            created = self._ds.create_registration_entry(entry)
        except AlreadyExists:
            return
        log.info(
            "created node alias entry",
            extra={"agent_id": agent_id, "spiffe_id": alias_id, "entry_id": created.id},
        )

    def _count_attestation(self, result: str) -> None:
        if self._metrics is not None:
            self._metrics.node_attestations.labels(result).inc()

    @handle_errors
    async def RenewAgent(
        self, request: agent_pb2.RenewAgentRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.RenewAgentResponse:
        caller = await self._authenticate(context)
        self._check_sign_rate(caller.agent_id)
        public_key = parse_csr(request.csr, "csr")
        chain = await asyncio.to_thread(
            self._ca.sign_agent_svid,
            SpiffeId.parse(caller.agent_id),
            public_key,
            self._config.agent_svid_ttl,
        )
        await asyncio.to_thread(
            self._ds.update_attested_node,
            replace(
                caller.node,
                new_cert_serial=_serial(chain[0]),
                new_cert_not_after=_not_after(chain[0]),
            ),
        )
        log.info("renewed agent SVID", extra={"agent_id": caller.agent_id})
        return agent_pb2.RenewAgentResponse(svid=x509_svid_to_proto(chain))

    # --- signing ----------------------------------------------------------------------

    @handle_errors
    async def BatchNewX509SVID(
        self, request: agent_pb2.BatchNewX509SVIDRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.BatchNewX509SVIDResponse:
        caller = await self._authenticate(context)
        count = len(request.params)
        if count > MAX_CSRS_PER_CALL:
            raise InvalidField("params", f"too many CSRs: {count} > {MAX_CSRS_PER_CALL}")
        self._check_sign_rate(caller.agent_id)
        authorized = self._authorized_for(caller)
        if any(p.entry_id not in authorized for p in request.params):
            # The entry may be newer than the cache: catch up once before refusing.
            await self._cache.catch_up()
            authorized = self._authorized_for(caller)
        now = time.time()
        results: list[agent_pb2.BatchNewX509SVIDResponse.Result | None] = [None] * count
        work: list[tuple[int, RegistrationEntry, bytes]] = []
        for i, params in enumerate(request.params):
            entry = authorized.get(params.entry_id)
            if entry is None or (entry.expires_at and entry.expires_at <= now):
                results[i] = _result(
                    params.entry_id,
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"entry {params.entry_id!r} is not authorized for this agent",
                )
            else:
                work.append((i, entry, params.csr))
        for i, result in await self._sign_work(work):
            results[i] = result
        return agent_pb2.BatchNewX509SVIDResponse(results=[r for r in results if r is not None])

    async def _sign_work(
        self, work: list[tuple[int, RegistrationEntry, bytes]]
    ) -> list[tuple[int, agent_pb2.BatchNewX509SVIDResponse.Result]]:
        """Sign the authorized items: in the worker pool when the batch is large enough."""
        pool = self._pool
        if pool is not None and pool.usable(len(work)):
            try:
                return await self._sign_pooled(pool, work)
            except PoolUnavailable:
                pass  # the pool logged why; sign this batch here
        # CSR checks and signing are CPU-bound: keep them off the event loop.
        return await asyncio.to_thread(self._sign_batch, work)

    async def _sign_pooled(
        self, pool: SigningPool, work: list[tuple[int, RegistrationEntry, bytes]]
    ) -> list[tuple[int, agent_pb2.BatchNewX509SVIDResponse.Result]]:
        """:meth:`_sign_batch` in the worker processes; same results, metrics once per batch."""
        try:
            ca, now = self._ca.x509_snapshot()
        except CaError:
            raise PoolUnavailable("no active x509 authority") from None  # per-item errors
        default_ttl = self._config.x509_svid_ttl
        items: list[SignItem] = [
            (
                f"params[{i}].csr",
                csr,
                entry.spiffe_id,
                tuple(entry.dns_names),
                entry.x509_svid_ttl or default_ttl,
            )
            for i, entry, csr in work
        ]
        started = time.perf_counter()
        signed = await pool.sign(ca, now, items)
        seconds = time.perf_counter() - started
        chain = [c.public_bytes(serialization.Encoding.DER) for c in ca.chain]
        out = []
        count = 0
        for (i, entry, _), (leaf, expires_at, error, message) in zip(work, signed, strict=True):
            if leaf is None:
                code = (
                    grpc.StatusCode.INVALID_ARGUMENT
                    if error == ERROR_INVALID
                    else grpc.StatusCode.FAILED_PRECONDITION
                )
                out.append((i, _result(entry.id, code, message)))
                continue
            count += 1
            svid = types_pb2.X509Svid(
                spiffe_id=entry.spiffe_id, cert_chain=[leaf, *chain], expires_at=expires_at
            )
            out.append((i, agent_pb2.BatchNewX509SVIDResponse.Result(entry_id=entry.id, svid=svid)))
        if count and self._metrics is not None:
            self._metrics.svids_signed.labels(KIND_X509).inc(count)
            # One observation per batch: the mean time per SVID across the workers.
            self._metrics.signing_seconds.labels(KIND_X509).observe(seconds / count)
        log.debug(
            "signed x509-svid batch in workers",
            extra={"count": count, "failed": len(work) - count, "authority_id": ca.authority_id},
        )
        return out

    def _sign_batch(
        self, work: list[tuple[int, RegistrationEntry, bytes]]
    ) -> list[tuple[int, agent_pb2.BatchNewX509SVIDResponse.Result]]:
        """Check each CSR and sign it with its entry's SPIFFE ID, DNS names and TTL."""
        out = []
        default_ttl = self._config.x509_svid_ttl
        ids: dict[str, SpiffeId] = {}
        for i, entry, csr in work:
            try:
                public_key = parse_csr(csr, f"params[{i}].csr")
                spiffe_id = ids.get(entry.spiffe_id)
                if spiffe_id is None:
                    spiffe_id = ids[entry.spiffe_id] = SpiffeId.parse(entry.spiffe_id)
                chain = self._ca.sign_x509_svid(
                    spiffe_id, public_key, entry.x509_svid_ttl or default_ttl, entry.dns_names
                )
            except (ValueError, CaError) as err:
                code, message = status_for(err)
                out.append((i, _result(entry.id, code, message)))
                continue
            svid = x509_svid_to_proto(chain, entry.spiffe_id)
            out.append((i, agent_pb2.BatchNewX509SVIDResponse.Result(entry_id=entry.id, svid=svid)))
        return out

    @handle_errors
    async def NewJWTSVID(
        self, request: agent_pb2.NewJWTSVIDRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.NewJWTSVIDResponse:
        caller = await self._authenticate(context)
        if not request.audience or not all(request.audience):
            raise InvalidField("audience", "at least one non-empty audience is required")
        self._check_sign_rate(caller.agent_id)
        authorized = self._authorized_for(caller)
        if request.entry_id not in authorized:
            await self._cache.catch_up()
            authorized = self._authorized_for(caller)
        entry = authorized.get(request.entry_id)
        if entry is None:
            raise ApiError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"entry {request.entry_id!r} is not authorized for this agent",
            )
        ttl = entry.jwt_svid_ttl or self._config.jwt_svid_ttl
        token = await asyncio.to_thread(
            self._ca.sign_jwt_svid, SpiffeId.parse(entry.spiffe_id), list(request.audience), ttl
        )
        now = int(time.time())
        return agent_pb2.NewJWTSVIDResponse(
            svid=types_pb2.JwtSvid(
                spiffe_id=entry.spiffe_id, token=token, issued_at=now, expires_at=jwt_expiry(token)
            )
        )

    @handle_errors
    async def GetBundle(
        self, request: agent_pb2.GetBundleRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.GetBundleResponse:
        caller = await self._authenticate(context)
        authorized = self._authorized_for(caller)
        return agent_pb2.GetBundleResponse(
            bundle=await asyncio.to_thread(self._bundles.own),
            federated_bundles=await asyncio.to_thread(
                self._bundles.federated, _federated_names(authorized.values())
            ),
        )

    # --- sync -------------------------------------------------------------------------

    @handle_stream_errors
    async def SyncEntries(
        self, request: agent_pb2.SyncEntriesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[agent_pb2.SyncEntriesResponse]:
        caller = await self._authenticate(context)
        agent_id, node = caller.agent_id, caller.node
        sub = self._cache.subscribe()
        try:
            # Read-your-writes: an entry committed just before this call is in the first
            # message, not only in the push that follows the cache's next wake-up.
            await self._cache.catch_up()
            authorized = self._cache.index.authorized(agent_id, node.selectors)
            event_id = self._cache.event_id
            federated = _federated_names(authorized.values())
            bundle = await asyncio.to_thread(self._bundles.own)
            fed_bundles = await asyncio.to_thread(self._bundles.federated, federated)
            resume = request.resume_after_event_id
            candidates = self._cache.changed_since(resume, agent_id) if resume > 0 else None
            if candidates is not None:
                yield agent_pb2.SyncEntriesResponse(
                    event_id=event_id,
                    full=False,
                    entries=[
                        entry_to_proto(authorized[i]) for i in sorted(candidates) if i in authorized
                    ],
                    deleted_entry_ids=sorted(i for i in candidates if i not in authorized),
                    bundle=bundle,
                    federated_bundles=fed_bundles,
                )
            else:
                for message in _full_messages(
                    list(authorized.values()), event_id, bundle, fed_bundles
                ):
                    yield message
            log.info(
                "agent sync started",
                extra={
                    "agent_id": agent_id,
                    "entries": len(authorized),
                    "event_id": event_id,
                    "resumed": candidates is not None,
                },
            )
            sent = {i: e.revision_number for i, e in authorized.items()}
            cert = caller.certificate
            expires = cert.not_valid_after_utc.timestamp() if cert is not None else None
            while True:
                events = await self._next_events(sub, until=expires)
                if expires is not None and time.time() >= expires:
                    # The stream outlived the SVID it was opened with: the agent must come
                    # back with its renewed one (its next call would be refused anyway).
                    raise ApiError(grpc.StatusCode.UNAUTHENTICATED, "agent SVID expired; reconnect")
                if (
                    cert is not None
                    and any(e.kind in _BUNDLE_EVENTS for e in events)
                    and not await asyncio.to_thread(self._issued_by_live_authority, cert)
                ):
                    raise ApiError(
                        grpc.StatusCode.UNAUTHENTICATED,
                        "agent SVID was signed by an authority that is no longer trusted",
                    )
                if any(e.kind in _NODE_EVENTS and e.subject == agent_id for e in events):
                    fresh = await asyncio.to_thread(self._ds.fetch_attested_node, agent_id)
                    if fresh is None:
                        raise ApiError(grpc.StatusCode.PERMISSION_DENIED, "agent was evicted")
                    if fresh.banned:
                        raise ApiError(grpc.StatusCode.PERMISSION_DENIED, "agent is banned")
                    node = fresh
                authorized = self._cache.index.authorized(agent_id, node.selectors)
                changed = [
                    entry_to_proto(e)
                    for i, e in authorized.items()
                    if sent.get(i) != e.revision_number
                ]
                deleted = sorted(i for i in sent if i not in authorized)
                names = _federated_names(authorized.values())
                bundle_changed = any(e.kind in _BUNDLE_EVENTS for e in events)
                message = agent_pb2.SyncEntriesResponse(
                    event_id=self._cache.event_id,
                    full=False,
                    entries=changed,
                    deleted_entry_ids=deleted,
                )
                if bundle_changed or names != federated:
                    message.bundle.CopyFrom(await asyncio.to_thread(self._bundles.own))
                    message.federated_bundles.extend(
                        await asyncio.to_thread(self._bundles.federated, names)
                    )
                    federated = names
                elif not changed and not deleted:
                    continue
                sent = {i: e.revision_number for i, e in authorized.items()}
                yield message
        finally:
            self._cache.unsubscribe(sub)

    async def _next_events(self, sub: Subscription, until: float | None = None) -> list[Event]:
        """The next events for ``sub``; ``[]`` once the wall-clock time ``until`` is reached."""
        waiter = asyncio.ensure_future(sub.wait())
        stopper = asyncio.ensure_future(self._stopping.wait())
        timeout = None if until is None else max(0.0, until - time.time())
        try:
            await asyncio.wait(
                {waiter, stopper}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            stopper.cancel()
        if stopper.done() and not stopper.cancelled() and not waiter.done():
            waiter.cancel()
            raise ApiError(grpc.StatusCode.UNAVAILABLE, "server is shutting down; reconnect")
        if not waiter.done():
            waiter.cancel()
            return []
        return waiter.result()


def _federated_names(entries: Iterable[RegistrationEntry]) -> frozenset[str]:
    names: set[str] = set()
    for entry in entries:
        names.update(entry.federates_with)
    return frozenset(names)


def _full_messages(
    entries: list[RegistrationEntry],
    event_id: int,
    bundle: types_pb2.Bundle,
    federated: list[types_pb2.Bundle],
) -> list[agent_pb2.SyncEntriesResponse]:
    chunks = [entries[i : i + SYNC_CHUNK] for i in range(0, len(entries), SYNC_CHUNK)] or [[]]
    messages = []
    for n, chunk in enumerate(chunks):
        last = n == len(chunks) - 1
        messages.append(
            agent_pb2.SyncEntriesResponse(
                event_id=event_id if last else 0,
                full=n == 0,
                entries=[entry_to_proto(e) for e in chunk],
                bundle=bundle if n == 0 else None,
                federated_bundles=federated if n == 0 else [],
            )
        )
    return messages
