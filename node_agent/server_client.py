"""The node agent's one client to the signing servers.

Everything the agent asks a server goes through :class:`ServerClient`; nothing else in
``node_agent/`` dials a server, builds a request or reads a gRPC status. It owns:

* **Channels.** After attestation every call is mTLS with the agent SVID.
  :meth:`ServerClient.set_credentials` installs a new SVID or trust bundle: channels are
  rebuilt for the next call, and the old ones retire after a grace so that calls in
  flight finish (:meth:`ServerClient.credentials_changed` fires). A bundle that only adds
  authorities (a CA rotation's prepared CA) leaves a sync stream on its channel: the
  connection was verified against authorities all still trusted; that channel retires
  when the stream ends. A new SVID or a dropped authority moves streams too
  (:meth:`ServerClient.channels_replaced` fires).
* **Failover.** Calls go to the current server address. A unary call that finds its
  server unreachable moves on to the next address and tries again, once around the list
  (in the configured order, wrapping round); a stream moves on for the next attempt. The
  address that answered stays current.
* **Server verification.** The server presents its SVID ``spiffe://<td>/credo/server``,
  which carries the DNS SAN ``server.credo.invalid``
  (:data:`credo._reserved.SERVER_TLS_NAME`, a name the server refuses to put in any other
  SVID). gRPC checks the chain against the trust bundle and that name (every channel sets
  ``grpc.ssl_target_name_override``, since the certificate does not name the host the
  agent dials). As a second line of defence, before an address is first used the client
  makes one TLS handshake of its own and checks that the certificate's URI SAN is exactly
  the server's SPIFFE ID (:func:`verify_server_identity`).
* **One backoff policy** (:class:`Backoff`: exponential, jitter, cap) for every retry loop
  of the agent: attestation, agent-SVID renewal, sync reconnects and SVID signing.
* **Errors.** RPC errors become domain errors (:mod:`node_agent.errors`):
  :class:`ServerUnreachable`, :class:`ServerRefused` (code, message, reason),
  :class:`AgentBanned` and :class:`AgentEvicted`. The server says why it refuses in the
  trailing metadata ``credo-refusal`` (:mod:`credo._protocol`). Before raising AgentBanned
  or AgentEvicted the client calls ``forget_agent_svid`` (the stored SVID must never be
  presented again).

Typed methods: :meth:`~ServerClient.attest`, :meth:`~ServerClient.renew`,
:meth:`~ServerClient.batch_new_x509_svid`, :meth:`~ServerClient.new_jwt_svid`,
:meth:`~ServerClient.sync` (an async iterator of :class:`SyncMessage`) and
:meth:`~ServerClient.fetch_bundle`; requests and answers are Credo's model types.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from credo._proto.credo.server.v1 import agent_pb2, agent_pb2_grpc
from credo._protocol import AGENT_CHANNEL_KEEPALIVE, Refusal, refusal_in
from credo._reserved import SERVER_TLS_NAME, server_spiffe_id
from credo.bundle import Bundle
from credo.errors import CredoError
from credo.jwtsvid import JwtSvid
from credo.keys import PrivateKey, PublicKey, make_csr, private_key_to_pkcs8_pem
from credo.selector import Selector
from credo.spiffe_id import SpiffeId, TrustDomain
from credo.x509svid import X509Svid
from node_agent.errors import (
    AgentBanned,
    AgentEvicted,
    AgentRemoved,
    BadServerResponse,
    ServerClientError,
    ServerNotTrusted,
    ServerRefused,
    ServerUnreachable,
)
from node_agent.sync.entries import Crls, RegistrationEntry, SyncMessage, TrustBundles

__all__ = [
    "MAX_BATCH",
    "AttestResult",
    "Backoff",
    "BackoffPolicy",
    "IssuedJwtSvid",
    "IssuedWitSvid",
    "ServerClient",
    "ServerClientConfig",
    "X509SvidResult",
    "fetch_server_certificate",
    "verify_server_identity",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_BATCH = 500
"""Most CSRs the server accepts in one ``BatchNewX509SVID`` call."""

_CHANNEL_RETIRE_GRACE = 10.0
# A retry delay is at most the agent SVID's time left over this (see backoff()).
_RETRY_SHARE_OF_SVID = 3.0
_UNREACHABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)
_CHANNEL_OPTIONS = (
    ("grpc.ssl_target_name_override", SERVER_TLS_NAME),
    *AGENT_CHANNEL_KEEPALIVE,
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
)


# --- backoff ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BackoffPolicy:
    """Exponential backoff: ``initial`` seconds, times ``factor`` per failure, up to ``cap``,
    each delay moved by up to ``jitter`` (a fraction) either way."""

    initial: float = 0.2
    cap: float = 30.0
    factor: float = 2.0
    jitter: float = 0.2


class Backoff:
    """The delays of one retry loop under a :class:`BackoffPolicy`."""

    def __init__(
        self,
        policy: BackoffPolicy,
        *,
        rng: Callable[[], float] = random.random,
        limit: Callable[[], float] | None = None,
    ) -> None:
        self.policy = policy
        self._rng = rng
        self._limit = limit
        self._attempt = 0

    def next(self) -> float:
        """The delay before the next attempt (grows per failure, jittered, never above the
        cap, nor above ``limit()`` when given: see :meth:`ServerClient.backoff`)."""
        policy = self.policy
        cap = policy.cap
        if self._limit is not None:
            cap = max(min(policy.initial, cap), min(cap, self._limit()))
        base = min(cap, policy.initial * policy.factor ** min(self._attempt, 64))
        self._attempt += 1
        moved = base * (1.0 + policy.jitter * (2.0 * self._rng() - 1.0))
        return float(min(cap, moved))

    def reset(self) -> None:
        """Start again from ``initial`` (after a success)."""
        self._attempt = 0


# --- server verification ---------------------------------------------------------------


def _pem(certs: Iterable[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _handshake(address: str, context: ssl.SSLContext, timeout: float) -> bytes:
    """TLS-handshake with ``address`` and return the peer's leaf certificate (DER)."""
    host, port = _split_address(address)
    with (
        socket.create_connection((host, port), timeout=timeout) as raw,
        context.wrap_socket(raw, server_hostname=SERVER_TLS_NAME) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    if not der:
        raise ssl.SSLError("server presented no certificate")
    return der


def verify_server_identity(
    address: str,
    authorities: tuple[x509.Certificate, ...],
    expected: SpiffeId,
    timeout: float = 5.0,
) -> None:
    """Check that ``address`` presents a certificate chaining to ``authorities`` for ``expected``.

    Raises :class:`ServerUnreachable` when the server cannot be reached or is not it.
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=_pem(authorities).decode())
    context.check_hostname = False
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    context.set_alpn_protocols(["h2"])
    try:
        der = _handshake(address, context, timeout)
    except ssl.SSLCertVerificationError as exc:
        raise ServerNotTrusted(
            f"server {address} presented a certificate that does not chain to the trusted "
            f"CAs ({exc.verify_message})"
        ) from None
    except (OSError, ssl.SSLError) as exc:
        raise ServerUnreachable(f"cannot reach server {address}: {_why(exc, timeout)}") from None
    cert = x509.load_der_x509_certificate(der)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    if uris != [str(expected)]:
        raise ServerUnreachable(
            f"server {address} presented SPIFFE ID {', '.join(uris) or '(none)'}; "
            f"expected {expected}"
        )


def fetch_server_certificate(address: str, timeout: float = 5.0) -> x509.Certificate:
    """The leaf certificate ``address`` presents, *without verifying it* (insecure bootstrap)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    try:
        der = _handshake(address, context, timeout)
    except (OSError, ssl.SSLError) as exc:
        raise ServerUnreachable(f"cannot reach server {address}: {_why(exc, timeout)}") from None
    return x509.load_der_x509_certificate(der)


def _why(exc: OSError | ssl.SSLError, timeout: float) -> str:
    """A connection failure in words (``connection refused``, not ``[Errno 111] ...``)."""
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (nothing listens on that port)"
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g}s"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name ({exc.strerror})"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed ({exc.reason or exc})"
    return str(exc.strerror or exc).lower()


