"""The server's own identity: its TLS X509-SVID ``spiffe://<td>/credo/server``.

The agent endpoint presents this SVID (with DNS SANs ``server.credo.invalid``, which agents
verify, ``localhost``, and the bind host when it is a name). :class:`ServerIdentity` signs
it with the active CA and re-signs it at about half its life (with jitter, through
:func:`credo._renewal.renew_at`, the one renewal-time function), when the CA changes, and
when the bundle changes; each new TLS connection gets the current one.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import ssl
import time
from collections.abc import Callable

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from credo._renewal import renew_at
from credo.errors import CredoError
from credo.keys import generate_private_key, private_key_to_pkcs8_pem
from server.api.common import BundleSource
from server.api.tls import build_server_context
from server.audit.checkpoint import sign_message
from server.ca.manager import AuthorityManager
from server.ca.templates import DEFAULT_SERVER_DNS_NAMES

__all__ = ["ServerIdentity", "server_dns_names"]

log = logging.getLogger(__name__)


def server_dns_names(bind_host: str) -> tuple[str, ...]:
    """The server SVID's DNS names: the reserved TLS name, localhost, and the bind host
    when it is a name (not an IP address)."""
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
        rng: Callable[[], float] = random.random,
        context_factory: Callable[[bytes, bytes, bytes], ssl.SSLContext] = build_server_context,
        name: str = "server SVID",
    ) -> None:
        self._manager = manager
        self._bundles = bundles
        self._key = generate_private_key(key_type)
        self._dns_names = dns_names
        self._context: ssl.SSLContext | None = None
        self._renew_at = 0.0
        self._signed_by: object = None
        self._roots_pem = b""
        self._rng = rng
        self._leaf: x509.Certificate | None = None
        self._chain_der: list[bytes] = []
        self._context_factory = context_factory
        self._name = name

    @property
    def certificate(self) -> x509.Certificate | None:
        """The current SVID's leaf certificate; None before the first one."""
        return self._leaf

    @property
    def renew_at(self) -> float:
        """When the current SVID is re-signed (Unix time); 0 before the first one."""
        return self._renew_at

    def context(self) -> ssl.SSLContext:
        if self._context is None:
            self.refresh()
        assert self._context is not None
        return self._context

    def refresh(self, *, force: bool = False) -> bool:
        """Re-sign the SVID at about half-life (:func:`credo._renewal.renew_at`), on CA change
        or on bundle change; True if rebuilt."""
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
        self._renew_at = renew_at(
            leaf.not_valid_before_utc.timestamp(),
            leaf.not_valid_after_utc.timestamp(),
            received_at=time.time(),
            rng=self._rng,
        )
        self._leaf = leaf
        self._chain_der = [c.public_bytes(serialization.Encoding.DER) for c in chain]
        chain_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
        self._context = self._context_factory(chain_pem, private_key_to_pkcs8_pem(self._key), roots)
        self._signed_by = ca
        self._roots_pem = roots
        log.info(
            f"{self._name} ready",
            extra={
                "serial": format(leaf.serial_number, "x"),
                "expires_at": leaf.not_valid_after_utc.isoformat(),
            },
        )
        return True

    def sign_checkpoint(self, message: bytes) -> tuple[bytes, list[bytes]]:
        """Sign an audit checkpoint with the SVID's key; the signature and the chain (DER)."""
        if not self._chain_der:
            self.refresh()
        return sign_message(self._key, message), list(self._chain_der)

    async def run(
        self,
        stop: asyncio.Event,
        interval: float = 1.0,
        bundle_generation: Callable[[], int] | None = None,
    ) -> None:
        """Check every ``interval`` seconds whether the SVID needs re-signing, until ``stop``.

        With ``bundle_generation`` (a count that moves whenever the stored bundle may have
        changed: the entry cache's count of bundle events) a check whose count, CA and
        renewal time are unchanged reads nothing from the datastore.
        """
        seen = -1
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
            if stop.is_set():
                return
            if bundle_generation is not None:
                generation = bundle_generation()
                if (
                    generation == seen
                    and self._context is not None
                    and time.time() < self._renew_at
                    and self._manager.ca.x509_ca is self._signed_by
                ):
                    continue
                seen = generation
            try:
                await asyncio.to_thread(self.refresh)
            except (CredoError, OSError, ssl.SSLError) as err:
                log.error(f"refreshing the {self._name} failed", extra={"error": str(err)})
