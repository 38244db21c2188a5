"""The SPIFFE Workload API (``SpiffeWorkloadAPI``) on ``grpc.aio``.

Every call:

1. must carry metadata ``workload.spiffe.io: true`` (else INVALID_ARGUMENT);
2. is attributed to the process that opened the connection (via :class:`PeerLookup`,
   fed by :class:`~node_agent.workload.tracker.PeerTrackingProxy`), attested into
   selectors, and then re-checked to still be that process, and (on a connection's first
   call) to be the only process holding the connection (else PERMISSION_DENIED) —
   attestation happens per call, as in SPIRE;
3. gets only the identities whose entries match those selectors (none: PERMISSION_DENIED
   ``no identity issued``).

Streams send the full current state at once and again on every change (``FetchWITSVID``
also when the agent renews a WIT-SVID, at about half its lifetime). This is the only
module that maps Credo errors to gRPC status codes.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, replace
from typing import Any, Final, NoReturn, Protocol, TypeAlias

import grpc
from google.protobuf import struct_pb2
from grpc import aio

from credo._audit import Actor, PendingRecord
from credo._proto import workload_pb2, workload_pb2_grpc
from credo.bundle import Bundle
from credo.errors import CredoError, InvalidSpiffeId
from credo.jwtsvid import JwtSvid
from credo.selector import Selector
from credo.spiffe_id import SpiffeId, TrustDomain
from node_agent.audit_log import DeliveryLog
from node_agent.cache.errors import JwtSvidRateLimited, JwtSvidRefused, WitSvidUnavailable
from node_agent.workload.attestor import WorkloadAttestor
from node_agent.workload.errors import (
    AttestationFailed,
    AttestationRefused,
    PeerChanged,
    PeerUnknown,
)
from node_agent.workload.peer import HolderScans, PeerProcess
from node_agent.workload_api.manager import Identity, Manager, WorkloadUpdate

__all__ = [
    "SECURITY_HEADER",
    "PeerLookup",
    "WorkloadApiMetrics",
    "WorkloadApiServicer",
    "X509ResponseCache",
]

log = logging.getLogger(__name__)

SECURITY_HEADER = "workload.spiffe.io"

_Context: TypeAlias = "aio.ServicerContext[Any, Any]"


class PeerLookup(Protocol):
    """Maps a handler's ``context.peer()`` to the pinned calling process."""

    def lookup(self, peer: str) -> PeerProcess | None:
        """The caller behind ``peer``, or None if unknown."""
        ...


def _td_key(trust_domain: TrustDomain | str) -> str:
    """Bundle map key: the trust domain's SPIFFE ID, ``spiffe://<name>``."""
    td = trust_domain if isinstance(trust_domain, TrustDomain) else TrustDomain.parse(trust_domain)
    return td.id_string()


def _federated_x509(federated: Mapping[str, Bundle]) -> dict[str, bytes]:
    """Federated X.509 bundles by trust domain ID, leaving out those with no X.509 authority.

    A federated trust domain may publish JWT authorities only (X509-SVID 6.2); an empty entry
    would make standard clients (py-spiffe, go-spiffe) refuse the caller's whole X.509 context.
    """
    return {
        _td_key(name): b.x509_bundle().marshal_der()
        for name, b in federated.items()
        if b.x509_authorities
    }


def _x509_bundles(own: Bundle, federated: Mapping[str, Bundle]) -> dict[str, bytes]:
    out = _federated_x509(federated)
    out[_td_key(own.trust_domain)] = own.x509_bundle().marshal_der()
    return out


def _jwt_bundles(own: Bundle, federated: Mapping[str, Bundle]) -> dict[str, bytes]:
    out = {
        _td_key(name): b.jwt_bundle().marshal()
        for name, b in federated.items()
        if b.jwt_authorities
    }
    out[_td_key(own.trust_domain)] = own.jwt_bundle().marshal()
    return out