# --- what the typed methods return ---------------------------------------------------


@dataclass(frozen=True)
class AttestResult:
    """What node attestation returns: the agent SVID and the trust bundle's X.509 authorities."""

    svid: X509Svid
    authorities: tuple[x509.Certificate, ...]


@dataclass(frozen=True)
class X509SvidResult:
    """The server's answer for one CSR of a batch: a chain, or why it refused."""

    entry_id: str
    chain: tuple[x509.Certificate, ...] = ()
    """Leaf first; empty when refused."""
    refusal: str = ""
    """``"<code>: <message>"`` when the server refused this CSR (or sent an unusable chain)."""


@dataclass(frozen=True)
class IssuedJwtSvid:
    """A JWT-SVID the server signed, with its lifetime (Unix times)."""

    token: str
    issued_at: float
    expires_at: float


@dataclass(frozen=True)
class IssuedWitSvid:
    """The server's answer for one public key of a WIT batch: a token, or why it refused."""

    entry_id: str
    token: str = field(default="", repr=False)
    issued_at: float = 0.0
    expires_at: float = 0.0
    refusal: str = ""
    """``"<code>: <message>"`` when the server refused this item."""


# --- protobuf -> model -------------------------------------------------------------------


def _status_name(code: int) -> str:
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return str(status.name)
    return str(code)


