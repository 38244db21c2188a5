"""Revocation: withdrawing X.509-SVIDs before they expire, and the kill switch for entries.

The server records every X.509-SVID it signs (:func:`issued_record`; serial, issuing
authority, entry, SPIFFE ID, agent, expiry) so that any of them can be revoked:

* one SVID by serial (``credo-server x509 revoke --serial S``);
* an entry (``credo-server entry revoke --id ID``): the entry is never authorized again
  (it leaves every agent's sync stream, so agents drop its SVID) and every unexpired
  SVID issued for it is revoked;
* a banned agent (``credo-server agent ban``): every unexpired SVID the agent obtained,
  its own agent SVIDs included;
* delegated access tokens (token exchange, recorded in ``delegated_tokens``): an entry's
  revocation revokes those issued to its SPIFFE ID (``cascade``: and every token whose
  actor chain contains it); RFC 7009 ``POST /oauth2/revoke`` revokes one. Revoked ones
  are in the JWT revocation list with the revoked JWT-SVIDs;
* one JWT by ``jti`` (``credo-server jwt revoke --jti J``): a JWT-SVID, a WIT-SVID or a
  delegated token (``jti``s are random, one namespace); entry revocation and bans revoke
  the entry's / agent's unexpired JWT-SVIDs and WIT-SVIDs too (every one is recorded,
  :func:`jwt_record`, WIT-SVIDs with the JWT-SVIDs), and a ban the delegated tokens issued to
  the identities the agent held SVIDs for. Agents receive the revoked ``jti``s on their
  sync stream: their ``ValidateJWTSVID`` refuses them and a revoked WIT-SVID is replaced on
  the workload's stream; the signed list at ``/jwt-revocations`` carries them for verifiers
  (:meth:`credo.WitSvid.parse_and_validate` takes it as ``revoked``).

:class:`Revoker` is what the admin API calls; every call is idempotent (revoking again
revokes nothing more and still succeeds). Revoked serials reach verifiers through each
X.509 authority's CRL (:mod:`server.ca.crl`), which the owning server re-signs on the
``x509_svids_revoked`` event the datastore writes in the same transaction.

:meth:`Revoker._record` is the one place every revocation passes through once it is
committed: it logs the decision. The audit records (``x509_svid.revoke``,
``jwt_svid.revoke``, ``entry.revoke``, ``agent.ban``, docs/audit.md) are written by the
datastore in the revocation's own transaction, so none is lost and none is invented.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from aiohttp import web
from cryptography import x509

from credo.revocation import REVOCATION_LIST_PATH
from server.datastore.errors import NotFound
from server.datastore.models import (
    AttestedNode,
    DelegatedToken,
    IssuedJwtSvid,
    IssuedX509Svid,
    Revocation,
)
from server.datastore.protocol import DataStore

if TYPE_CHECKING:
    from server.ca.ca import CertificateAuthority

__all__ = [
    "MAX_REASON",
    "RevocationResult",
    "Revoker",
    "authority_id_of",
    "issued_record",
    "jwt_record",
    "jwt_revocation_routes",
]

log = logging.getLogger(__name__)

MAX_REASON: Final = 512
"""Longest ``--reason`` accepted (characters)."""


def authority_id_of(leaf: x509.Certificate) -> str:
    """The issuing authority's id: the leaf's AuthorityKeyIdentifier in lowercase hex."""
    try:
        aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound:
        return ""
    return aki.key_identifier.hex() if aki.key_identifier is not None else ""


def issued_record(
    leaf: x509.Certificate | bytes, spiffe_id: str, *, entry_id: str = "", agent_id: str = ""
) -> IssuedX509Svid:
    """What the datastore keeps of a signed leaf (certificate or DER)."""
    cert = x509.load_der_x509_certificate(leaf) if isinstance(leaf, bytes) else leaf
    return IssuedX509Svid(
        serial=format(cert.serial_number, "x"),
        authority_id=authority_id_of(cert),
        spiffe_id=spiffe_id,
        expires_at=int(cert.not_valid_after_utc.timestamp()),
        entry_id=entry_id,
        agent_id=agent_id,
    )


def jwt_record(
    token: str, spiffe_id: str, *, entry_id: str = "", agent_id: str = ""
) -> IssuedJwtSvid:
    """What the datastore keeps of a JWT-SVID the server just signed (its ``jti``, ``exp``).

    Raises ValueError when the token has no ``jti`` (Credo always sets one).
    """
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, binascii.Error, ValueError) as err:
        raise ValueError(f"not a JWT: {err}") from None
    jti, exp = claims.get("jti"), claims.get("exp")
    if not isinstance(jti, str) or not jti or not isinstance(exp, int | float):
        raise ValueError("JWT-SVID without jti or exp")
    return IssuedJwtSvid(
        jti=jti, spiffe_id=spiffe_id, expires_at=int(exp), entry_id=entry_id, agent_id=agent_id
    )


@dataclass(frozen=True)
class RevocationResult:
    """What a revocation call did: the SVIDs revoked by it (none when repeated)."""

    target: str
    revoked: tuple[IssuedX509Svid, ...]
    entry_newly_revoked: bool = False
    revoked_jwts: tuple[IssuedJwtSvid, ...] = ()
    revoked_tokens: tuple[DelegatedToken, ...] = ()


class Revoker:
    """Revokes SVIDs by serial, entry and agent; every call is one datastore transaction."""

    def __init__(self, datastore: DataStore) -> None:
        self._ds = datastore

    async def revoke_serial(self, serial: str, reason: str) -> RevocationResult:
        """Revoke one X.509-SVID (``NotFound`` if the server never issued that serial)."""
        done = await asyncio.to_thread(self._ds.revoke_x509_svid, serial, reason)
        return self._record("x509_svid", serial, reason, done)

    async def revoke_entry(
        self, entry_id: str, reason: str, *, cascade: bool = False
    ) -> RevocationResult:
        """The kill switch for an entry (``NotFound`` if there is no such entry); with
        ``cascade`` also every delegated token whose actor chain contains its identity."""
        done = await asyncio.to_thread(
            self._ds.revoke_registration_entry, entry_id, reason, cascade=cascade
        )
        return self._record("entry", entry_id, reason, done)

    async def revoke_jti(self, jti: str, reason: str) -> RevocationResult:
        """Revoke the JWT the server issued with this ``jti``: a JWT-SVID or WIT-SVID
        (recorded together), else a delegated access token. ``NotFound`` if it issued none."""
        try:
            done = await asyncio.to_thread(self._ds.revoke_jwt_svid, jti, reason)
        except NotFound:
            done = await asyncio.to_thread(self._ds.revoke_delegated_token, jti, reason)
            return self._record("delegated_token", jti, reason, done)
        return self._record("jwt_svid", jti, reason, done)

    async def ban_agent(self, agent_id: str, reason: str) -> tuple[AttestedNode, RevocationResult]:
        """Ban the agent and revoke what it obtained (``NotFound`` if it is not attested)."""
        node, done = await asyncio.to_thread(self._ds.ban_attested_node, agent_id, reason)
        return node, self._record("agent", agent_id, reason, done)

    def _record(self, kind: str, target: str, reason: str, done: Revocation) -> RevocationResult:
        """Every committed revocation passes here once: log it (audited in its transaction)."""
        serials: Sequence[str] = [s.serial for s in done.revoked]
        log.warning(
            "revoked",
            extra={
                "target_kind": kind,
                "target": target,
                "reason": reason,
                "revoked_serials": list(serials),
                "revoked_jtis": [j.jti for j in done.revoked_jwts],
                "revoked_token_jtis": [t.jti for t in done.revoked_tokens],
                "entry_newly_revoked": done.entry_newly_revoked,
            },
        )
        return RevocationResult(
            target, done.revoked, done.entry_newly_revoked, done.revoked_jwts, done.revoked_tokens
        )


LIST_TTL: Final = 60
"""Seconds a signed JWT revocation list is valid for (verifiers poll well within it)."""


def jwt_revocation_routes(
    datastore: DataStore, ca: CertificateAuthority, clock: Callable[[], float] = time.time
) -> list[web.RouteDef]:
    """``GET /jwt-revocations``: every revoked, unexpired ``jti``, signed (``application/jwt``)."""

    async def serve(request: web.Request) -> web.StreamResponse:
        def sign() -> str:
            revoked = datastore.list_revoked_jwt_svids(int(clock()))
            return ca.sign_jwt_revocation_list([(j.jti, j.expires_at) for j in revoked], LIST_TTL)

        token = await asyncio.to_thread(sign)
        return web.Response(
            text=token, content_type="application/jwt", headers={"Cache-Control": "no-store"}
        )

    return [web.get(REVOCATION_LIST_PATH, serve, allow_head=True)]
