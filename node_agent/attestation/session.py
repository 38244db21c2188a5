"""The agent's standing with the signing servers: its SVID, attested, stored and renewed.

:class:`AgentSession` owns the agent SVID. :meth:`AgentSession.start` resumes with the SVID
stored in the data dir when that is still valid, else attests with the configured node
attestor (:mod:`node_agent.attestation.catalog`). Every SVID it gets, and every trust
bundle the server later sends (:meth:`AgentSession.set_authorities`), is stored and handed
to the :class:`~node_agent.server_client.ServerClient`, which rebuilds its mTLS channels.
:meth:`AgentSession.run_renewal` renews the SVID with a new key at about half its lifetime
(:func:`credo._renewal.renew_at`: +-10% jitter, counted from when it arrived), or at once
when the authority that signed it is tainted. A node attestor that may attest again does so
instead of calling ``RenewAgent`` (SPIRE's re-attestation).

The first attestation trusts the bootstrap bundle (``trust_bundle``, or fetched from
``trust_bundle_url``: :mod:`node_agent.attestation.bundle_url`), or with
``insecure_bootstrap`` whatever certificate the server presents, and says so loudly;
afterwards the bundle returned by the server is used. A ban is the server client's
business: it deletes the stored SVID (``forget_agent_svid``) and raises AgentBanned.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509

from credo._renewal import renew_at
from credo.bundle import load_certificates
from credo.keys import generate_private_key
from credo.spiffe_id import SpiffeId, TrustDomain
from credo.x509svid import X509Svid
from node_agent.attestation.anchor import find_anchor
from node_agent.attestation.attestor import NodeAttestor
from node_agent.attestation.bundle_url import fetch_bootstrap_bundle
from node_agent.attestation.errors import (
    AttestationRejected,
    NoAgentCredentials,
    NoAttestationData,
)
from node_agent.attestation.store import SvidStore
from node_agent.errors import (
    BadServerResponse,
    ServerClientError,
    ServerNotTrusted,
    ServerRefused,
    ServerUnreachable,
)
from node_agent.server_client import ServerClient

__all__ = ["AgentSession", "SessionConfig"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SessionConfig:
    """What the session needs from the agent's configuration."""

    trust_domain: TrustDomain
    trust_bundle: Path | None = None
    # Fetch the bootstrap bundle from this https URL instead (format "pem" or "spiffe").
    trust_bundle_url: str = ""
    trust_bundle_format: str = "pem"
    insecure_bootstrap: bool = False
    # How long attestation keeps retrying servers that do not answer.
    attest_retry_timeout: float = 30.0