def _entry(message: Any) -> RegistrationEntry:
    """Convert a ``RegistrationEntry`` message; raise ValueError if it is malformed."""
    return RegistrationEntry(
        id=message.id,
        spiffe_id=SpiffeId.parse(message.spiffe_id),
        parent_id=message.parent_id,
        selectors=frozenset(Selector(s.type, s.value) for s in message.selectors),
        x509_svid_ttl=message.x509_svid_ttl,
        jwt_svid_ttl=message.jwt_svid_ttl,
        dns_names=tuple(message.dns_names),
        admin=message.admin,
        downstream=message.downstream,
        node_alias=message.node_alias,
        hint=message.hint,
        expires_at=message.expires_at,
        federates_with=tuple(message.federates_with),
        revision_number=message.revision_number,
        created_at=message.created_at,
    )


def _entries(messages: Iterable[Any]) -> tuple[RegistrationEntry, ...]:
    out = []
    for item in messages:
        try:
            out.append(_entry(item))
        except (CredoError, ValueError) as exc:
            log.warning(
                "ignoring malformed entry from the server",
                extra={"entry_id": item.id, "error": str(exc)},
            )
    return tuple(out)


def _bundle(message: Any) -> tuple[Bundle, frozenset[bytes], frozenset[str]]:
    """A ``Bundle`` message as a :class:`Bundle`, the DER of its tainted X.509 authorities
    and the key ids of its tainted JWT authorities; ValueError if malformed."""
    authorities = []
    tainted = set()
    for authority in message.x509_authorities:
        cert = x509.load_der_x509_certificate(bytes(authority.asn1))
        authorities.append(cert)
        if authority.tainted:
            tainted.add(cert.public_bytes(serialization.Encoding.DER))
    jwt_keys: dict[str, PublicKey] = {}
    for key in message.jwt_authorities:
        public = serialization.load_der_public_key(bytes(key.public_key))
        jwt_keys[key.key_id] = public  # type: ignore[assignment]
    wit_keys: dict[str, PublicKey] = {}
    for key in message.wit_authorities:
        public = serialization.load_der_public_key(bytes(key.public_key))
        wit_keys[key.key_id] = public  # type: ignore[assignment]
    bundle = Bundle(
        message.trust_domain,
        tuple(authorities),
        jwt_keys,
        message.sequence_number,
        message.refresh_hint or None,
        wit_keys,
    )
    # Key ids are unique across JWT and WIT keys (WIT-SVID 6.1): one set of tainted ids.
    tainted_jwt = frozenset(
        k.key_id for k in (*message.jwt_authorities, *message.wit_authorities) if k.tainted
    )
    return bundle, frozenset(tainted), tainted_jwt


