"""The agent endpoint's ``Agent`` service: requests in, domain calls, responses out.

Each handler turns the request into domain arguments, calls the component that owns the
flow, and turns its result into the response; domain errors become status codes (and
``credo-refusal`` codes) in :mod:`server.api.errors`. Where each flow lives:

================  ==========================================================================
call              flow
================  ==========================================================================
AttestAgent       :mod:`server.agents.attestation` (rate, attestor, bans, re-attestation,
                  alias entries, the agent SVID)
RenewAgent        :mod:`server.agents.authn` (serial rotation)
BatchNewX509SVID  :mod:`server.issuance` (per-entry authorization, pool or in-process)
NewJWTSVID        :mod:`server.issuance`
BatchNewWITSVID   :mod:`server.issuance` (per-entry authorization, workload public keys)
GetBundle         :mod:`server.api.common` (bundles as messages)
SyncEntries       :mod:`server.agents.sync` (full set, resume, diffs, bundle changes)
================  ==========================================================================

Every call except ``AttestAgent`` needs the agent's SVID as the TLS client certificate
(see :mod:`server.api.tls`); :mod:`server.agents.authn` checks it on every call.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Final, TypeVar, cast

import grpc

from credo._proto.credo.server.v1 import agent_pb2, agent_pb2_grpc, types_pb2
from credo._protocol import Refusal
from server import audit
from server.agents.attestation import NodeAttestation
from server.agents.authn import AgentAuthenticator, Caller
from server.agents.sync import AuthorizedEntries, SyncMessage, SyncView, federated_names
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
from server.attestation.errors import UnknownNodeAttestor
from server.issuance import (
    IssueFailed,
    Issuer,
    WitResult,
    WitSvidRequest,
    X509Result,
    X509SvidRequest,
)

__all__ = ["MAX_CSRS_PER_CALL", "AgentService"]

MAX_CSRS_PER_CALL: Final = 500
# A bundle part read for sync messages is shared for at most this long (seconds) at one
# feed position (the revoked JWT list also depends on the time), and among so many keys.
_SHARED_MAX_AGE: Final = 1.0
_SHARED_MAX_KEYS: Final = 64

T = TypeVar("T")


def _x509_result(result: X509Result) -> agent_pb2.BatchNewX509SVIDResponse.Result:
    """A batch item: the SVID, or (a failed one) its status; a signed one has status OK."""
    if isinstance(result, IssueFailed):
        code, message = status_for(result.error)
        return agent_pb2.BatchNewX509SVIDResponse.Result(
            entry_id=result.entry_id,
            status=types_pb2.Status(code=code.value[0], message=message),
        )
    svid = types_pb2.X509Svid(
        spiffe_id=result.spiffe_id, cert_chain=result.cert_chain, expires_at=result.expires_at
    )
    return agent_pb2.BatchNewX509SVIDResponse.Result(entry_id=result.entry_id, svid=svid)


def _wit_result(result: WitResult) -> agent_pb2.BatchNewWITSVIDResponse.Result:
    """A WIT batch item: the WIT-SVID, or (a failed one) its status."""
    if isinstance(result, IssueFailed):
        code, message = status_for(result.error)
        return agent_pb2.BatchNewWITSVIDResponse.Result(
            entry_id=result.entry_id,
            status=types_pb2.Status(code=code.value[0], message=message),
        )
    svid = types_pb2.WitSvid(
        spiffe_id=result.spiffe_id,
        token=result.token,
        issued_at=result.issued_at,
        expires_at=result.expires_at,
    )
    return agent_pb2.BatchNewWITSVIDResponse.Result(entry_id=result.entry_id, svid=svid)


class AgentService(agent_pb2_grpc.AgentServicer):
    """Implements ``credo.server.v1.Agent``."""

    def __init__(
        self,
        *,
        attestation: NodeAttestation,
        authn: AgentAuthenticator,
        authorized: AuthorizedEntries,
        sync: SyncView,
        issuer: Issuer,
        bundles: BundleSource,
        peers: PeerRegistry,
    ) -> None:
        self._attestation = attestation
        self._authn = authn
        self._authorized = authorized
        self._sync = sync
        self._issuer = issuer
        self._bundles = bundles
        self._peers = peers
        # Bundle parts read for sync messages, shared by every stream at the same feed
        # position: a CA rotation wakes all N streams at once, and they read the datastore
        # once, not N times. key -> (feed position, when read, the read in flight or done).
        self._shared: dict[tuple[object, ...], tuple[int, float, asyncio.Future[Any]]] = {}

    async def _shared_read(self, key: tuple[object, ...], read: Callable[[], T]) -> T:
        """``read()`` in a worker thread, or the result of one already made (or under way)
        at the current feed position less than a second ago.

        Every bundle, CRL and JWT-revocation change is an event: a stream woken by it sees
        the feed at (or past) that event, so a read made at the same position is as new.
        """
        position = self._sync.feed_position
        now = time.monotonic()
        held = self._shared.get(key)
        if held is None or held[0] != position or now - held[1] > _SHARED_MAX_AGE:
            if len(self._shared) > _SHARED_MAX_KEYS:
                self._shared.clear()
            future: asyncio.Future[Any] = asyncio.ensure_future(asyncio.to_thread(read))
            held = (position, now, future)
            self._shared[key] = held
            future.add_done_callback(functools.partial(self._forget_failed, key))
        return cast(T, await asyncio.shield(held[2]))

    def _forget_failed(self, key: tuple[object, ...], done: asyncio.Future[Any]) -> None:
        held = self._shared.get(key)
        if held is not None and held[2] is done and (done.cancelled() or done.exception()):
            del self._shared[key]

    async def _caller(self, context: grpc.aio.ServicerContext) -> Caller:
        """The calling agent, by the verified TLS client certificate of its connection."""
        peer = self._peers.lookup(context.peer())
        caller = await self._authn.authenticate(peer.certificate if peer is not None else None)
        # This call's records are by this agent (each call runs in a task of its own).
        audit.identify(audit.Actor("agent", caller.agent_id))
        return caller

    # --- attestation ------------------------------------------------------------------

    @handle_errors
    async def AttestAgent(
        self, request: agent_pb2.AttestAgentRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.AttestAgentResponse:
        peer = self._peers.lookup(context.peer())
        source = peer.host if peer is not None else context.peer()
        try:
            attestor = self._attestation.admit(source, request.attestation_data.type)
        except UnknownNodeAttestor as err:
            raise ApiError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"attestation_data.type: {err}",
                Refusal.ATTESTATION_REFUSED,
            ) from None
        public_key = parse_csr(request.csr, "csr")
        chain = await self._attestation.attest(
            attestor, request.attestation_data.payload, public_key, source
        )
        bundle = await asyncio.to_thread(self._bundles.own)
        return agent_pb2.AttestAgentResponse(svid=x509_svid_to_proto(chain), bundle=bundle)

    @handle_errors
    async def RenewAgent(
        self, request: agent_pb2.RenewAgentRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.RenewAgentResponse:
        caller = await self._caller(context)
        self._authn.admit_signing_call(caller)
        chain = await self._authn.renew(caller, parse_csr(request.csr, "csr"))
        return agent_pb2.RenewAgentResponse(svid=x509_svid_to_proto(chain))

    # --- signing ----------------------------------------------------------------------

    @handle_errors
    async def BatchNewX509SVID(
        self, request: agent_pb2.BatchNewX509SVIDRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.BatchNewX509SVIDResponse:
        caller = await self._caller(context)
        count = len(request.params)
        if count > MAX_CSRS_PER_CALL:
            raise InvalidField("params", f"too many CSRs: {count} > {MAX_CSRS_PER_CALL}")
        self._authn.admit_signing_call(caller)
        requests = [
            X509SvidRequest(entry_id=p.entry_id, csr=p.csr, field=f"params[{i}].csr")
            for i, p in enumerate(request.params)
        ]
        authorized = await self._authorized.including(caller, (r.entry_id for r in requests))
        results = await self._issuer.x509_svids(requests, authorized, caller.agent_id)
        return agent_pb2.BatchNewX509SVIDResponse(results=[_x509_result(r) for r in results])

    @handle_errors
    async def BatchNewWITSVID(
        self, request: agent_pb2.BatchNewWITSVIDRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.BatchNewWITSVIDResponse:
        caller = await self._caller(context)
        count = len(request.params)
        if count > MAX_CSRS_PER_CALL:
            raise InvalidField("params", f"too many public keys: {count} > {MAX_CSRS_PER_CALL}")
        self._authn.admit_signing_call(caller)
        requests = [
            WitSvidRequest(
                entry_id=p.entry_id, public_key=p.public_key, field=f"params[{i}].public_key"
            )
            for i, p in enumerate(request.params)
        ]
        authorized = await self._authorized.including(caller, (r.entry_id for r in requests))
        results = await self._issuer.wit_svids(requests, authorized, caller.agent_id)
        return agent_pb2.BatchNewWITSVIDResponse(results=[_wit_result(r) for r in results])

    @handle_errors
    async def NewJWTSVID(
        self, request: agent_pb2.NewJWTSVIDRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.NewJWTSVIDResponse:
        caller = await self._caller(context)
        if not request.audience or not all(request.audience):
            raise InvalidField("audience", "at least one non-empty audience is required")
        self._authn.admit_signing_call(caller)
        entry = await self._authorized.entry(caller, request.entry_id)
        token = await self._issuer.jwt_svid(entry, request.audience, caller.agent_id)
        return agent_pb2.NewJWTSVIDResponse(
            svid=types_pb2.JwtSvid(
                spiffe_id=entry.spiffe_id,
                token=token,
                issued_at=int(time.time()),
                expires_at=jwt_expiry(token),
            )
        )

    @handle_errors
    async def GetBundle(
        self, request: agent_pb2.GetBundleRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.GetBundleResponse:
        caller = await self._caller(context)
        authorized = self._authorized.of(caller)
        return agent_pb2.GetBundleResponse(
            bundle=await asyncio.to_thread(self._bundles.own),
            federated_bundles=await asyncio.to_thread(
                self._bundles.federated, federated_names(authorized.values())
            ),
        )

    # --- sync -------------------------------------------------------------------------

    @handle_stream_errors
    async def SyncEntries(
        self, request: agent_pb2.SyncEntriesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[agent_pb2.SyncEntriesResponse]:
        caller = await self._caller(context)
        stream = self._sync.stream(caller, request.resume_after_event_id)
        async with contextlib.aclosing(stream) as messages:
            async for message in messages:
                yield await self._sync_response(message)

    async def _sync_response(self, message: SyncMessage) -> agent_pb2.SyncEntriesResponse:
        response = agent_pb2.SyncEntriesResponse(
            event_id=message.event_id,
            full=message.full,
            entries=[entry_to_proto(e) for e in message.entries],
            deleted_entry_ids=message.deleted_entry_ids,
            heartbeat_interval_ms=round(self._sync.heartbeat_interval * 1000),
            entries_digest=message.digest,
        )
        if message.crls:
            response.crl_set.SetInParent()
            response.crl_set.crls.extend(await self._shared_read(("crls",), self._bundles.crls))
        if message.revoked_jwts:
            response.revoked_jwt_set.SetInParent()
            response.revoked_jwt_set.jwts.extend(
                agent_pb2.RevokedJwt(jti=jti, expires_at=exp)
                for jti, exp in await self._shared_read(("jwts",), self._bundles.revoked_jwts)
            )
        if message.bundles is not None:
            names = message.bundles
            response.bundle.CopyFrom(await self._shared_read(("own",), self._bundles.own))
            response.federated_bundles.extend(
                await self._shared_read(
                    ("federated", names), lambda: self._bundles.federated(names)
                )
            )
        return response
