"""Certificate revocation lists: one per X.509 authority this server holds the key of.

Each CRL (RFC 5280, v2) is signed by its authority's own key and names that authority as
issuer; it carries a CRL number (one more than the stored one) and the authority key
identifier, ``thisUpdate`` a few seconds in the past and ``nextUpdate``
``crl_next_update`` seconds ahead. It lists every revoked X.509-SVID the authority issued
that has not expired yet: once an SVID has expired it is dropped, since nothing accepts it
anyway.

:class:`CrlSigner` (one of the server's loops) signs a CRL for each of its authorities at
start, again whenever SVIDs of one of them are revoked (the datastore's
``x509_svids_revoked`` event, from this server or another one sharing the database), when
the set of authorities changes, and when a CRL has used up half of its ``nextUpdate``.
Each new CRL is stored (``set_crl``); its ``crl_updated`` event makes every server push
the CRLs on its agents' sync streams. The HTTP front end serves each stored CRL (any
server's) as ``GET /crl/<authority-id>.crl`` (DER, ``application/pkix-crl``;
:func:`crl_routes`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Final, Protocol

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from credo.errors import CredoError
from credo.keys import PrivateKey
from credo.x509svid import signature_hash_for
from server.ca.pool import x509_ca_key_id
from server.datastore.models import Authority, Crl, Event, EventKind
from server.datastore.protocol import DataStore
from server.http.errors import HttpError

__all__ = ["BACKDATE", "CRL_PATH", "CrlSigner", "KeySource", "build_crl", "crl_routes"]

log = logging.getLogger(__name__)

BACKDATE: Final = 10
"""Seconds ``thisUpdate`` is set in the past (as SVIDs' NotBefore), for clock skew."""

_DER = serialization.Encoding.DER
CRL_PATH: Final = "/crl/{authority_id}.crl"
"""Where the HTTP front end serves each authority's CRL."""
_AUTHORITY_ID = re.compile(r"^[0-9a-f]{1,128}$")
_REFRESH_EVENTS = frozenset({EventKind.BUNDLE_UPDATED, EventKind.BUNDLE_DELETED})


class KeySource(Protocol):
    """Where the authorities' private keys are (the key manager)."""

    def get_key(self, key_id: str) -> PrivateKey | None: ...


def build_crl(
    ca_cert: x509.Certificate,
    key: PrivateKey,
    revoked: Iterable[tuple[int, int]],
    *,
    number: int,
    now: float,
    next_update: int,
) -> bytes:
    """The DER CRL of ``ca_cert`` listing ``revoked`` (serial, revoked at unix seconds)."""
    this_update = datetime.fromtimestamp(int(now) - BACKDATE, UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(this_update)
        .next_update(datetime.fromtimestamp(int(now), UTC) + timedelta(seconds=next_update))
        .add_extension(x509.CRLNumber(number), critical=False)
    )
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
    except x509.ExtensionNotFound:
        pass
    for serial, revoked_at in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(datetime.fromtimestamp(revoked_at, UTC))
            .build()
        )
    return builder.sign(key, signature_hash_for(key)).public_bytes(_DER)


class CrlSigner:
    """Keeps the CRL of each of this server's X.509 authorities signed and stored."""

    def __init__(
        self,
        datastore: DataStore,
        keys: KeySource,
        owner: str,
        *,
        next_update: int = 600,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._ds = datastore
        self._keys = keys
        self._owner = owner
        self._next_update = next_update
        self._clock = clock

    def _authorities(self) -> list[Authority]:
        now = self._clock()
        return [
            a for a in self._ds.list_authorities("x509", owner=self._owner) if a.not_after > now
        ]

    def sign(self, authority: Authority) -> Crl | None:
        """Sign and store the CRL of ``authority``; None when its key is not here."""
        key = self._keys.get_key(x509_ca_key_id(authority.authority_id))
        if key is None:
            return None
        now = self._clock()
        cert = x509.load_der_x509_certificate(authority.public_data)
        revoked = [
            (int(s.serial, 16), s.revoked_at)
            for s in self._ds.list_issued_x509_svids(
                authority_id=authority.authority_id, revoked=True, expires_after=int(now)
            )
        ]
        previous = self._ds.fetch_crl(authority.authority_id)
        number = previous.number + 1 if previous is not None else 1
        der = build_crl(cert, key, revoked, number=number, now=now, next_update=self._next_update)
        crl = self._ds.set_crl(
            Crl(authority.authority_id, number, der, int(now) + self._next_update)
        )
        log.info(
            "signed CRL",
            extra={
                "authority_id": authority.authority_id,
                "crl_number": number,
                "revoked": len(revoked),
            },
        )
        return crl

    def sign_due(self, revoked_authorities: Iterable[str] = ()) -> list[Crl]:
        """Sign the CRLs that are missing, at half their life, or of ``revoked_authorities``."""
        wanted = set(revoked_authorities)
        now = self._clock()
        stored = {c.authority_id: c for c in self._ds.list_crls()}
        signed = []
        for authority in self._authorities():
            crl = stored.get(authority.authority_id)
            if (
                crl is None
                or authority.authority_id in wanted
                or crl.next_update - now <= self._next_update / 2
            ):
                new = self.sign(authority)
                if new is not None:
                    signed.append(new)
        return signed

    async def run(self, stop: asyncio.Event, events: Callable[[], Awaitable[list[Event]]]) -> None:
        """Sign at start, then on each revocation event, authority change and half-life.

        ``events`` waits for the next events of the change feed (the entry cache's).
        """
        await self._sign_logged(())
        while not stop.is_set():
            waiter = asyncio.ensure_future(events())
            stopper = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait(
                {waiter, stopper},
                timeout=max(1.0, self._next_update / 4),
                return_when=asyncio.FIRST_COMPLETED,
            )
            stopper.cancel()
            if stop.is_set():
                waiter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await waiter
                return
            if waiter not in done:
                waiter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await waiter
                await self._sign_logged(())
                continue
            batch = waiter.result()
            revoked = {e.subject for e in batch if e.kind is EventKind.X509_SVIDS_REVOKED}
            if revoked or any(e.kind in _REFRESH_EVENTS for e in batch):
                await self._sign_logged(revoked)

    async def _sign_logged(self, revoked: Iterable[str]) -> None:
        try:
            await asyncio.to_thread(self.sign_due, revoked)
        except CredoError as err:
            log.error("signing CRLs failed", extra={"error": str(err)})


def crl_routes(datastore: DataStore, clock: Callable[[], float] = time.time) -> list[web.RouteDef]:
    """``GET /crl/<authority-id>.crl``: the authority's current CRL, DER (404 if none).

    Cached by clients at most until the CRL's nextUpdate, and never more than a minute, so
    that a revocation is seen soon by verifiers that poll.
    """

    async def serve(request: web.Request) -> web.StreamResponse:
        authority_id = request.match_info["authority_id"]
        if not _AUTHORITY_ID.match(authority_id):
            raise HttpError(404, f"no CRL for authority {authority_id!r}")
        crl = await asyncio.to_thread(datastore.fetch_crl, authority_id)
        if crl is None:
            raise HttpError(404, f"no CRL for authority {authority_id!r}")
        max_age = int(max(0, min(60, crl.next_update - clock())))
        return web.Response(
            body=crl.data,
            content_type="application/pkix-crl",
            headers={"Cache-Control": f"max-age={max_age}"},
        )

    return [web.get(CRL_PATH, serve, allow_head=True)]