def _crls(message: Any) -> Crls:
    """A ``CrlSet`` message as :class:`Crls`; a malformed CRL is left out (and logged)."""
    der: list[bytes] = []
    serials: set[int] = set()
    for item in message.crls:
        try:
            crl = x509.load_der_x509_crl(bytes(item.der))
            revoked = {r.serial_number for r in crl}
        except ValueError as exc:
            log.warning(
                "ignoring malformed CRL from the server",
                extra={"authority_id": item.authority_id, "error": str(exc)},
            )
            continue
        der.append(bytes(item.der))
        serials |= revoked
    return Crls(tuple(der), frozenset(serials))


def _sync_message(message: Any) -> SyncMessage:
    """A ``SyncEntriesResponse`` as a :class:`SyncMessage`; a malformed bundle is left out."""
    bundle = None
    tainted: frozenset[bytes] = frozenset()
    tainted_jwt: frozenset[str] = frozenset()
    federated: tuple[Bundle, ...] = ()
    try:
        if message.HasField("bundle") and message.bundle.trust_domain:
            bundle, tainted, tainted_jwt = _bundle(message.bundle)
        federated = tuple(_bundle(item)[0] for item in message.federated_bundles)
    except (CredoError, ValueError) as exc:
        log.warning("ignoring malformed bundle from the server", extra={"error": str(exc)})
        bundle, tainted, tainted_jwt, federated = None, frozenset(), frozenset(), ()
    return SyncMessage(
        event_id=message.event_id,
        full=message.full,
        crls=_crls(message.crl_set) if message.HasField("crl_set") else None,
        revoked_jtis=(
            frozenset(j.jti for j in message.revoked_jwt_set.jwts)
            if message.HasField("revoked_jwt_set")
            else None
        ),
        entries=_entries(message.entries),
        deleted_entry_ids=tuple(message.deleted_entry_ids),
        bundle=bundle,
        tainted_x509=tainted,
        tainted_jwt=tainted_jwt,
        federated_bundles=federated,
        heartbeat_interval=message.heartbeat_interval_ms / 1000,
        digest=bytes(message.entries_digest),
    )


def _svid(message: Any, key: PrivateKey) -> X509Svid:
    """An ``X509Svid`` message and its key as an :class:`X509Svid`."""
    chain = b"".join(bytes(c) for c in message.cert_chain)
    try:
        return X509Svid.parse(chain, private_key_to_pkcs8_pem(key))
    except CredoError as exc:
        raise BadServerResponse(f"server returned an unusable agent SVID: {exc}") from None


def _x509_result(result: Any) -> X509SvidResult:
    if result.status.code != 0:
        refusal = f"{_status_name(result.status.code)}: {result.status.message}"
        return X509SvidResult(result.entry_id, refusal=refusal)
    try:
        chain = tuple(x509.load_der_x509_certificate(bytes(c)) for c in result.svid.cert_chain)
    except ValueError as exc:
        return X509SvidResult(result.entry_id, refusal=f"unusable certificate chain: {exc}")
    return X509SvidResult(result.entry_id, chain)


# --- errors ----------------------------------------------------------------------------


def _refusal(err: grpc.aio.AioRpcError) -> Refusal | None:
    """Why the server refused: its ``credo-refusal`` trailing metadata, if any."""
    reason = refusal_in(err.trailing_metadata())
    if reason is not None:
        return reason
    # REMOVE once every server sends credo-refusal (issue 7): servers from before it say
    # "banned" or "evicted" only in the words of the message. The one place that reads them.
    if err.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
        details = (err.details() or "").lower()
        for legacy in (Refusal.BANNED, Refusal.EVICTED):
            if legacy.value in details:
                return legacy
    return None