def _wit_bundles(own: Bundle, federated: Mapping[str, Bundle]) -> dict[str, str]:
    """WIT bundles (JWKS text) by trust domain ID: the own one, and federated ones with keys."""
    out = {
        _td_key(name): b.wit_bundle().marshal().decode()
        for name, b in federated.items()
        if b.wit_authorities
    }
    out[_td_key(own.trust_domain)] = own.wit_bundle().marshal().decode()
    return out


def _x509_svid_response(update: WorkloadUpdate) -> workload_pb2.X509SVIDResponse:
    bundle_der = update.bundle.x509_bundle().marshal_der()
    svids = [
        workload_pb2.X509SVID(
            spiffe_id=str(identity.spiffe_id),
            x509_svid=identity.svid.marshal_chain_der(),
            x509_svid_key=identity.svid.marshal_key_der(),
            bundle=bundle_der,
            hint=identity.hint,
        )
        for identity in update.identities
    ]
    return workload_pb2.X509SVIDResponse(
        svids=svids,
        crl=list(update.crls),
        federated_bundles=_federated_x509(update.federated_bundles),
    )


class X509ResponseCache:
    """Built ``X509SVIDResponse`` messages, by what they are made of (least recently used
    dropped beyond :attr:`SIZE`).

    Building one serializes every SVID's chain and private key and the bundles again; many
    workloads with the same identities, and every new connection of one workload, get the
    same message. The key is the SPIFFE IDs and hints with the identities (``id()``) of the
    SVID and bundle objects, which are immutable: a rotated SVID or a new bundle is a new
    object, so a new key. Each entry keeps those objects alive, so no other object can take
    their ids while it is cached.
    """

    SIZE: Final = 64

    def __init__(self) -> None:
        self._entries: OrderedDict[
            tuple[object, ...], tuple[tuple[object, ...], workload_pb2.X509SVIDResponse]
        ] = OrderedDict()
        self.built = 0  # responses built, not found here (for tests)

    def response(self, update: WorkloadUpdate) -> workload_pb2.X509SVIDResponse:
        """The response for ``update``, built once per distinct content."""
        federated = update.federated_bundles
        key = (
            tuple((str(i.spiffe_id), id(i.svid), i.hint) for i in update.identities),
            id(update.bundle),
            update.crls,
            tuple((name, id(b)) for name, b in federated.items()),
        )
        entries = self._entries
        hit = entries.get(key)
        if hit is not None:
            entries.move_to_end(key)
            return hit[1]
        response = _x509_svid_response(update)
        self.built += 1
        alive = (tuple(i.svid for i in update.identities), update.bundle, tuple(federated.values()))
        entries[key] = (alive, response)
        while len(entries) > self.SIZE:
            entries.popitem(last=False)
        return response


class WorkloadApiMetrics(Protocol):
    """Where the handler counts calls and refusals (:class:`node_agent.telemetry.AgentMetrics`)."""

    def call(self, method: str) -> None: ...

    def refused(self, method: str, code: str) -> None: ...


@dataclass(frozen=True)
class _Caller:
    """An attested caller of one Workload API call."""

    method: str
    pid: int
    uid: int
    selectors: frozenset[Selector]
    metrics: WorkloadApiMetrics | None = None


async def _refuse(
    context: _Context,
    caller: _Caller,
    message: str,
    reason: str,
    code: grpc.StatusCode = grpc.StatusCode.PERMISSION_DENIED,
) -> NoReturn:
    """Answer ``code`` (PERMISSION_DENIED) and log who was refused, what they had and why."""
    log.info(
        "workload call refused",
        extra={
            "method": caller.method,
            "pid": caller.pid,
            "uid": caller.uid,
            "selectors": sorted(str(s) for s in caller.selectors),
            "reason": reason,
        },
    )
    if caller.metrics is not None:
        caller.metrics.refused(caller.method, code.name)
    await _abort(context, code, message)


# How a server's refusal of a JWT-SVID reaches the workload: its status where the workload
# can act on it (a bad request, an identity it may not have), else UNAVAILABLE.
_JWT_REFUSAL_STATUS = {
    "INVALID_ARGUMENT": grpc.StatusCode.INVALID_ARGUMENT,
    "PERMISSION_DENIED": grpc.StatusCode.PERMISSION_DENIED,
    "NOT_FOUND": grpc.StatusCode.PERMISSION_DENIED,
}

