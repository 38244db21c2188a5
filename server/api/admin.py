"""The admin endpoint: ``Entries``, ``Agents``, ``Bundles``, ``Svids``, ``LocalAuthority``,
``Audit``.

Served on the local Unix socket only; trust comes from the socket's file permissions.
:class:`AdminActorInterceptor` makes every call's audit records name the admin caller
(``uid=U pid=P`` of the connected process, read with ``SO_PEERCRED`` by
:class:`~server.api.peercred.AdminSocketRelay`; the socket is open only to the server's
user).
Every request is validated here, at the edge, before anything changes: a batch with
one bad item changes nothing, and the status names the item and the field
(``entries[1].spiffe_id: ...``).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final, TypeVar, cast

import grpc
from cryptography.hazmat.primitives import serialization

from credo._proto.credo.server.v1 import admin_pb2, admin_pb2_grpc, types_pb2
from credo._reserved import RESERVED_PATH_PREFIX, is_reserved_path
from credo.bundle import Bundle, X509Bundle
from credo.durations import format_duration
from credo.errors import BundleError, InvalidSpiffeId
from credo.keys import generate_private_key
from credo.spiffe_id import SpiffeId, TrustDomain
from credo.witsvid import private_key_to_jwk
from server import audit
from server.api.common import BundleSource
from server.api.convert import (
    InvalidField,
    bundle_to_proto,
    crl_to_proto,
    entry_from_proto,
    entry_to_proto,
    join_token_to_proto,
    jwt_expiry,
    node_to_proto,
    parse_csr,
    parse_public_key,
    selectors_from_proto,
    validate_dns_name,
    validate_spiffe_id,
    x509_svid_to_proto,
)
from server.api.errors import ApiError, handle_errors, status_for
from server.api.peercred import AdminSocketRelay, PeerCredentials
from server.audit.checkpoint import Checkpointer, checkpoint_verifier
from server.ca.ca import CertificateAuthority
from server.ca.manager import AuthorityInfo, AuthorityManager
from server.datastore.errors import DataStoreError, NotFound
from server.datastore.models import (
    AuthorityKind,
    BySelectors,
    FederationRelationship,
    JoinToken,
    ListAttestedNodesRequest,
    ListAuditRecordsRequest,
    ListRegistrationEntriesRequest,
    MatchBehavior,
    RegistrationEntry,
)
from server.datastore.protocol import DataStore
from server.datastore.sql import token_fingerprint
from server.federation.errors import InvalidRelationship
from server.federation.relationships import PROFILE_HTTPS_SPIFFE, check_relationship
from server.issuance import jwt_reference, x509_issued_record
from server.revocation import MAX_REASON, RevocationResult, Revoker, issued_record, jwt_record

__all__ = [
    "AdminActorInterceptor",
    "AdminApiConfig",
    "AgentsService",
    "AuditService",
    "BundlesService",
    "EntriesService",
    "FederationService",
    "LocalAuthorityService",
    "SvidsService",
]

log = logging.getLogger(__name__)

_T = TypeVar("_T")
MAX_BATCH: Final = 10_000
MAX_PAGE_SIZE: Final = 10_000


@dataclass(frozen=True)
class AdminApiConfig:
    """Settings of the admin API; TTLs in seconds."""

    trust_domain: TrustDomain
    x509_svid_ttl: int = 3600
    jwt_svid_ttl: int = 300
    wit_svid_ttl: int = 3600
    join_token_ttl: int = 600
    join_token_max_ttl: int = 86400
    # Refuse entries without an owner (``[server] require_entry_owner``).
    require_entry_owner: bool = False


async def _call(fn: Callable[..., _T], *args: object) -> _T:
    return await asyncio.to_thread(fn, *args)


def _batch_error(err: DataStoreError, field: str, member: str = "") -> ApiError:
    """Re-word a datastore batch error so it names the request field (``entries[2]``).

    ``member`` names a part of the item (``".id"`` gives ``entries[2].id``).
    """
    code, message = status_for(err)
    if err.index is not None:
        prefix = f"{field}[{err.index}]{member}: "
        message = prefix + message.removeprefix(f"item {err.index}: ")
    return ApiError(code, message)


def _reason(text: str) -> str:
    """A revocation reason: free text, one line, at most :data:`MAX_REASON` characters."""
    if len(text) > MAX_REASON:
        raise InvalidField("reason", f"is {len(text)} characters long; at most {MAX_REASON}")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in text):
        raise InvalidField("reason", "must be one line of printable text")
    return text


def _serial(text: str) -> str:
    """An X.509 serial number as the server records it: lowercase hex, no leading zeros.

    Accepts ``0x``, colons between bytes and upper-case digits (as ``openssl x509
    -serial`` prints it).
    """
    cleaned = text.strip().lower().removeprefix("0x").replace(":", "")
    if not cleaned:
        raise InvalidField("serial", "is required; expected a hex serial number")
    if len(cleaned) > 42 or any(ch not in "0123456789abcdef" for ch in cleaned):
        raise InvalidField("serial", f"{text!r} is not a hex serial number of at most 20 bytes")
    return format(int(cleaned, 16), "x")


def _revocation_response(result: RevocationResult) -> admin_pb2.RevocationResponse:
    return admin_pb2.RevocationResponse(
        revoked=[
            admin_pb2.RevokedX509Svid(
                serial=s.serial,
                spiffe_id=s.spiffe_id,
                entry_id=s.entry_id,
                authority_id=s.authority_id,
                expires_at=s.expires_at,
                agent_id=s.agent_id,
            )
            for s in result.revoked
        ],
        entry_newly_revoked=result.entry_newly_revoked,
        revoked_jwts=[
            admin_pb2.RevokedJwtSvid(
                jti=j.jti,
                spiffe_id=j.spiffe_id,
                entry_id=j.entry_id,
                expires_at=j.expires_at,
                agent_id=j.agent_id,
            )
            for j in result.revoked_jwts
        ],
        revoked_tokens=[
            admin_pb2.RevokedDelegatedToken(
                jti=t.jti, client_id=t.client_id, subject=t.subject, expires_at=t.expires_at
            )
            for t in result.revoked_tokens
        ],
    )


def _token_fingerprint(token: str) -> str:
    """A short, non-reversible label for a join token, fit for logs."""
    return token_fingerprint(token)


def admin_actor(creds: PeerCredentials | None) -> audit.Actor:
    """The admin caller, by the uid and pid the kernel reported for its connection
    (``uid=? pid=?`` for a connection that did not come through the admin socket)."""
    if creds is None:
        return audit.Actor("admin", "uid=? pid=?")
    return audit.Actor("admin", f"uid={creds.uid} pid={creds.pid}")


class AdminActorInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Run every unary admin call with its caller as the actor of its audit records: the
    credentials ``relay`` read with ``SO_PEERCRED`` (what the CLI declares in the call's
    metadata is ignored)."""

    def __init__(self, relay: AdminSocketRelay | None = None) -> None:
        self._relay = relay

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary
        relay = self._relay

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            actor = admin_actor(relay.lookup(context.peer()) if relay is not None else None)
            with audit.acting_as(actor):
                result = inner(request, context)
                return await result if inspect.isawaitable(result) else result

        return grpc.unary_unary_rpc_method_handler(
            unary,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


class EntriesService(admin_pb2_grpc.EntriesServicer):
    """Registration entries: batch create/update/delete, get, list, count."""

    def __init__(
        self, config: AdminApiConfig, datastore: DataStore, revoker: Revoker | None = None
    ) -> None:
        self._td = config.trust_domain
        self._ds = datastore
        self._require_owner = config.require_entry_owner
        self._revoker = revoker or Revoker(datastore)

    def _check_batch(self, items: Sequence[object], field: str) -> None:
        if len(items) > MAX_BATCH:
            raise InvalidField(field, f"too many items: {len(items)} > {MAX_BATCH}")

    def _entries_from_proto(
        self, items: Sequence[types_pb2.RegistrationEntry], *, require_id: bool = False
    ) -> list[RegistrationEntry]:
        records = []
        for i, pb in enumerate(items):
            record = entry_from_proto(pb, self._td, f"entries[{i}]", require_id=require_id)
            if self._require_owner and not record.owner:
                raise InvalidField(
                    f"entries[{i}].owner",
                    "is required: this server sets require_entry_owner; name the accountable "
                    "person or team (--owner alice@example.com)",
                )
            records.append(record)
        return records

    @handle_errors
    async def BatchCreateEntry(
        self, request: admin_pb2.BatchCreateEntryRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.BatchCreateEntryResponse:
        self._check_batch(request.entries, "entries")
        records = self._entries_from_proto(request.entries)
        if not records:
            return admin_pb2.BatchCreateEntryResponse()
        try:
            created = await _call(self._ds.create_registration_entries, records)
        except DataStoreError as err:
            raise _batch_error(err, "entries") from None
        for entry in created[:100]:
            log.info(
                "created registration entry",
                extra={
                    "entry_id": entry.id,
                    "spiffe_id": entry.spiffe_id,
                    "parent_id": entry.parent_id,
                    "owner": entry.owner,
                },
            )
        if len(created) > 100:
            log.info("created registration entries", extra={"count": len(created)})
        return admin_pb2.BatchCreateEntryResponse(entries=[entry_to_proto(e) for e in created])

    @handle_errors
    async def BatchUpdateEntry(
        self, request: admin_pb2.BatchUpdateEntryRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.BatchUpdateEntryResponse:
        self._check_batch(request.entries, "entries")
        records = self._entries_from_proto(request.entries, require_id=True)
        seen: set[str] = set()
        for i, record in enumerate(records):
            if record.id in seen:
                raise InvalidField(f"entries[{i}].id", f"entry {record.id!r} appears twice")
            seen.add(record.id)
        if not records:
            return admin_pb2.BatchUpdateEntryResponse()
        # One transaction: an unknown id or a conflict on any item changes nothing.
        try:
            updated = await _call(self._ds.update_registration_entries, records)
        except DataStoreError as err:
            # An unknown id is the fault of the item's id field: ``entries[1].id: ...``.
            raise _batch_error(err, "entries", ".id" if isinstance(err, NotFound) else "") from None
        for entry in updated[:100]:
            log.info(
                "updated registration entry",
                extra={"entry_id": entry.id, "spiffe_id": entry.spiffe_id},
            )
        if len(updated) > 100:
            log.info("updated registration entries", extra={"count": len(updated)})
        return admin_pb2.BatchUpdateEntryResponse(entries=[entry_to_proto(e) for e in updated])

    @handle_errors
    async def BatchDeleteEntry(
        self, request: admin_pb2.BatchDeleteEntryRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.BatchDeleteEntryResponse:
        self._check_batch(request.ids, "ids")
        for i, entry_id in enumerate(request.ids):
            if not entry_id:
                raise InvalidField(f"ids[{i}]", "is empty; expected an entry id")
        if not request.ids:
            return admin_pb2.BatchDeleteEntryResponse()
        try:
            deleted = await _call(self._ds.delete_registration_entries, list(request.ids))
        except DataStoreError as err:
            raise _batch_error(err, "ids") from None
        for entry in deleted[:100]:
            log.info(
                "deleted registration entry",
                extra={"entry_id": entry.id, "spiffe_id": entry.spiffe_id},
            )
        return admin_pb2.BatchDeleteEntryResponse(entries=[entry_to_proto(e) for e in deleted])

    @handle_errors
    async def GetEntry(
        self, request: admin_pb2.GetEntryRequest, context: grpc.aio.ServicerContext
    ) -> types_pb2.RegistrationEntry:
        if not request.id:
            raise InvalidField("id", "is required")
        entry = await _call(self._ds.fetch_registration_entry, request.id)
        if entry is None:
            raise ApiError(
                grpc.StatusCode.NOT_FOUND, f"registration entry {request.id!r} not found"
            )
        return entry_to_proto(entry)

    @handle_errors
    async def ListEntries(
        self, request: admin_pb2.ListEntriesRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListEntriesResponse:
        f = request.filter
        if request.page_size < 0 or request.page_size > MAX_PAGE_SIZE:
            raise InvalidField("page_size", f"must be between 0 and {MAX_PAGE_SIZE}")
        by_selectors = None
        if f.by_selectors:
            selectors = selectors_from_proto(f.by_selectors, "filter.by_selectors")
            try:
                match = MatchBehavior(f.selector_match or "exact")
            except ValueError:
                raise InvalidField(
                    "filter.selector_match",
                    f"{f.selector_match!r} is not one of exact, subset, superset, any",
                ) from None
            by_selectors = BySelectors(selectors, match)
        elif f.selector_match:
            raise InvalidField("filter.selector_match", "needs filter.by_selectors")
        query = ListRegistrationEntriesRequest(
            by_spiffe_id=f.by_spiffe_id or None,
            by_parent_id=f.by_parent_id or None,
            by_selectors=by_selectors,
            by_hint=f.by_hint or None,
            by_owner=f.by_owner or None,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        page = await _call(self._ds.list_registration_entries, query)
        return admin_pb2.ListEntriesResponse(
            entries=[entry_to_proto(e) for e in page.entries],
            next_page_token=page.next_page_token,
        )

    @handle_errors
    async def RevokeEntry(
        self, request: admin_pb2.RevokeEntryRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.RevocationResponse:
        if not request.id:
            raise InvalidField("id", "is required")
        reason = _reason(request.reason)
        try:
            result = await self._revoker.revoke_entry(request.id, reason, cascade=request.cascade)
        except NotFound:
            raise ApiError(
                grpc.StatusCode.NOT_FOUND, f"registration entry {request.id!r} not found"
            ) from None
        return _revocation_response(result)

    @handle_errors
    async def CountEntries(
        self, request: admin_pb2.CountEntriesRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.CountEntriesResponse:
        return admin_pb2.CountEntriesResponse(
            count=await _call(self._ds.count_registration_entries)
        )


class AgentsService(admin_pb2_grpc.AgentsServicer):
    """Attested agents (list, show, count, ban, evict) and join tokens."""

    def __init__(
        self, config: AdminApiConfig, datastore: DataStore, revoker: Revoker | None = None
    ) -> None:
        self._config = config
        self._td = config.trust_domain
        self._ds = datastore
        self._revoker = revoker or Revoker(datastore)

    def _agent_id(self, text: str) -> str:
        return str(validate_spiffe_id(text, self._td, "spiffe_id"))

    async def _node(self, spiffe_id: str) -> types_pb2.AttestedNode:
        node = await _call(self._ds.fetch_attested_node, spiffe_id)
        if node is None:
            raise ApiError(grpc.StatusCode.NOT_FOUND, f"agent {spiffe_id!r} not found")
        return node_to_proto(node)

    @handle_errors
    async def ListAgents(
        self, request: admin_pb2.ListAgentsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListAgentsResponse:
        banned = {"": None, "true": True, "false": False}
        if request.by_banned not in banned:
            raise InvalidField("by_banned", f"{request.by_banned!r} is not one of '', true, false")
        if request.page_size < 0 or request.page_size > MAX_PAGE_SIZE:
            raise InvalidField("page_size", f"must be between 0 and {MAX_PAGE_SIZE}")
        page = await _call(
            self._ds.list_attested_nodes,
            ListAttestedNodesRequest(
                by_attestation_type=request.by_attestation_type or None,
                by_banned=banned[request.by_banned],
                page_size=request.page_size,
                page_token=request.page_token,
            ),
        )
        return admin_pb2.ListAgentsResponse(
            agents=[node_to_proto(n) for n in page.nodes], next_page_token=page.next_page_token
        )

    @handle_errors
    async def GetAgent(
        self, request: admin_pb2.GetAgentRequest, context: grpc.aio.ServicerContext
    ) -> types_pb2.AttestedNode:
        return await self._node(self._agent_id(request.spiffe_id))

    @handle_errors
    async def CountAgents(
        self, request: admin_pb2.CountAgentsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.CountAgentsResponse:
        return admin_pb2.CountAgentsResponse(count=await _call(self._ds.count_attested_nodes))

    @handle_errors
    async def BanAgent(
        self, request: admin_pb2.BanAgentRequest, context: grpc.aio.ServicerContext
    ) -> types_pb2.AttestedNode:
        agent_id = self._agent_id(request.spiffe_id)
        reason = _reason(request.reason)
        try:
            banned, result = await self._revoker.ban_agent(agent_id, reason)
        except NotFound:
            raise ApiError(grpc.StatusCode.NOT_FOUND, f"agent {agent_id!r} not found") from None
        log.warning(
            "banned agent", extra={"agent_id": agent_id, "revoked_svids": len(result.revoked)}
        )
        return node_to_proto(banned)

    @handle_errors
    async def DeleteAgent(
        self, request: admin_pb2.DeleteAgentRequest, context: grpc.aio.ServicerContext
    ) -> types_pb2.AttestedNode:
        agent_id = self._agent_id(request.spiffe_id)
        node = await _call(self._ds.delete_attested_node, agent_id)
        log.warning("evicted agent", extra={"agent_id": agent_id})
        return node_to_proto(node)

    @handle_errors
    async def CreateJoinToken(
        self, request: admin_pb2.CreateJoinTokenRequest, context: grpc.aio.ServicerContext
    ) -> types_pb2.JoinToken:
        if request.ttl < 0:
            raise InvalidField(
                "ttl", f"must not be negative, got {request.ttl} (0 means the default)"
            )
        ttl = request.ttl or self._config.join_token_ttl
        if ttl > self._config.join_token_max_ttl:
            raise InvalidField(
                "ttl",
                f"{format_duration(ttl)} is longer than this server allows for join tokens "
                f"({format_duration(self._config.join_token_max_ttl)}, join_token_max_ttl): "
                "a join token admits a node until it is used, so make it shortly before use",
            )
        alias = ""
        if request.spiffe_id:
            spiffe_id = validate_spiffe_id(request.spiffe_id, self._td, "spiffe_id")
            if not spiffe_id.path or is_reserved_path(spiffe_id.path):
                raise InvalidField(
                    "spiffe_id",
                    f"must have a path outside {RESERVED_PATH_PREFIX} (reserved for the server)",
                )
            alias = str(spiffe_id)
        token = JoinToken(str(uuid.uuid4()), int(time.time()) + ttl, alias)
        created = await _call(self._ds.create_join_token, token)
        log.info(
            "created join token",
            extra={
                "token_sha256": _token_fingerprint(created.token),
                "expires_at": created.expires_at,
                "spiffe_id": alias,
            },
        )
        return join_token_to_proto(created)


class BundlesService(admin_pb2_grpc.BundlesServicer):
    """The trust domain's bundle and federated bundles."""

    def __init__(self, config: AdminApiConfig, datastore: DataStore, bundles: BundleSource) -> None:
        self._td = config.trust_domain
        self._ds = datastore
        self._bundles = bundles

    def _federated_td(self, text: str) -> TrustDomain:
        if not text:
            raise InvalidField("trust_domain", "is required, e.g. partner.example")
        try:
            td = TrustDomain.parse(text)
        except InvalidSpiffeId as err:
            raise InvalidField("trust_domain", str(err)) from None
        if td == self._td:
            raise InvalidField(
                "trust_domain",
                f"{td} is this server's own trust domain; its bundle is managed by the CA",
            )
        return td

    @handle_errors
    async def GetBundle(
        self, request: admin_pb2.GetBundleAdminRequest, context: grpc.aio.ServicerContext
    ) -> types_pb2.Bundle:
        return await _call(self._bundles.own)

    @handle_errors
    async def ListFederatedBundles(
        self, request: admin_pb2.ListFederatedBundlesRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListFederatedBundlesResponse:
        return admin_pb2.ListFederatedBundlesResponse(
            bundles=await _call(self._bundles.federated, None)
        )

    @handle_errors
    async def SetFederatedBundle(
        self, request: admin_pb2.SetFederatedBundleRequest, context: grpc.aio.ServicerContext
    ) -> types_pb2.Bundle:
        td = self._federated_td(request.trust_domain)
        fmt = request.format or "pem"
        try:
            if fmt == "pem":
                x509_bundle = X509Bundle.parse_pem(td, request.data)
                bundle = Bundle(td, x509_bundle.authorities)
            elif fmt == "spiffe":
                bundle = Bundle.parse(td, request.data)
            else:
                raise InvalidField("format", f"{fmt!r} is not one of pem, spiffe")
        except BundleError as err:
            raise InvalidField("data", str(err)) from None
        if not bundle.x509_authorities and not bundle.jwt_authorities and not request.force:
            raise InvalidField(
                "data",
                "the bundle has no X.509 or JWT authorities: nothing from "
                f"{td} would verify any more; set force (--force) to store it anyway",
            )
        await _call(self._ds.set_bundle, td.name, bundle.marshal())
        log.info("set federated bundle", extra={"trust_domain": td.name})
        return bundle_to_proto(bundle)

    @handle_errors
    async def DeleteFederatedBundle(
        self, request: admin_pb2.DeleteFederatedBundleRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.DeleteFederatedBundleResponse:
        td = self._federated_td(request.trust_domain)
        await _call(self._ds.delete_bundle, td.name)
        log.info("deleted federated bundle", extra={"trust_domain": td.name})
        return admin_pb2.DeleteFederatedBundleResponse()


def _first_bundle(td: TrustDomain, data: bytes, fmt: str) -> Bundle:
    """The ``trust_domain_bundle`` of a relationship request, parsed."""
    try:
        if fmt in ("", "spiffe"):
            return Bundle.parse(td, data)
        if fmt == "pem":
            return Bundle(td, X509Bundle.parse_pem(td, data).authorities)
    except BundleError as err:
        raise InvalidField("trust_domain_bundle", str(err)) from None
    raise InvalidField("trust_domain_bundle_format", f"{fmt!r} is not one of spiffe, pem")


class FederationService(admin_pb2_grpc.FederationServicer):
    """Federation relationships (``credo-server federation ...``); the refresh loop is
    :class:`server.federation.refresher.BundleRefresher`."""

    def __init__(self, config: AdminApiConfig, datastore: DataStore) -> None:
        self._td = config.trust_domain
        self._ds = datastore

    def _relationship(self, pb: admin_pb2.FederationRelationship) -> FederationRelationship:
        try:
            return check_relationship(
                FederationRelationship(
                    trust_domain=pb.trust_domain,
                    bundle_endpoint_url=pb.bundle_endpoint_url,
                    bundle_endpoint_profile=pb.bundle_endpoint_profile,
                    endpoint_spiffe_id=pb.endpoint_spiffe_id,
                ),
                self._td,
            )
        except InvalidRelationship as err:
            raise InvalidField(err.field, err.reason) from None

    def _to_proto(self, rel: FederationRelationship) -> admin_pb2.FederationRelationship:
        data = self._ds.fetch_bundle(rel.trust_domain)
        sequence = -1
        if data is not None:
            try:
                sequence = Bundle.parse(rel.trust_domain, data).sequence_number
            except BundleError:
                sequence = -1
        return admin_pb2.FederationRelationship(
            trust_domain=rel.trust_domain,
            bundle_endpoint_url=rel.bundle_endpoint_url,
            bundle_endpoint_profile=rel.bundle_endpoint_profile,
            endpoint_spiffe_id=rel.endpoint_spiffe_id,
            last_refresh_at=rel.last_refresh_at,
            last_error=rel.last_error,
            created_at=rel.created_at,
            bundle_sequence=sequence,
        )

    def _trust_domain(self, text: str) -> TrustDomain:
        if not text:
            raise InvalidField("trust_domain", "is required, e.g. partner.example")
        try:
            return TrustDomain.parse(text)
        except InvalidSpiffeId as err:
            raise InvalidField("trust_domain", str(err)) from None

    def _check_first_bundle(
        self, rel: FederationRelationship, request: admin_pb2.FederationRelationship
    ) -> Bundle | None:
        """The first bundle to store with ``rel``; required where https_spiffe needs it."""
        td = TrustDomain.parse(rel.trust_domain)
        first = (
            _first_bundle(td, request.trust_domain_bundle, request.trust_domain_bundle_format)
            if request.trust_domain_bundle
            else None
        )
        if first is not None and not first.x509_authorities and not first.jwt_authorities:
            raise InvalidField("trust_domain_bundle", "has no X.509 or JWT authorities")
        if (
            rel.bundle_endpoint_profile == PROFILE_HTTPS_SPIFFE
            and first is None
            and SpiffeId.parse(rel.endpoint_spiffe_id).trust_domain == td
            and self._ds.fetch_bundle(td.name) is None
        ):
            raise InvalidField(
                "trust_domain_bundle",
                f"an https_spiffe endpoint of {td.name} is verified with {td.name}'s bundle, "
                "and none is stored yet: give the first one (--trust-domain-bundle FILE)",
            )
        return first

    def _create(self, rel: FederationRelationship, first: Bundle | None) -> FederationRelationship:
        created = self._ds.create_federation_relationship(rel)
        if first is not None:
            self._ds.set_bundle(rel.trust_domain, first.marshal())
        return created

    @handle_errors
    async def CreateFederationRelationship(
        self, request: admin_pb2.FederationRelationship, context: grpc.aio.ServicerContext
    ) -> admin_pb2.FederationRelationship:
        rel = self._relationship(request)
        first = await _call(self._check_first_bundle, rel, request)
        created = await _call(self._create, rel, first)
        log.info(
            "created federation relationship",
            extra={
                "trust_domain": rel.trust_domain,
                "bundle_endpoint_url": rel.bundle_endpoint_url,
                "profile": rel.bundle_endpoint_profile,
            },
        )
        return await _call(self._to_proto, created)

    @handle_errors
    async def GetFederationRelationship(
        self,
        request: admin_pb2.GetFederationRelationshipRequest,
        context: grpc.aio.ServicerContext,
    ) -> admin_pb2.FederationRelationship:
        td = self._trust_domain(request.trust_domain)
        rel = await _call(self._ds.fetch_federation_relationship, td.name)
        if rel is None:
            raise NotFound(f"no federation relationship with trust domain {td.name!r}")
        return await _call(self._to_proto, rel)

    @handle_errors
    async def ListFederationRelationships(
        self,
        request: admin_pb2.ListFederationRelationshipsRequest,
        context: grpc.aio.ServicerContext,
    ) -> admin_pb2.ListFederationRelationshipsResponse:
        rels = await _call(self._ds.list_federation_relationships)
        return admin_pb2.ListFederationRelationshipsResponse(
            relationships=[await _call(self._to_proto, r) for r in rels]
        )

    def _update(
        self, rel: FederationRelationship, request: admin_pb2.FederationRelationship
    ) -> FederationRelationship:
        current = self._ds.fetch_federation_relationship(rel.trust_domain)
        if current is None:
            raise NotFound(f"no federation relationship with trust domain {rel.trust_domain!r}")
        first = self._check_first_bundle(rel, request)
        updated = self._ds.update_federation_relationship(
            replace(rel, last_refresh_at=0, last_error="")
        )
        if first is not None:
            self._ds.set_bundle(rel.trust_domain, first.marshal())
        return updated

    @handle_errors
    async def UpdateFederationRelationship(
        self, request: admin_pb2.FederationRelationship, context: grpc.aio.ServicerContext
    ) -> admin_pb2.FederationRelationship:
        rel = self._relationship(request)
        updated = await _call(self._update, rel, request)
        log.info("updated federation relationship", extra={"trust_domain": rel.trust_domain})
        return await _call(self._to_proto, updated)

    @handle_errors
    async def DeleteFederationRelationship(
        self,
        request: admin_pb2.GetFederationRelationshipRequest,
        context: grpc.aio.ServicerContext,
    ) -> admin_pb2.FederationRelationship:
        td = self._trust_domain(request.trust_domain)
        gone = await _call(self._ds.delete_federation_relationship, td.name)
        log.info("deleted federation relationship", extra={"trust_domain": td.name})
        return admin_pb2.FederationRelationship(
            trust_domain=gone.trust_domain,
            bundle_endpoint_url=gone.bundle_endpoint_url,
            bundle_endpoint_profile=gone.bundle_endpoint_profile,
            endpoint_spiffe_id=gone.endpoint_spiffe_id,
            created_at=gone.created_at,
            bundle_sequence=-1,
        )


class SvidsService(admin_pb2_grpc.SvidsServicer):
    """Mint SVIDs directly (``credo-server x509 mint`` / ``jwt mint``)."""

    def __init__(
        self,
        config: AdminApiConfig,
        ca: CertificateAuthority,
        datastore: DataStore | None = None,
        revoker: Revoker | None = None,
    ) -> None:
        self._config = config
        self._ca = ca
        self._ds = datastore
        self._revoker = revoker or (Revoker(datastore) if datastore is not None else None)

    def _store(self) -> DataStore:
        if self._ds is None:
            raise ApiError(grpc.StatusCode.UNIMPLEMENTED, "this server keeps no SVID records")
        return self._ds

    def _spiffe_id(self, text: str) -> SpiffeId:
        spiffe_id = validate_spiffe_id(text, self._config.trust_domain, "spiffe_id")
        if not spiffe_id.path:
            raise InvalidField("spiffe_id", "must have a path; the trust domain ID is not allowed")
        if is_reserved_path(spiffe_id.path):
            raise InvalidField(
                "spiffe_id",
                f"paths under {RESERVED_PATH_PREFIX} are reserved for the server and its agents",
            )
        return spiffe_id

    @staticmethod
    def _ttl(value: int, default: int) -> int:
        if value < 0:
            raise InvalidField("ttl", f"must not be negative, got {value} (0 means the default)")
        return value or default

    @handle_errors
    async def MintX509SVID(
        self, request: admin_pb2.MintX509SVIDRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.MintX509SVIDResponse:
        spiffe_id = self._spiffe_id(request.spiffe_id)
        ttl = self._ttl(request.ttl, self._config.x509_svid_ttl)
        dns = [validate_dns_name(n, f"dns_names[{i}]") for i, n in enumerate(request.dns_names)]
        public_key = parse_csr(request.csr, "csr")
        chain = await _call(self._ca.sign_x509_svid, spiffe_id, public_key, ttl, dns)
        if self._ds is not None:
            await _call(
                self._ds.create_issued_x509_svids, [issued_record(chain[0], str(spiffe_id))]
            )
            leaf = chain[0]
            record = x509_issued_record(
                "",
                str(spiffe_id),
                leaf.public_bytes(serialization.Encoding.DER),
                int(leaf.not_valid_after_utc.timestamp()),
            )
            await _call(self._ds.append_audit_records, [record])
        log.info(
            "minted x509-svid",
            extra={"spiffe_id": str(spiffe_id), "serial": format(chain[0].serial_number, "x")},
        )
        return admin_pb2.MintX509SVIDResponse(svid=x509_svid_to_proto(chain))

    @handle_errors
    async def MintJWTSVID(
        self, request: admin_pb2.MintJWTSVIDRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.MintJWTSVIDResponse:
        spiffe_id = self._spiffe_id(request.spiffe_id)
        if not request.audience or not all(request.audience):
            raise InvalidField("audience", "at least one non-empty audience is required")
        ttl = self._ttl(request.ttl, self._config.jwt_svid_ttl)
        now = int(time.time())
        token = await _call(self._ca.sign_jwt_svid, spiffe_id, list(request.audience), ttl)
        if self._ds is not None:
            await _call(self._ds.create_issued_jwt_svid, jwt_record(token, str(spiffe_id)))
            jti, details = jwt_reference(token)
            record = audit.pending(
                "jwt_svid.issue", subject=str(spiffe_id), target=jti, details=details
            )
            await _call(self._ds.append_audit_records, [record])
        log.info("minted jwt-svid", extra={"spiffe_id": str(spiffe_id)})
        return admin_pb2.MintJWTSVIDResponse(
            svid=types_pb2.JwtSvid(
                spiffe_id=str(spiffe_id), token=token, issued_at=now, expires_at=jwt_expiry(token)
            )
        )

    @handle_errors
    async def MintWITSVID(
        self, request: admin_pb2.MintWITSVIDRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.MintWITSVIDResponse:
        spiffe_id = self._spiffe_id(request.spiffe_id)
        ttl = self._ttl(request.ttl, self._config.wit_svid_ttl)
        private_jwk = ""
        if request.public_key:
            public_key = parse_public_key(request.public_key, "public_key")
        else:
            private_key = await _call(generate_private_key)
            public_key = private_key.public_key()
            private_jwk = private_key_to_jwk(private_key)
        now = int(time.time())
        token = await _call(self._ca.sign_wit_svid, spiffe_id, public_key, ttl)
        if self._ds is not None:
            await _call(self._ds.create_issued_jwt_svid, jwt_record(token, str(spiffe_id)))
            jti, details = jwt_reference(token)
            record = audit.pending(
                "wit_svid.issue", subject=str(spiffe_id), target=jti, details=details
            )
            await _call(self._ds.append_audit_records, [record])
        log.info("minted wit-svid", extra={"spiffe_id": str(spiffe_id)})
        return admin_pb2.MintWITSVIDResponse(
            svid=types_pb2.WitSvid(
                spiffe_id=str(spiffe_id), token=token, issued_at=now, expires_at=jwt_expiry(token)
            ),
            private_key=private_jwk,
        )

    @handle_errors
    async def RevokeX509SVID(
        self, request: admin_pb2.RevokeX509SVIDRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.RevocationResponse:
        serial = _serial(request.serial)
        reason = _reason(request.reason)
        self._store()
        assert self._revoker is not None
        try:
            result = await self._revoker.revoke_serial(serial, reason)
        except NotFound:
            raise ApiError(
                grpc.StatusCode.NOT_FOUND, f"no X.509-SVID with serial {serial} was issued"
            ) from None
        return _revocation_response(result)

    @handle_errors
    async def RevokeJWTSVID(
        self, request: admin_pb2.RevokeJWTSVIDRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.RevocationResponse:
        jti = request.jti.strip()
        if not jti:
            raise InvalidField("jti", "is required")
        if len(jti) > 64 or not all(ch.isalnum() or ch in "-_" for ch in jti):
            raise InvalidField("jti", f"{request.jti!r} is not a JWT ID Credo issues")
        reason = _reason(request.reason)
        self._store()
        assert self._revoker is not None
        try:
            result = await self._revoker.revoke_jti(jti, reason)
        except NotFound:
            raise ApiError(
                grpc.StatusCode.NOT_FOUND,
                f"no JWT-SVID, WIT-SVID or delegated token with jti {jti} was issued",
            ) from None
        return _revocation_response(result)

    @handle_errors
    async def ListCRLs(
        self, request: admin_pb2.ListCRLsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListCRLsResponse:
        found = await _call(self._store().list_crls)
        return admin_pb2.ListCRLsResponse(crls=[crl_to_proto(c) for c in found])


def _authority_info(info: AuthorityInfo) -> admin_pb2.AuthorityInfo:
    return admin_pb2.AuthorityInfo(
        authority_id=info.authority_id,
        expires_at=int(info.expires_at.timestamp()),
        tainted=info.tainted,
        status=info.status,
    )


class LocalAuthorityService(admin_pb2_grpc.LocalAuthorityServicer):
    """Manual control of the CA's authorities, delegated to the authority manager."""

    def __init__(self, manager: AuthorityManager) -> None:
        self._manager = manager

    @staticmethod
    def _kind(request: admin_pb2.AuthorityRequest) -> AuthorityKind:
        if request.kind not in ("x509", "jwt", "wit"):
            raise InvalidField("kind", f"{request.kind!r} is not one of x509, jwt, wit")
        return cast(AuthorityKind, request.kind)

    @staticmethod
    def _id(request: admin_pb2.AuthorityRequest) -> str:
        if not request.authority_id:
            raise InvalidField("authority_id", "is required (see: localauthority <kind> show)")
        return request.authority_id

    @handle_errors
    async def GetAuthorityState(
        self, request: admin_pb2.AuthorityRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.AuthorityState:
        state = await _call(self._manager.state, self._kind(request))
        return admin_pb2.AuthorityState(
            active=_authority_info(state.active) if state.active else None,
            prepared=_authority_info(state.prepared) if state.prepared else None,
            old=_authority_info(state.old) if state.old else None,
        )

    @handle_errors
    async def PrepareAuthority(
        self, request: admin_pb2.AuthorityRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.AuthorityInfo:
        return _authority_info(await _call(self._manager.prepare, self._kind(request)))

    @handle_errors
    async def ActivateAuthority(
        self, request: admin_pb2.AuthorityRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.AuthorityInfo:
        kind, authority_id = self._kind(request), self._id(request)
        return _authority_info(await _call(self._manager.activate, kind, authority_id))

    @handle_errors
    async def TaintAuthority(
        self, request: admin_pb2.AuthorityRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.AuthorityInfo:
        kind, authority_id = self._kind(request), self._id(request)
        return _authority_info(await _call(self._manager.taint, kind, authority_id))

    @handle_errors
    async def RevokeAuthority(
        self, request: admin_pb2.AuthorityRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.AuthorityInfo:
        kind, authority_id = self._kind(request), self._id(request)
        return _authority_info(await _call(self._manager.revoke, kind, authority_id))


DEFAULT_AUDIT_PAGE: Final = 1000
_VERIFY_PAGE: Final = 5000


def audit_record_to_proto(rec: audit.AuditRecord) -> admin_pb2.AuditRecord:
    return admin_pb2.AuditRecord(
        seq=rec.seq,
        time_ms=rec.time_ms,
        actor_kind=rec.actor.kind,
        actor=rec.actor.id,
        action=rec.action,
        subject=rec.subject,
        target=rec.target,
        owner=rec.owner,
        outcome=rec.outcome,
        reason=rec.reason,
        request_id=rec.request_id,
        details=rec.details,
        prev_hash=rec.prev_hash,
        hash=rec.hash,
    )


class AuditService(admin_pb2_grpc.AuditServicer):
    """The audit trail: list records by identity, person, action and time; verify the chain."""

    def __init__(
        self,
        datastore: DataStore,
        checkpointer: Checkpointer,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._ds = datastore
        self._checkpointer = checkpointer
        self._clock = clock

    @handle_errors
    async def ListAuditRecords(
        self, request: admin_pb2.ListAuditRecordsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListAuditRecordsResponse:
        if request.page_size < 0 or request.page_size > MAX_PAGE_SIZE:
            raise InvalidField("page_size", f"must be between 0 and {MAX_PAGE_SIZE}")
        if request.since_ms < 0 or request.until_ms < 0:
            raise InvalidField("since_ms", "times are unix milliseconds, not negative")
        now_ms = int(self._clock() * 1000)
        if request.since_ms > now_ms:
            raise InvalidField(
                "since_ms", "is in the future: no record can be that new (check the date)"
            )
        if request.until_ms and request.since_ms and request.until_ms <= request.since_ms:
            raise InvalidField("until_ms", "must be later than since_ms")
        if request.by_spiffe_id:
            try:
                SpiffeId.parse(request.by_spiffe_id)
            except InvalidSpiffeId as err:
                raise InvalidField("by_spiffe_id", str(err)) from None
        size = request.page_size or DEFAULT_AUDIT_PAGE
        query = ListAuditRecordsRequest(
            by_spiffe_id=request.by_spiffe_id or None,
            by_owner=request.by_owner or None,
            by_action=request.by_action or None,
            since_ms=request.since_ms or None,
            until_ms=request.until_ms or None,
            after_seq=request.after_seq,
            limit=size + 1,
        )
        found = await _call(self._ds.list_audit_records, query)
        more = len(found) > size
        page = found[:size]
        return admin_pb2.ListAuditRecordsResponse(
            records=[audit_record_to_proto(r) for r in page],
            next_after_seq=page[-1].seq if more else 0,
        )

    def _all_records(self) -> Iterator[audit.AuditRecord]:
        after = 0
        while True:
            page = self._ds.list_audit_records(
                ListAuditRecordsRequest(after_seq=after, limit=_VERIFY_PAGE)
            )
            yield from page
            if len(page) < _VERIFY_PAGE:
                return
            after = page[-1].seq

    def _verify(self) -> admin_pb2.VerifyAuditResponse:
        try:
            # Signatures are checked with the certificate each checkpoint carries; who
            # signed is checked offline against a bundle (`audit verify --file --bundle`).
            result = audit.verify_trail(
                self._all_records(), on_checkpoint=checkpoint_verifier(None)
            )
        except audit.ChainBroken as broken:
            log.error(
                "audit chain broken",
                extra={"seq": broken.seq, "problem": broken.problem},
            )
            return admin_pb2.VerifyAuditResponse(
                ok=False, checked=broken.checked, first_bad_seq=broken.seq, problem=broken.problem
            )
        return admin_pb2.VerifyAuditResponse(
            ok=True,
            checked=result.checked,
            last_seq=result.last_seq,
            head_hash=result.head_hash,
            checkpoints=result.checkpoints,
            signed_through=result.signed_through,
        )

    @handle_errors
    async def VerifyAudit(
        self, request: admin_pb2.VerifyAuditRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.VerifyAuditResponse:
        return await _call(self._verify)

    @handle_errors
    async def CheckpointAudit(
        self, request: admin_pb2.CheckpointAuditRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.AuditRecord:
        made = await _call(self._checkpointer.checkpoint)
        if made is None:
            raise ApiError(grpc.StatusCode.FAILED_PRECONDITION, "the audit trail is empty")
        return audit_record_to_proto(made)

    @handle_errors
    async def PruneAudit(
        self, request: admin_pb2.PruneAuditRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.PruneAuditResponse:
        if request.before_seq < 2:
            raise InvalidField("before_seq", "must be 2 or more (the first record to keep)")
        pruned = await _call(self._ds.prune_audit_records, int(request.before_seq))
        log.warning("pruned audit records", extra={"before_seq": request.before_seq})
        return admin_pb2.PruneAuditResponse(pruned=pruned)