def _closed_under(address: str, what: str) -> BaseException:
    """What to raise for a CancelledError out of a gRPC call to ``address``.

    gRPC cancels the calls of a channel that closes (a retired channel after its grace)
    and says so with CancelledError. Unless the calling task is itself being cancelled,
    that is not a cancellation of the caller, and must not end its loop silently: it is
    :class:`ServerUnreachable` (not a fault of the server: no failover). Otherwise the
    CancelledError goes on.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        return asyncio.CancelledError()
    return ServerUnreachable(f"server {address}: {what} was cancelled (its channel was closed)")


# --- the client ------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerClientConfig:
    """Where the servers are and how to call them; times in seconds."""

    server_addresses: tuple[str, ...]
    trust_domain: TrustDomain
    backoff: BackoffPolicy = BackoffPolicy()
    # Per-call deadline of attestation, renewal and bundle calls.
    rpc_timeout: float = 10.0
    # Per-call deadline of signing calls (a batch of 500 CSRs takes a while).
    signing_timeout: float = 30.0
    # Deadline of the TLS handshake that verifies a server's identity.
    verify_timeout: float = 5.0


class ServerClient:
    """The agent's typed client to the signing servers; see the module docstring."""

    def __init__(
        self,
        config: ServerClientConfig,
        *,
        forget_agent_svid: Callable[[], None] = lambda: None,
    ) -> None:
        if not config.server_addresses:
            raise ValueError("at least one server address is required")
        self.config = config
        self.server_id = server_spiffe_id(config.trust_domain)
        self._forget_agent_svid = forget_agent_svid
        self._index = 0
        self._svid: X509Svid | None = None
        self._authorities: tuple[x509.Certificate, ...] = ()
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._verified: set[str] = set()
        # Channels closing after their grace, by the task closing each.
        self._retiring: dict[asyncio.Task[None], grpc.aio.Channel] = {}
        self._changed = asyncio.Event()
        self._replaced = asyncio.Event()
        # Sync streams open on each channel; retired channels kept until their streams end.
        self._streams: dict[grpc.aio.Channel, int] = {}
        self._lingering: set[grpc.aio.Channel] = set()

    # --- state ---------------------------------------------------------------------------

    @property
    def address(self) -> str:
        """The server address calls currently go to."""
        addresses = self.config.server_addresses
        return addresses[self._index % len(addresses)]

    @property
    def agent_id(self) -> SpiffeId:
        """The agent's SPIFFE ID; RuntimeError before :meth:`set_credentials`."""
        if self._svid is None:
            raise RuntimeError("the server client has no agent SVID yet")
        return self._svid.spiffe_id

    def failover(self, error: str = "") -> str:
        """Move to the next server address (round-robin) and return it; ``error`` says why."""
        if len(self.config.server_addresses) > 1:
            self._index = (self._index + 1) % len(self.config.server_addresses)
            log.info("failing over to next server", extra={"server": self.address, "error": error})
        return self.address

    def backoff(self) -> Backoff:
        """A fresh :class:`Backoff` under the agent's one policy, for one retry loop.

        Its delays never exceed a third of the time the agent SVID has left either: with a
        short agent SVID TTL a retry loop that waited out the policy's cap (30 s by
        default) could outlast the SVID, and an agent whose server came back after a
        restart would still be waiting when its SVID expired. Once the SVID has expired
        the policy's cap applies again.
        """
        return Backoff(self.config.backoff, limit=self._retry_limit)

    def _retry_limit(self) -> float:
        if self._svid is None:
            return self.config.backoff.cap
        left = self._svid.leaf.not_valid_after_utc.timestamp() - time.time()
        if left <= 0:
            return self.config.backoff.cap
        return left / _RETRY_SHARE_OF_SVID

    def set_credentials(self, svid: X509Svid, authorities: tuple[x509.Certificate, ...]) -> None:
        """Call with ``svid`` and trust ``authorities`` from now on; rebuild the channels.

        Old channels retire after a grace (calls in flight finish on them), every address is
        verified again before its next use (unless every authority trusted so far still is:
        then a server's identity verified against them stays verified), and
        :meth:`credentials_changed` fires; so does :meth:`channels_replaced`, unless only
        authorities were added to those trusted (the same SVID): then a channel carrying a
        sync stream stays open until the stream ends.
        """
        still_trusted = set(self._authorities) <= set(authorities)
        added_only = svid is self._svid and still_trusted
        self._svid = svid
        self._authorities = authorities
        for channel in self._channels.values():
            if added_only and self._streams.get(channel):
                self._lingering.add(channel)
            else:
                self._retire(channel)
        self._channels.clear()
        if not still_trusted:
            self._verified.clear()
        self._changed.set()
        self._changed = asyncio.Event()
        if not added_only:
            self._replaced.set()
            self._replaced = asyncio.Event()

    def _retire(self, channel: grpc.aio.Channel) -> None:
        task = asyncio.get_running_loop().create_task(channel.close(grace=_CHANNEL_RETIRE_GRACE))
        self._retiring[task] = channel
        task.add_done_callback(lambda done: self._retiring.pop(done, None))

    def credentials_changed(self) -> asyncio.Event:
        """An event set the next time the agent SVID or the trust bundle is replaced."""
        return self._changed

    def channels_replaced(self) -> asyncio.Event:
        """An event set the next time open streams must move to new channels: a new agent
        SVID, or an authority no longer trusted (not a bundle that only adds some)."""
        return self._replaced

    async def close(self) -> None:
        """Close every channel, retiring ones included (at once, not after their grace)."""
        retiring = list(self._retiring.values())
        for channel in [*self._channels.values(), *self._lingering, *retiring]:
            with contextlib.suppress(Exception):
                await channel.close(grace=None)
        self._channels.clear()
        self._lingering.clear()
        for task in list(self._retiring):
            task.cancel()
        for task in list(self._retiring):
            with contextlib.suppress(BaseException):
                await task

    # --- channels and errors -----------------------------------------------------------

    async def _verify(self, address: str, authorities: tuple[x509.Certificate, ...]) -> None:
        await asyncio.to_thread(
            verify_server_identity,
            address,
            authorities,
            self.server_id,
            self.config.verify_timeout,
        )

    async def _stub(self, address: str) -> Any:
        """An ``Agent`` stub on the mTLS channel to ``address`` (verified on first use)."""
        return agent_pb2_grpc.AgentStub(await self._channel(address))

    async def _channel(self, address: str) -> grpc.aio.Channel:
        """The mTLS channel to ``address`` (verified on first use)."""
        if self._svid is None:
            raise RuntimeError("the server client has no agent SVID yet")
        channel = self._channels.get(address)
        if channel is None:
            if address not in self._verified:
                await self._verify(address, self._authorities)
                self._verified.add(address)
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_pem(self._authorities),
                private_key=self._svid.marshal_key_pem(),
                certificate_chain=self._svid.marshal_chain_pem(),
            )
            channel = grpc.aio.secure_channel(address, credentials, options=_CHANNEL_OPTIONS)
            self._channels[address] = channel
        return channel

    def _error(
        self, err: grpc.aio.AioRpcError, address: str, *, may_remove: bool = True
    ) -> ServerClientError | AgentRemoved:
        """The domain error for ``err`` from ``address``; forgets the SVID on a ban."""
        code = err.code()
        details = err.details() or ""
        if code in _UNREACHABLE:
            return ServerUnreachable(f"server {address}: {code.name}: {details}")
        reason = _refusal(err)
        if may_remove and reason in (Refusal.BANNED, Refusal.EVICTED):
            agent_id = str(self._svid.spiffe_id) if self._svid else "(unknown)"
            removed: AgentRemoved = (
                AgentBanned(agent_id) if reason is Refusal.BANNED else AgentEvicted(agent_id)
            )
            self._forget_agent_svid()
            log.error(
                f"agent was {removed.action} by the server; stored SVID deleted",
                extra={"spiffe_id": agent_id, "server": address},
            )
            return removed
        return ServerRefused(code.name, details, reason, server=address)

    async def _around(
        self, attempt: Callable[[str], Awaitable[T]], *, may_remove: bool = True
    ) -> T:
        """``attempt(address)`` on the current server; on an unreachable one, fail over and
        try the next, once around the list. The one failover loop of every unary call."""
        last: ServerUnreachable | None = None
        for _ in self.config.server_addresses:
            address = self.address
            try:
                return await attempt(address)
            except ServerUnreachable as exc:
                last = exc
            except grpc.aio.AioRpcError as exc:
                error = self._error(exc, address, may_remove=may_remove)
                if not isinstance(error, ServerUnreachable):
                    raise error from None
                last = error
            self.failover(str(last))
        assert last is not None
        raise last

    async def _unary(self, method: str, request: Any, timeout: float) -> Any:
        """Call ``method`` with ``request`` over mTLS (see :meth:`_around`)."""

        async def attempt(address: str) -> Any:
            stub = await self._stub(address)
            try:
                return await getattr(stub, method)(request, timeout=timeout)
            except asyncio.CancelledError:
                raise _closed_under(address, method) from None

        return await self._around(attempt)

    # --- typed methods -------------------------------------------------------------------

    async def attest(
        self,
        attestor_type: str,
        payload: bytes,
        key: PrivateKey,
        roots: tuple[x509.Certificate, ...] | None,
    ) -> AttestResult:
        """Attest the node with ``payload`` for a new agent SVID for ``key``.

        ``roots`` are the certificates trusted for the server (the bootstrap bundle, or the
        current bundle when attesting again); ``None`` trusts whatever certificate each
        server presents (insecure bootstrap). Tries each address once, like every unary
        call. A refusal is :class:`ServerRefused` (never AgentBanned: there is no agent SVID
        to forget yet). Does not install the SVID: see :meth:`set_credentials`.
        """
        request = agent_pb2.AttestAgentRequest(
            attestation_data=agent_pb2.AttestationData(type=attestor_type, payload=payload),
            csr=make_csr(key),
        )
        return await self._around(
            lambda address: self._attest_once(address, request, key, roots), may_remove=False
        )

    async def _attest_once(
        self,
        address: str,
        request: Any,
        key: PrivateKey,
        roots: tuple[x509.Certificate, ...] | None,
    ) -> AttestResult:
        if roots is None:
            trusted: tuple[x509.Certificate, ...] = (
                await asyncio.to_thread(
                    fetch_server_certificate, address, self.config.verify_timeout
                ),
            )
        else:
            await self._verify(address, roots)
            trusted = roots
        credentials = grpc.ssl_channel_credentials(root_certificates=_pem(trusted))
        async with grpc.aio.secure_channel(
            address, credentials, options=[("grpc.ssl_target_name_override", SERVER_TLS_NAME)]
        ) as channel:
            response = await agent_pb2_grpc.AgentStub(channel).AttestAgent(
                request, timeout=self.config.rpc_timeout
            )
        svid = _svid(response.svid, key)
        try:
            authorities = tuple(
                x509.load_der_x509_certificate(bytes(a.asn1))
                for a in response.bundle.x509_authorities
            )
        except ValueError as exc:
            raise BadServerResponse(
                f"server {address} returned a malformed bundle: {exc}"
            ) from None
        if not authorities:
            raise BadServerResponse(f"server {address} returned an empty trust bundle")
        return AttestResult(svid, authorities)

    async def renew(self, key: PrivateKey) -> X509Svid:
        """A renewed agent SVID for ``key`` (``RenewAgent``); does not install it."""
        response = await self._unary(
            "RenewAgent",
            agent_pb2.RenewAgentRequest(csr=make_csr(key)),
            self.config.rpc_timeout,
        )
        return _svid(response.svid, key)

    async def batch_new_x509_svid(self, csrs: Sequence[tuple[str, bytes]]) -> list[X509SvidResult]:
        """Sign one CSR (DER) per entry id, at most :data:`MAX_BATCH`; one result per answer."""
        if len(csrs) > MAX_BATCH:
            raise ValueError(f"at most {MAX_BATCH} CSRs per batch, got {len(csrs)}")
        request = agent_pb2.BatchNewX509SVIDRequest(
            params=[agent_pb2.NewX509SVIDParams(entry_id=e, csr=c) for e, c in csrs]
        )
        response = await self._unary("BatchNewX509SVID", request, self.config.signing_timeout)
        return [_x509_result(result) for result in response.results]

    async def batch_new_wit_svid(self, keys: Sequence[tuple[str, bytes]]) -> list[IssuedWitSvid]:
        """Sign one WIT-SVID per (entry id, DER public key), at most :data:`MAX_BATCH`."""
        if len(keys) > MAX_BATCH:
            raise ValueError(f"at most {MAX_BATCH} public keys per batch, got {len(keys)}")
        request = agent_pb2.BatchNewWITSVIDRequest(
            params=[agent_pb2.NewWITSVIDParams(entry_id=e, public_key=k) for e, k in keys]
        )
        response = await self._unary("BatchNewWITSVID", request, self.config.signing_timeout)
        out = []
        for result in response.results:
            if result.status.code != 0:
                refusal = f"{_status_name(result.status.code)}: {result.status.message}"
                out.append(IssuedWitSvid(result.entry_id, refusal=refusal))
                continue
            out.append(
                IssuedWitSvid(
                    result.entry_id,
                    result.svid.token,
                    float(result.svid.issued_at),
                    float(result.svid.expires_at),
                )
            )
        return out

    async def new_jwt_svid(self, entry_id: str, audience: Sequence[str]) -> IssuedJwtSvid:
        """A JWT-SVID for ``entry_id`` and ``audience``, with its lifetime."""
        request = agent_pb2.NewJWTSVIDRequest(entry_id=entry_id, audience=list(audience))
        response = await self._unary("NewJWTSVID", request, self.config.signing_timeout)
        token = response.svid.token
        issued_at = float(response.svid.issued_at)
        expires_at = float(response.svid.expires_at)
        if not expires_at or not issued_at:
            try:
                parsed = JwtSvid.parse_insecure(token, list(audience))
            except CredoError as exc:
                raise BadServerResponse(f"server returned an unusable JWT-SVID: {exc}") from None
            expires_at = parsed.expires_at.timestamp()
            issued_at = parsed.issued_at.timestamp() if parsed.issued_at else 0.0
        return IssuedJwtSvid(token, issued_at, expires_at)

    async def fetch_bundle(self) -> TrustBundles:
        """The trust domain's bundle (with its tainted authorities) and the federated ones."""
        response = await self._unary(
            "GetBundle", agent_pb2.GetBundleRequest(), self.config.rpc_timeout
        )
        try:
            own, tainted, tainted_jwt = _bundle(response.bundle)
            federated = {}
            for item in response.federated_bundles:
                bundle = _bundle(item)[0]
                federated[str(bundle.trust_domain)] = bundle
        except (CredoError, ValueError) as exc:
            raise BadServerResponse(f"server returned a malformed bundle: {exc}") from None
        return TrustBundles(own, tainted, federated, tainted_jwt)

    async def sync(self, resume_after_event_id: int = 0) -> AsyncIterator[SyncMessage]:
        """The ``SyncEntries`` stream from the current server, as :class:`SyncMessage`.

        Ends when the server ends the stream; raises :class:`ServerUnreachable` (having
        failed over: the next attempt goes to the next address), :class:`ServerRefused`,
        or :class:`AgentBanned` / :class:`AgentEvicted`.
        """
        address = self.address
        try:
            channel = await self._channel(address)
        except ServerUnreachable as exc:
            self.failover(str(exc))
            raise
        call = agent_pb2_grpc.AgentStub(channel).SyncEntries(
            agent_pb2.SyncEntriesRequest(resume_after_event_id=resume_after_event_id)
        )
        self._streams[channel] = self._streams.get(channel, 0) + 1
        try:
            async for message in call:
                yield _sync_message(message)
        except grpc.aio.AioRpcError as exc:
            error = self._error(exc, address)
            if isinstance(error, ServerUnreachable):
                self.failover(str(error))
            raise error from None
        except asyncio.CancelledError:
            raise _closed_under(address, "the sync stream") from None
        finally:
            call.cancel()
            self._stream_ended(channel)

    def _stream_ended(self, channel: grpc.aio.Channel) -> None:
        left = self._streams.pop(channel, 0) - 1
        if left > 0:
            self._streams[channel] = left
        elif channel in self._lingering:
            self._lingering.discard(channel)
            self._retire(channel)