_NO_MATCH = "no registration entry matches the caller's selectors"


def _why_none(update: WorkloadUpdate) -> str:
    """Why a workload has no identity: no entry matches, or none has an SVID yet."""
    if update.unsigned:
        return (
            f"{update.unsigned} matching entr{'y has' if update.unsigned == 1 else 'ies have'} "
            "no X509-SVID yet (not signed by the server, or refused)"
        )
    return _NO_MATCH


class WorkloadApiServicer(workload_pb2_grpc.SpiffeWorkloadAPIServicer):
    """Serves the Workload API from a :class:`Manager`, attesting callers with an attestor.

    ``peers`` identifies the caller of each call. With ``allow_unauthenticated_verifiers``
    the bundle streams also serve callers that have no identity (SPIRE's option of the same
    name): they receive the own and every federated bundle.
    """

    def __init__(
        self,
        manager: Manager,
        attestor: WorkloadAttestor,
        peers: PeerLookup,
        *,
        allow_unauthenticated_verifiers: bool = False,
        metrics: WorkloadApiMetrics | None = None,
        delivery_log: DeliveryLog | None = None,
    ) -> None:
        self._deliveries = delivery_log
        self._manager = manager
        self._attestor = attestor
        self._peers = peers
        self._allow_unauthenticated_verifiers = allow_unauthenticated_verifiers
        self._metrics = metrics
        self._holder_scans = HolderScans()
        self.x509_responses = X509ResponseCache()

    def close(self) -> None:
        """Stop the holder scan process (started at the first new connection's call)."""
        self._holder_scans.close()

    # -- shared steps -----------------------------------------------------------------

    async def _caller(self, context: _Context, method: str) -> _Caller:
        """Check the security header, attest the caller, and return it with its selectors."""
        if self._metrics is not None:
            self._metrics.call(method)
        metadata = context.invocation_metadata() or ()
        if not any(k == SECURITY_HEADER and v == "true" for k, v in metadata):
            await _abort(
                context, grpc.StatusCode.INVALID_ARGUMENT, "security header missing from request"
            )
        peer = self._peers.lookup(context.peer())
        if peer is None:
            log.warning("workload call from an untracked connection", extra={"method": method})
            await _abort(context, grpc.StatusCode.PERMISSION_DENIED, "caller credentials unknown")
        started = time.monotonic()
        try:
            selectors = await self._attestor.attest(peer.pid)
            peer.ensure_same_process()
            # The exec race: a child that kept the socket of a process now running a
            # trusted binary must not speak for it (once per connection; scans /proc,
            # one scan shared by the connections that ask at the same time).
            await peer.ensure_sole_holder_shared(self._holder_scans)
        except (PeerChanged, PeerUnknown) as err:
            log.warning(
                "workload caller changed during attestation",
                extra={"method": method, "pid": peer.pid, "reason": err.reason},
            )
            await _abort(context, grpc.StatusCode.PERMISSION_DENIED, str(err))
        except (AttestationFailed, AttestationRefused) as err:
            try:
                peer.ensure_same_process()
            except PeerChanged as changed:
                await _abort(context, grpc.StatusCode.PERMISSION_DENIED, str(changed))
            if isinstance(err, AttestationRefused):
                log.warning(
                    "workload attestation refused",
                    extra={"method": method, "pid": peer.pid, "reason": err.reason},
                )
                await _abort(context, grpc.StatusCode.PERMISSION_DENIED, str(err))
            log.error(
                "workload attestation failed",
                extra={"method": method, "pid": peer.pid, "reason": err.reason},
            )
            await _abort(context, grpc.StatusCode.INTERNAL, str(err))
        log.debug(
            "workload attested",
            extra={
                "method": method,
                "pid": peer.pid,
                "uid": peer.credentials.uid,
                "selectors": len(selectors),
                "seconds": round(time.monotonic() - started, 6),
            },
        )
        return _Caller(method, peer.pid, peer.credentials.uid, frozenset(selectors), self._metrics)

    # -- X.509 ------------------------------------------------------------------------

    async def FetchX509SVID(
        self, request: workload_pb2.X509SVIDRequest, context: _Context
    ) -> AsyncIterator[workload_pb2.X509SVIDResponse]:
        """Stream the caller's X509-SVIDs: once at once, then on every change."""
        caller = await self._caller(context, "FetchX509SVID")
        subscription = self._manager.subscribe(caller.selectors)
        try:
            previous: workload_pb2.X509SVIDResponse | None = None
            delivered: set[int] = set()
            while True:
                update = await subscription.next()
                if not update.identities:
                    await _refuse(context, caller, "no identity issued", _why_none(update))
                response = self.x509_responses.response(update)
                if response is previous or response == previous:
                    continue
                previous = response
                self._record_x509(caller, update, delivered)
                log.debug(
                    "sending X509-SVIDs",
                    extra={"spiffe_ids": [str(i.spiffe_id) for i in update.identities]},
                )
                yield response
        finally:
            subscription.close()

    async def FetchX509Bundles(
        self, request: workload_pb2.X509BundlesRequest, context: _Context
    ) -> AsyncIterator[workload_pb2.X509BundlesResponse]:
        """Stream the X.509 bundles (own + federated) keyed by trust domain SPIFFE ID."""
        caller = await self._caller(context, "FetchX509Bundles")
        previous: workload_pb2.X509BundlesResponse | None = None
        async for own, federated in self._bundles(caller, context):
            response = workload_pb2.X509BundlesResponse(
                crl=list(self._manager.crls()), bundles=_x509_bundles(own, federated)
            )
            if response != previous:
                previous = response
                yield response

    def _record_x509(self, caller: _Caller, update: WorkloadUpdate, delivered: set[int]) -> None:
        """Log each X509-SVID this stream hands the caller for the first time."""
        if self._deliveries is None:
            return
        for identity in update.identities:
            leaf = identity.svid.leaf
            if leaf.serial_number in delivered:
                continue
            delivered.add(leaf.serial_number)
            self._deliveries.record(
                PendingRecord(
                    action="x509_svid.deliver",
                    actor=Actor("workload", f"pid={caller.pid} uid={caller.uid}"),
                    subject=str(identity.spiffe_id),
                    target=format(leaf.serial_number, "x"),
                    details={
                        "pid": caller.pid,
                        "uid": caller.uid,
                        "selectors": sorted(str(s) for s in caller.selectors),
                        "entry_id": identity.entry_id,
                        "expires_at": int(leaf.not_valid_after_utc.timestamp()),
                    },
                )
            )

    def _record_jwt(self, caller: _Caller, spiffe_id: str, token: str, audience: Any) -> None:
        if self._deliveries is None:
            return
        self._deliveries.record(
            PendingRecord(
                action="jwt_svid.deliver",
                actor=Actor("workload", f"pid={caller.pid} uid={caller.uid}"),
                subject=spiffe_id,
                details={
                    "pid": caller.pid,
                    "uid": caller.uid,
                    "selectors": sorted(str(s) for s in caller.selectors),
                    "aud": list(audience),
                    "token_sha256": hashlib.sha256(token.encode()).hexdigest(),
                },
            )
        )

    def _record_token(self, caller: _Caller, action: str, identity: Identity, token: str) -> None:
        """Log a token (a WIT-SVID) handed to the caller: its SHA-256, never the token."""
        if self._deliveries is None:
            return
        self._deliveries.record(
            PendingRecord(
                action=action,
                actor=Actor("workload", f"pid={caller.pid} uid={caller.uid}"),
                subject=str(identity.spiffe_id),
                details={
                    "pid": caller.pid,
                    "uid": caller.uid,
                    "selectors": sorted(str(s) for s in caller.selectors),
                    "entry_id": identity.entry_id,
                    "token_sha256": hashlib.sha256(token.encode()).hexdigest(),
                },
            )
        )

    # -- JWT --------------------------------------------------------------------------

    async def FetchJWTSVID(
        self, request: workload_pb2.JWTSVIDRequest, context: _Context
    ) -> workload_pb2.JWTSVIDResponse:
        """One JWT-SVID per caller identity (or only ``spiffe_id``) for the audience."""
        caller = await self._caller(context, "FetchJWTSVID")
        if not request.audience:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "audience must be specified")
        identities = self._manager.matching_identities(caller.selectors)
        if not identities:
            await _refuse(context, caller, "no identity issued", _NO_MATCH)
        chosen: tuple[Identity, ...] = identities
        if request.spiffe_id:
            try:
                wanted = SpiffeId.parse(request.spiffe_id)
            except InvalidSpiffeId as err:
                await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(err))
            chosen = tuple(i for i in identities if i.spiffe_id == wanted)
            if not chosen:
                await _refuse(
                    context,
                    caller,
                    f"no identity issued for {request.spiffe_id}",
                    f"none of the caller's identities is {request.spiffe_id}",
                )
        audience = tuple(request.audience)
        svids = []
        for identity in chosen:
            try:
                token = await self._manager.fetch_jwt_svid(identity, audience)
            except JwtSvidRateLimited as err:
                await _refuse(
                    context,
                    caller,
                    f"JWT-SVID requests are rate limited; retry later: {err}",
                    "rate limited by the server",
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                )
            except JwtSvidRefused as err:
                status = _JWT_REFUSAL_STATUS.get(err.code, grpc.StatusCode.UNAVAILABLE)
                log.info(
                    "JWT-SVID refused by the server",
                    extra={
                        "spiffe_id": err.spiffe_id,
                        "pid": caller.pid,
                        "code": err.code,
                        "reason": err.reason,
                    },
                )
                await _abort(context, status, str(err))
            except CredoError as err:
                log.error(
                    "cannot mint JWT-SVID",
                    extra={"spiffe_id": str(identity.spiffe_id), "error": str(err)},
                )
                await _abort(
                    context, grpc.StatusCode.UNAVAILABLE, f"could not mint JWT-SVID: {err}"
                )
            svids.append(
                workload_pb2.JWTSVID(
                    spiffe_id=str(identity.spiffe_id), svid=token, hint=identity.hint
                )
            )
            self._record_jwt(caller, str(identity.spiffe_id), token, audience)
        log.debug(
            "sending JWT-SVIDs",
            extra={"spiffe_ids": [s.spiffe_id for s in svids], "audience": list(audience)},
        )
        return workload_pb2.JWTSVIDResponse(svids=svids)

    async def FetchJWTBundles(
        self, request: workload_pb2.JWTBundlesRequest, context: _Context
    ) -> AsyncIterator[workload_pb2.JWTBundlesResponse]:
        """Stream the JWT bundles (JWKS) keyed by trust domain SPIFFE ID."""
        caller = await self._caller(context, "FetchJWTBundles")
        previous: workload_pb2.JWTBundlesResponse | None = None
        async for own, federated in self._bundles(caller, context):
            response = workload_pb2.JWTBundlesResponse(bundles=_jwt_bundles(own, federated))
            if response != previous:
                previous = response
                yield response

    async def ValidateJWTSVID(
        self, request: workload_pb2.ValidateJWTSVIDRequest, context: _Context
    ) -> workload_pb2.ValidateJWTSVIDResponse:
        """Validate a JWT-SVID against the own and federated bundles for one audience."""
        await self._caller(context, "ValidateJWTSVID")
        if not request.audience:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "audience must be specified")
        if not request.svid:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "svid must be specified")
        try:
            svid = JwtSvid.parse_and_validate(
                request.svid, self._manager.bundle_set(), [request.audience]
            )
        except CredoError as err:
            log.info("JWT-SVID failed validation", extra={"reason": str(err)})
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(err))
        if svid.jwt_id is not None and svid.jwt_id in self._manager.revoked_jtis():
            log.info("JWT-SVID failed validation", extra={"reason": "revoked"})
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "the JWT-SVID has been revoked")
        claims = struct_pb2.Struct()
        claims.update(_json_ready(dict(svid.claims)))
        return workload_pb2.ValidateJWTSVIDResponse(spiffe_id=str(svid.spiffe_id), claims=claims)

    # -- WIT ----------------------------------------------------------------------------

    async def FetchWITSVID(
        self, request: workload_pb2.WITSVIDRequest, context: _Context
    ) -> AsyncIterator[workload_pb2.WITSVIDResponse]:
        """Stream a WIT-SVID and its private key (JWK) per caller identity: at once, then
        whenever one is renewed or the identities or bundle change."""
        caller = await self._caller(context, "FetchWITSVID")
        subscription = self._manager.subscribe(caller.selectors)
        try:
            previous: workload_pb2.WITSVIDResponse | None = None
            update = await subscription.next()
            while True:
                if not update.identities:
                    await _refuse(context, caller, "no identity issued", _why_none(update))
                try:
                    wits = await self._manager.fetch_wit_svids(update.identities)
                except WitSvidUnavailable as err:
                    log.warning(
                        "cannot serve WIT-SVIDs",
                        extra={"pid": caller.pid, "error": str(err)},
                    )
                    await _abort(context, grpc.StatusCode.UNAVAILABLE, str(err))
                response = workload_pb2.WITSVIDResponse(
                    svids=[
                        workload_pb2.WITSVID(
                            spiffe_id=str(w.identity.spiffe_id),
                            wit_svid=w.token,
                            wit_svid_key=w.private_key_jwk,
                            hint=w.identity.hint,
                        )
                        for w in wits
                    ]
                )
                if response != previous:
                    previous = response
                    for w in wits:
                        self._record_token(caller, "wit_svid.deliver", w.identity, w.token)
                    log.debug(
                        "sending WIT-SVIDs",
                        extra={"spiffe_ids": [str(w.identity.spiffe_id) for w in wits]},
                    )
                    yield response
                wait = min(w.refresh_at for w in wits) - time.time()
                try:
                    async with asyncio.timeout(max(0.0, wait)):
                        update = await subscription.next()
                except TimeoutError:  # a WIT is due for renewal
                    identities = self._manager.matching_identities(caller.selectors)
                    update = replace(update, identities=identities)
        finally:
            subscription.close()

    async def FetchWITBundles(
        self, request: workload_pb2.WITBundlesRequest, context: _Context
    ) -> AsyncIterator[workload_pb2.WITBundlesResponse]:
        """Stream the WIT bundles (JWKS of ``wit-svid`` keys) keyed by trust domain SPIFFE ID."""
        caller = await self._caller(context, "FetchWITBundles")
        previous: workload_pb2.WITBundlesResponse | None = None
        async for own, federated in self._bundles(caller, context):
            response = workload_pb2.WITBundlesResponse(bundles=_wit_bundles(own, federated))
            if response != previous:
                previous = response
                yield response

    # -- helpers ------------------------------------------------------------------------

    async def _bundles(
        self, caller: _Caller, context: _Context
    ) -> AsyncIterator[tuple[Bundle, Mapping[str, Bundle]]]:
        """Bundles for the bundle streams; only callers with an identity unless allowed."""
        if self._allow_unauthenticated_verifiers:
            bundle_sub = self._manager.subscribe_bundles()
            try:
                while True:
                    yield await bundle_sub.next()
            finally:
                bundle_sub.close()
        subscription = self._manager.subscribe(caller.selectors)
        try:
            while True:
                update = await subscription.next()
                if not update.identities:
                    await _refuse(context, caller, "no identity issued", _why_none(update))
                yield update.bundle, update.federated_bundles
        finally:
            subscription.close()


async def _abort(context: _Context, code: grpc.StatusCode, message: str) -> NoReturn:
    """End the call with ``code``; ``context.abort`` raises, this tells mypy so."""
    await context.abort(code, message)
    raise AssertionError("unreachable")  # pragma: no cover


def _json_ready(value: Any) -> Any:
    """Claims as protobuf Struct accepts them: tuples become lists, ints stay numbers."""
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    return value
