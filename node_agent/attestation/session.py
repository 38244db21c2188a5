"""The agent's session with the signing servers: node attestation, mTLS channels, renewal.

:class:`AgentSession` owns the agent SVID. On :meth:`AgentSession.start` it resumes with
the SVID stored in the data dir when that is still valid, else attests with the join
token. Every later call is mTLS with the agent SVID; :meth:`AgentSession.stub` hands out
a stub on the channel to the current server address and :meth:`AgentSession.failover`
moves to the next one (round-robin). :meth:`AgentSession.run_renewal` renews the SVID at
half its lifetime with a new key and rebuilds the channels.

Server verification. The server presents its SVID ``spiffe://<td>/credo/server``, which
carries the DNS SAN ``server.credo.invalid`` (:data:`credo._reserved.SERVER_TLS_NAME`,
a name the server refuses to put in any other SVID). gRPC checks the chain against the
trust bundle and the host name; since the server's certificate does not name the host the
agent dials, every channel sets ``grpc.ssl_target_name_override`` to that name. As a
second line of defence, before a channel is first used the agent makes one TLS handshake
of its own (same trust bundle) and checks that the certificate's URI SAN is exactly the
server's SPIFFE ID (:func:`verify_server_identity`).

With ``insecure_bootstrap`` (no trust bundle) the first attestation trusts whatever
certificate the server presents, and says so loudly; afterwards the bundle returned by
the server is used, as with a bootstrap bundle.

Bans. Any call answered PERMISSION_DENIED or UNAUTHENTICATED with "banned" in the message
means the server banned this agent: :meth:`AgentSession.raise_if_banned` deletes the stored
SVID and key and raises :class:`AgentBanned`, which ends the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from credo._proto.credo.server.v1 import agent_pb2, agent_pb2_grpc
from credo._reserved import SERVER_TLS_NAME
from credo.bundle import load_certificates
from credo.errors import CredoError
from credo.keys import PrivateKey, generate_private_key, make_csr
from credo.spiffe_id import SpiffeId, TrustDomain
from credo.x509svid import X509Svid
from node_agent.attestation.anchor import find_anchor
from node_agent.attestation.errors import (
    AgentBanned,
    AttestationRejected,
    NoAgentCredentials,
    ServerUnreachable,
)
from node_agent.attestation.store import SvidStore

__all__ = [
    "AgentSession",
    "SessionConfig",
    "ban_action",
    "is_banned",
    "verify_server_identity",
]

log = logging.getLogger(__name__)

_TARGET_NAME = SERVER_TLS_NAME
_CHANNEL_RETIRE_GRACE = 10.0


@dataclass(frozen=True)
class SessionConfig:
    """What the session needs from the agent's configuration."""

    server_addresses: tuple[str, ...]
    trust_domain: TrustDomain
    data_dir: Path
    trust_bundle: Path | None = None
    insecure_bootstrap: bool = False
    join_token: str | None = None
    # Per-call deadline for unary calls to the server.
    rpc_timeout: float = 10.0
    # How long attestation keeps retrying servers that do not answer.
    attest_retry_timeout: float = 30.0


