"""Who the calling agent is, and whether it may call now: checked on every agent call.

Every agent call except ``AttestAgent`` presents the agent SVID as TLS client certificate
(the TLS front end verified it against the bundle of its time). :meth:`AgentAuthenticator.
authenticate` then checks, in this order, raising an :class:`~server.agents.errors.AgentRefused`:

1. there is a certificate and it is an SVID (``no_agent_svid``);
2. its SPIFFE ID is an agent ID of this trust domain (``not_an_agent``);
3. it has not expired (``svid_expired``);
4. the authority that signed it is still in the CA journal (``untrusted_authority``): a
   revoked authority ends service at once, even on a connection opened before;
5. the datastore has an attested node by that ID (``evicted``) that is not banned (``banned``);
6. its serial is the node's current one, or the one its last renewal issued
   (``svid_not_current``). Serial rotation, SPIRE's rule: a renewal (:meth:`renew`) records
   the new serial next to the current one; the first call made with the new SVID makes it
   the current one and retires the previous.

Step 4 is memoised per (authority, SVID signature), so a busy agent does not cost one
signature verification per call. :meth:`admit_signing_call` is the per-agent rate limit of
signing calls.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from credo._reserved import is_agent_id
from credo.errors import InvalidX509Svid
from credo.keys import PublicKey
from credo.spiffe_id import SpiffeId, TrustDomain
from credo.x509svid import leaf_spiffe_id
from server.agents.errors import (
    AgentBanned,
    AgentEvicted,
    AgentSvidExpired,
    AgentSvidNotCurrent,
    NoAgentSvid,
    NotAnAgent,
    RateLimited,
    UntrustedAuthority,
)
from server.ca.ca import CertificateAuthority
from server.datastore.models import AttestedNode, Authority
from server.datastore.protocol import DataStore
from server.ratelimit import KeyedRateLimiter
from server.revocation import issued_record

__all__ = ["AgentAuthenticator", "Caller", "cert_not_after", "cert_serial"]

log = logging.getLogger(__name__)

_MAX_MEMO: Final = 4096


@dataclass(frozen=True)
class Caller:
    """An authenticated agent: its ID, its attested node record, and the SVID it presented."""

    agent_id: str
    node: AttestedNode
    certificate: x509.Certificate


def cert_serial(cert: x509.Certificate) -> str:
    """The serial number as the datastore keeps it (lower-case hex)."""
    return format(cert.serial_number, "x")


def cert_not_after(cert: x509.Certificate) -> int:
    """NotAfter as Unix seconds."""
    return int(cert.not_valid_after_utc.timestamp())


class AgentAuthenticator:
    """Authenticates agent calls by their SVID, and renews agent SVIDs."""

    def __init__(
        self,
        trust_domain: TrustDomain,
        datastore: DataStore,
        ca: CertificateAuthority,
        *,
        agent_svid_ttl: int = 3600,
        signing_rate_limit: float = 500.0,
    ) -> None:
        self._td = trust_domain
        self._ds = datastore
        self._ca = ca
        self._agent_svid_ttl = agent_svid_ttl
        self._signing_rate_limit = signing_rate_limit
        self._sign_limiter = KeyedRateLimiter(signing_rate_limit)
        # Authority certificates by DER, and (authority DER, SVID signature) pairs verified.
        self._ca_certs: dict[bytes, x509.Certificate] = {}
        self._issuer_memo: OrderedDict[tuple[bytes, bytes], None] = OrderedDict()

    async def authenticate(self, cert: x509.Certificate | None) -> Caller:
        """The calling agent, checked against its datastore record (every call)."""
        if cert is None:
            raise NoAgentSvid(
                "this call needs the agent's SVID as the TLS client certificate; attest first"
            )
        try:
            spiffe_id = leaf_spiffe_id(cert)
        except InvalidX509Svid as err:
            raise NoAgentSvid(f"client certificate: {err}") from None
        if not is_agent_id(spiffe_id, self._td):
            raise NotAnAgent(f"caller {spiffe_id} is not an agent of trust domain {self._td}")
        if cert.not_valid_after_utc <= datetime.now(UTC):
            raise AgentSvidExpired("agent SVID expired; attest again")
        if not await asyncio.to_thread(self.issued_by_live_authority, cert):
            # The TLS handshake verified it against the bundle of its time; the
            # authority has since been revoked (or pruned): no longer trusted.
            raise UntrustedAuthority(
                "agent SVID was signed by an authority that is no longer trusted; attest again"
            )
        agent_id = str(spiffe_id)
        node = await asyncio.to_thread(self._ds.fetch_attested_node, agent_id)
        if node is None:
            raise AgentEvicted(
                f"agent {agent_id} is not attested (it may have been evicted); attest again"
            )
        if node.banned:
            raise AgentBanned()
        serial = cert_serial(cert)
        if serial == node.cert_serial:
            return Caller(agent_id, node, cert)
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
            return Caller(agent_id, node, cert)
        raise AgentSvidNotCurrent()

    def issued_by_live_authority(self, cert: x509.Certificate) -> bool:
        """True if ``cert`` was signed by an X.509 authority still in the CA journal."""
        return self.issued_by_one_of(cert, self._ds.list_authorities("x509"))

    def issued_by_one_of(self, cert: x509.Certificate, journal: Iterable[Authority]) -> bool:
        """True if ``cert`` was signed by one of the X.509 authorities of ``journal``."""
        for row in journal:
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
            while len(self._issuer_memo) > _MAX_MEMO:
                self._issuer_memo.popitem(last=False)
            return True
        return False

    def admit_signing_call(self, caller: Caller) -> None:
        """Raise :class:`RateLimited` when ``caller`` is over its signing-call rate."""
        if not self._sign_limiter.allow(caller.agent_id):
            raise RateLimited(
                f"too many signing calls from {caller.agent_id}; at most "
                f"{self._signing_rate_limit:g} per second"
            )

    async def renew(self, caller: Caller, public_key: PublicKey) -> list[x509.Certificate]:
        """A new agent SVID for ``public_key``; its serial becomes the node's next one."""
        chain = await asyncio.to_thread(
            self._ca.sign_agent_svid,
            SpiffeId.parse(caller.agent_id),
            public_key,
            self._agent_svid_ttl,
        )
        await asyncio.to_thread(
            self._ds.update_attested_node,
            replace(
                caller.node,
                new_cert_serial=cert_serial(chain[0]),
                new_cert_not_after=cert_not_after(chain[0]),
            ),
        )
        await asyncio.to_thread(
            self._ds.create_issued_x509_svids,
            [issued_record(chain[0], caller.agent_id, agent_id=caller.agent_id)],
        )
        log.info("renewed agent SVID", extra={"agent_id": caller.agent_id})
        return chain