class AgentSession:
    """The agent SVID and trust bundle: attested or resumed, stored, renewed."""

    def __init__(
        self,
        config: SessionConfig,
        client: ServerClient,
        attestor: NodeAttestor,
        store: SvidStore,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.client = client
        self.attestor = attestor
        self.store = store
        self._clock = clock
        self._svid: X509Svid | None = None
        self._renew_at = 0.0
        self._authorities: tuple[x509.Certificate, ...] = ()
        self._renew_now = asyncio.Event()

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
    def authorities(self) -> tuple[x509.Certificate, ...]:
        """The X.509 authorities the agent trusts for the server's certificate."""
        return self._authorities

    def renew_at(self) -> float:
        """Unix time at which the agent SVID is renewed (half-life, jittered, once per SVID)."""
        return self._renew_at

    def _install(
        self,
        svid: X509Svid,
        authorities: tuple[x509.Certificate, ...],
        *,
        received_at: float | None,
    ) -> None:
        """Use ``svid`` and ``authorities`` from now on (the client rebuilds its channels).

        ``received_at``: when a server handed over ``svid`` (None: resumed from disk).
        """
        if svid is not self._svid:
            leaf = svid.leaf
            self._renew_at = renew_at(
                leaf.not_valid_before_utc.timestamp(),
                leaf.not_valid_after_utc.timestamp(),
                received_at=received_at,
            )
        self._svid = svid
        self._authorities = authorities
        self.client.set_credentials(svid, authorities)

    # --- start: resume or attest --------------------------------------------------------

    async def start(self) -> None:
        """Resume with the stored agent SVID if still valid, else attest."""
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
                self._install(svid, stored.authorities, received_at=None)
                log.info(
                    "resuming with stored agent SVID",
                    extra={
                        "spiffe_id": str(svid.spiffe_id),
                        "expires_at": svid.expires_at.isoformat(),
                    },
                )
                return
        try:
            await self.attest()
        except NoAttestationData as exc:
            reason = (
                "the stored agent SVID has expired"
                if stored is not None
                else f"no stored agent SVID in {self.store.data_dir}"
            )
            raise NoAgentCredentials(
                f"no stored agent SVID and {exc.missing}: {reason}; {exc.hint}"
            ) from None

    async def _bootstrap_roots(self) -> tuple[x509.Certificate, ...] | None:
        """The certificates to trust for the first attestation (None: insecure bootstrap)."""
        if self.config.trust_bundle_url:
            fetched = await asyncio.to_thread(
                fetch_bootstrap_bundle,
                self.config.trust_bundle_url,
                self.config.trust_bundle_format,
                self.config.trust_domain,
            )
            log.info(
                "fetched the bootstrap trust bundle",
                extra={"url": self.config.trust_bundle_url, "authorities": len(fetched)},
            )
            return fetched
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
            return tuple(certs)
        if self.config.insecure_bootstrap:
            log.warning(
                "INSECURE BOOTSTRAP: trusting the server's certificate WITHOUT verification "
                "for this first attestation; use --trust-bundle in production",
                extra={"server": self.client.address},
            )
            return None
        raise NoAgentCredentials(
            "no trust bundle to verify the server: pass --trust-bundle FILE "
            "(from 'credo-server bundle show --format pem'), --trust-bundle-url URL "
            "or --insecure-bootstrap"
        )

    async def attest(self, roots: tuple[x509.Certificate, ...] | None = None) -> None:
        """Attest with the node attestor, retrying unreachable servers; store the SVID.

        ``roots`` (the current bundle when attesting again) default to the bootstrap trust.
        """
        payload = await self.attestor.payload()
        bootstrap = roots is None
        if roots is None:
            roots = await self._bootstrap_roots()
        deadline = time.monotonic() + self.config.attest_retry_timeout
        backoff = self.client.backoff()
        failures = 0
        while True:
            key = generate_private_key()
            try:
                result = await self.client.attest(self.attestor.type, payload, key, roots)
                break
            except ServerNotTrusted as exc:
                if bootstrap and self.config.trust_bundle_url:
                    raise NoAgentCredentials(
                        f"the bundle from trust_bundle_url {self.config.trust_bundle_url} does "
                        f"not contain the server's current CA ({exc})"
                    ) from None
                if bootstrap and self.config.trust_bundle is not None:
                    bundle = self.config.trust_bundle
                    raise NoAgentCredentials(
                        f"the bootstrap trust bundle {bundle} does not contain the server's "
                        f"current CA ({exc}); the server's CA may have rotated since it was "
                        f"copied: refresh it with 'credo-server bundle show --format pem > "
                        f"{bundle}'"
                    ) from None
                last_error = str(exc)
            except ServerUnreachable as exc:
                last_error = str(exc)
            except ServerRefused as exc:
                if not exc.retryable:
                    raise AttestationRejected(
                        f"server {exc.server} refused the node attestation: {exc.message}"
                    ) from None
                last_error = f"server {exc.server}: {exc.message}"
            except BadServerResponse as exc:
                raise AttestationRejected(str(exc)) from None
            delay = backoff.next()
            failures += 1
            if time.monotonic() + delay > deadline:
                raise ServerUnreachable(
                    f"node attestation failed: no server answered for "
                    f"{self.config.attest_retry_timeout:g}s ({last_error})"
                )
            # One clear line saying what is tried and for how long; the rest at debug.
            log.log(
                logging.WARNING if failures == 1 else logging.DEBUG,
                "cannot attest to the server yet; retrying",
                extra={
                    "servers": ",".join(self.client.config.server_addresses),
                    "error": last_error,
                    "retrying_for_s": round(max(0.0, deadline - time.monotonic())),
                },
            )
            await asyncio.sleep(delay)
        svid = result.svid
        await asyncio.to_thread(self.store.save_svid, svid)
        await asyncio.to_thread(self.store.save_bundle, result.authorities)
        self._install(svid, result.authorities, received_at=self._clock())
        log.info(
            "node attested",
            extra={
                "spiffe_id": str(svid.spiffe_id),
                "server": self.client.address,
                "node_attestor": self.attestor.type,
                "expires_at": svid.expires_at.isoformat(),
            },
        )

    # --- the trust bundle ----------------------------------------------------------------

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
        self._install(self.svid, authorities, received_at=None)

    # --- renewal -------------------------------------------------------------------------

    async def renew(self) -> None:
        """A new agent SVID for a new key (re-attesting when the attestor may); store it."""
        if self.attestor.can_reattest:
            await self.attest(self._authorities)
            return
        key = generate_private_key()
        svid = await self.client.renew(key)
        await asyncio.to_thread(self.store.save_svid, svid)
        self._install(svid, self._authorities, received_at=self._clock())
        log.info(
            "agent SVID renewed",
            extra={"spiffe_id": str(svid.spiffe_id), "expires_at": svid.expires_at.isoformat()},
        )

    async def run_renewal(self) -> None:
        """Renew the agent SVID when due, forever; retry failures with the client's backoff.

        Only :class:`~node_agent.errors.AgentRemoved` (a ban) escapes.
        """
        backoff = self.client.backoff()
        while True:
            wait = self._renew_at - self._clock()
            if wait > 0 and not self._renew_now.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._renew_now.wait()
            try:
                await self.renew()
                self._renew_now.clear()
                backoff.reset()
            except (ServerClientError, AttestationRejected) as exc:
                delay = backoff.next()
                log.warning(
                    "agent SVID renewal failed; retrying",
                    extra={
                        "server": self.client.address,
                        "error": str(exc),
                        "retry_in": round(delay, 1),
                    },
                )
                await asyncio.sleep(delay)