def _pem(certs: tuple[x509.Certificate, ...] | list[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _handshake(address: str, context: ssl.SSLContext, timeout: float) -> bytes:
    """TLS-handshake with ``address`` and return the peer's leaf certificate (DER)."""
    host, port = _split_address(address)
    with (
        socket.create_connection((host, port), timeout=timeout) as raw,
        context.wrap_socket(raw, server_hostname=_TARGET_NAME) as tls,
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
    except (OSError, ssl.SSLError) as exc:
        raise ServerUnreachable(f"cannot verify server {address}: {exc}") from None
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
        raise ServerUnreachable(f"cannot reach server {address}: {exc}") from None
    return x509.load_der_x509_certificate(der)


def ban_action(err: BaseException) -> str | None:
    """``"banned"`` or ``"evicted"`` when ``err`` is the server refusing this agent for good."""
    if not isinstance(err, grpc.aio.AioRpcError):
        return None
    if err.code() not in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
        return None
    details = (err.details() or "").lower()
    for action in ("banned", "evicted"):
        if action in details:
            return action
    return None


def is_banned(err: BaseException) -> bool:
    """True when ``err`` says this agent is banned or was evicted."""
    return ban_action(err) is not None


class AgentSession:
    """The agent SVID, the trust bundle, and mTLS channels to the server addresses."""

    def __init__(
        self,
        config: SessionConfig,
        store: SvidStore | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.store = store or SvidStore(config.data_dir)
        self._clock = clock
        self._svid: X509Svid | None = None
        self._svid_received_at: float | None = None  # when the current SVID came from a server
        self._authorities: tuple[x509.Certificate, ...] = ()
        self._index = 0
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._verified: set[str] = set()
        self._retiring: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()
        self._renew_now = asyncio.Event()
        self.server_id = SpiffeId.from_segments(config.trust_domain, "credo", "server")

    # --- state -------------------------------------------------------------------------

    @property
    def svid(self) -> X509Svid:
        """The current agent SVID; only valid after :meth:`start`."""
        if self._svid is None:
            raise RuntimeError("agent session not started")
        return self._svid

    @property
    def agent_id(self) -> SpiffeId:
        """The agent's SPIFFE ID."""
        return self.svid.spiffe_id

    @property
    def address(self) -> str:
        """The server address calls currently go to."""
        return self.config.server_addresses[self._index % len(self.config.server_addresses)]

    @property
    def authorities(self) -> tuple[x509.Certificate, ...]:
        """The X.509 authorities the agent trusts for the server's certificate."""
        return self._authorities

    def failover(self) -> str:
        """Move to the next server address (round-robin) and return it."""
        if len(self.config.server_addresses) > 1:
            self._index = (self._index + 1) % len(self.config.server_addresses)
            log.info("failing over to next server", extra={"server": self.address})
        return self.address

    # --- start: resume or attest --------------------------------------------------------

    async def start(self) -> None:
        """Resume with the stored agent SVID if still valid, else attest with the join token."""
        stored = await asyncio.to_thread(self.store.load)
        now = datetime.fromtimestamp(self._clock(), UTC)
        if stored is not None:
            svid = stored.svid
            if svid.spiffe_id.trust_domain != self.config.trust_domain:
                log.warning(
                    "stored agent SVID is for another trust domain; ignoring it",
                    extra={"spiffe_id": str(svid.spiffe_id)},
                )
            elif svid.expires_at <= now:
                log.warning(
                    "stored agent SVID has expired",
                    extra={
                        "spiffe_id": str(svid.spiffe_id),
                        "expired_at": svid.expires_at.isoformat(),
                    },
                )
            else:
                self._svid = svid
                self._authorities = stored.authorities
                log.info(
                    "resuming with stored agent SVID",
                    extra={
                        "spiffe_id": str(svid.spiffe_id),
                        "expires_at": svid.expires_at.isoformat(),
                    },
                )
                return
        if not self.config.join_token:
            reason = (
                "the stored agent SVID has expired"
                if stored is not None
                else f"no stored agent SVID in {self.store.data_dir}"
            )
            raise NoAgentCredentials(
                f"no stored agent SVID and no --join-token: {reason}; generate a token with "
                "'credo-server token generate' and pass it with --join-token"
            )
        await self.attest(self.config.join_token)

    async def _bootstrap_roots(self, address: str) -> bytes:
        """The root certificates (PEM) to trust for the first attestation with ``address``."""
        if self.config.trust_bundle is not None:
            try:
                certs = load_certificates(self.config.trust_bundle.read_bytes())
            except OSError as exc:
                raise NoAgentCredentials(
                    f"cannot read trust bundle {self.config.trust_bundle}: {exc.strerror}"
                ) from None
            except ValueError as exc:
                raise NoAgentCredentials(
                    f"trust bundle {self.config.trust_bundle} is not PEM certificates: {exc}"
                ) from None
            if not certs:
                raise NoAgentCredentials(f"trust bundle {self.config.trust_bundle} is empty")
            await asyncio.to_thread(verify_server_identity, address, tuple(certs), self.server_id)
            return _pem(certs)
        if self.config.insecure_bootstrap:
            log.warning(
                "INSECURE BOOTSTRAP: trusting the server's certificate WITHOUT verification "
                "for this first attestation; use --trust-bundle in production",
                extra={"server": address},
            )
            cert = await asyncio.to_thread(fetch_server_certificate, address)
            return _pem([cert])
        raise NoAgentCredentials(
            "no trust bundle to verify the server: pass --trust-bundle FILE "
            "(from 'credo-server bundle show --format pem') or --insecure-bootstrap"
        )

    async def attest(self, join_token: str) -> None:
        """Attest with ``join_token``, trying each server address; store the SVID."""
        deadline = time.monotonic() + self.config.attest_retry_timeout
        delay = 0.2
        last_error = "no server address configured"
        while True:
            for _ in self.config.server_addresses:
                address = self.address
                try:
                    await self._attest_once(address, join_token)
                    return
                except ServerUnreachable as exc:
                    last_error = str(exc)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() in (
                        grpc.StatusCode.UNAVAILABLE,
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                    ):
                        last_error = f"server {address}: {exc.details()}"
                    else:
                        raise AttestationRejected(
                            f"server {address} refused the node attestation: {exc.details()}"
                        ) from None
                log.warning(
                    "node attestation attempt failed",
                    extra={"server": address, "error": last_error},
                )
                self.failover()
            if time.monotonic() + delay > deadline:
                raise ServerUnreachable(f"node attestation failed: {last_error}")
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, 5.0)

    async def _attest_once(self, address: str, join_token: str) -> None:
        roots = await self._bootstrap_roots(address)
        key = generate_private_key()
        request = agent_pb2.AttestAgentRequest(
            attestation_data=agent_pb2.AttestationData(
                type="join_token", payload=join_token.encode()
            ),
            csr=make_csr(key),
        )
        credentials = grpc.ssl_channel_credentials(root_certificates=roots)
        async with grpc.aio.secure_channel(
            address, credentials, options=[("grpc.ssl_target_name_override", _TARGET_NAME)]
        ) as channel:
            response = await agent_pb2_grpc.AgentStub(channel).AttestAgent(
                request, timeout=self.config.rpc_timeout
            )
        svid = self._svid_from_response(response.svid, key)
        authorities = tuple(
            x509.load_der_x509_certificate(a.asn1) for a in response.bundle.x509_authorities
        )
        if not authorities:
            raise AttestationRejected(f"server {address} returned an empty trust bundle")
        await asyncio.to_thread(self.store.save_svid, svid)
        await asyncio.to_thread(self.store.save_bundle, authorities)
        self._install(svid, authorities)
        log.info(
            "node attested",
            extra={
                "spiffe_id": str(svid.spiffe_id),
                "server": address,
                "expires_at": svid.expires_at.isoformat(),
            },
        )

    def _svid_from_response(self, proto_svid: Any, key: PrivateKey) -> X509Svid:
        chain = b"".join(bytes(c) for c in proto_svid.cert_chain)
        key_der = key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        try:
            return X509Svid.parse(chain, key_der)
        except CredoError as exc:
            raise AttestationRejected(f"server returned an unusable agent SVID: {exc}") from None

    # --- channels ------------------------------------------------------------------------

    def _install(self, svid: X509Svid, authorities: tuple[x509.Certificate, ...]) -> None:
        """Use ``svid`` and ``authorities`` from now on; old channels retire after a grace."""
        if svid is not self._svid:
            self._svid_received_at = self._clock()
        self._svid = svid
        self._authorities = authorities
        for channel in self._channels.values():
            self._retire(channel)
        self._channels.clear()
        self._verified.clear()
        self._changed.set()
        self._changed = asyncio.Event()

    def _retire(self, channel: grpc.aio.Channel) -> None:
        task = asyncio.get_running_loop().create_task(channel.close(grace=_CHANNEL_RETIRE_GRACE))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def stub(self) -> Any:
        """An ``Agent`` stub on the mTLS channel to the current server address.

        Raises :class:`ServerUnreachable` when the server fails identity verification.
        """
        address = self.address
        channel = self._channels.get(address)
        if channel is None:
            if address not in self._verified:
                await asyncio.to_thread(
                    verify_server_identity, address, self._authorities, self.server_id
                )
                self._verified.add(address)
            svid = self.svid
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_pem(self._authorities),
                private_key=svid.marshal_key_pem(),
                certificate_chain=svid.marshal_chain_pem(),
            )
            channel = grpc.aio.secure_channel(
                address,
                credentials,
                options=[
                    ("grpc.ssl_target_name_override", _TARGET_NAME),
                    ("grpc.keepalive_time_ms", 30_000),
                    ("grpc.keepalive_timeout_ms", 10_000),
                    ("grpc.http2.max_pings_without_data", 0),
                    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
                    ("grpc.max_send_message_length", 64 * 1024 * 1024),
                ],
            )
            self._channels[address] = channel
        return agent_pb2_grpc.AgentStub(channel)

    def credentials_changed(self) -> asyncio.Event:
        """An event set the next time the SVID or trust bundle is replaced."""
        return self._changed

    def set_authorities(
        self,
        authorities: tuple[x509.Certificate, ...],
        tainted: frozenset[bytes] = frozenset(),
    ) -> None:
        """Trust ``authorities`` for the server from now on (the bundle changed).

        ``tainted`` holds the DER of authorities marked tainted: if the agent's own SVID was
        signed by one, it is renewed at once (as workload SVIDs are), so that revoking that
        authority later does not cut the agent off.
        """
        if tainted and self._svid is not None:
            anchor = find_anchor(self._svid.cert_chain, authorities or self._authorities)
            if anchor is not None and anchor in tainted and not self._renew_now.is_set():
                log.warning("agent SVID was signed by a tainted authority; renewing it now")
                self._renew_now.set()
        if not authorities or set(authorities) == set(self._authorities):
            return
        try:
            self.store.save_bundle(authorities)
        except OSError as exc:
            log.warning("cannot store trust bundle", extra={"error": exc.strerror})
        log.info(
            "trust bundle changed; rebuilding server channels",
            extra={"authorities": len(authorities)},
        )
        self._install(self.svid, authorities)

    def raise_if_banned(self, err: BaseException) -> None:
        """If ``err`` says the agent is banned: delete the stored SVID and raise AgentBanned."""
        action = ban_action(err)
        if action is not None:
            agent_id = str(self._svid.spiffe_id) if self._svid else "(unknown)"
            self.store.delete()
            log.error(
                f"agent was {action} by the server; stored SVID deleted",
                extra={"spiffe_id": agent_id, "server": self.address},
            )
            raise AgentBanned(agent_id, action) from None

    # --- renewal -------------------------------------------------------------------------

    def renew_at(self) -> float:
        """Unix time at which the agent SVID reaches half its lifetime."""
        leaf = self.svid.leaf
        start = leaf.not_valid_before_utc.timestamp()
        end = leaf.not_valid_after_utc.timestamp()
        if self._svid_received_at is not None:
            # The server backdates NotBefore; with a short TTL half of NotAfter-NotBefore can
            # fall before the SVID arrived (a renewal loop), so count from its arrival.
            start = max(start, min(self._svid_received_at, end))
        return start + (end - start) / 2

    async def renew(self) -> None:
        """Renew the agent SVID for a new key via RenewAgent; store it; rebuild channels."""
        key = generate_private_key()
        stub = await self.stub()
        try:
            response = await stub.RenewAgent(
                agent_pb2.RenewAgentRequest(csr=make_csr(key)), timeout=self.config.rpc_timeout
            )
        except grpc.aio.AioRpcError as exc:
            self.raise_if_banned(exc)
            raise
        svid = self._svid_from_response(response.svid, key)
        await asyncio.to_thread(self.store.save_svid, svid)
        self._install(svid, self._authorities)
        log.info(
            "agent SVID renewed",
            extra={"spiffe_id": str(svid.spiffe_id), "expires_at": svid.expires_at.isoformat()},
        )

    async def run_renewal(self) -> None:
        """Renew the agent SVID at half-life, forever; retries failures with backoff."""
        delay = 1.0
        while True:
            wait = self.renew_at() - self._clock()
            if wait > 0 and not self._renew_now.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._renew_now.wait()
            try:
                await self.renew()
                self._renew_now.clear()
                delay = 1.0
            except (grpc.aio.AioRpcError, ServerUnreachable, AttestationRejected) as exc:
                text = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
                log.warning(
                    "agent SVID renewal failed; retrying",
                    extra={"server": self.address, "error": text, "retry_in": round(delay, 1)},
                )
                self.failover()
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, 30.0)

    async def close(self) -> None:
        """Close every channel."""
        for channel in self._channels.values():
            with contextlib.suppress(Exception):
                await channel.close(grace=None)
        self._channels.clear()
        for task in list(self._retiring):
            task.cancel()
        for task in list(self._retiring):
            with contextlib.suppress(BaseException):
                await task
