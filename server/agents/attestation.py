"""Node attestation rules: what the server does with attestation data an agent sends.

``AttestAgent`` in two steps, so that the request's CSR is checked between them:

1. :meth:`NodeAttestation.admit`: the per-source-address rate (bursts of a few, then the
   configured rate; ``rate_limited``) and the attestor for the data's ``type``
   (:class:`~server.attestation.errors.UnknownNodeAttestor` when none is configured);
2. :meth:`NodeAttestation.attest`: the plugin verifies the payload (an
   :class:`~server.attestation.errors.AttestationError` refuses the agent), then:

   * an agent an operator banned stays banned (``banned``), whatever it presents;
   * an agent the server knows already may attest again only if the plugin's result says
     so (``AttestationResult.can_reattest``; ``attestation_refused`` otherwise): it then
     gets a new SVID for the same agent ID, and the node record its new serial and
     selectors. A join token is consumed by its first use, so it never works twice;
   * the agent SVID is signed, the attested node recorded (created, or updated on
     re-attestation), and a node-alias entry created when the result names one
     (``alias_id``: an entry ``spiffe_id=<alias>, parent_id=<agent>,
     selectors=[spiffe_id:<agent>]``, so entries under the alias are authorized for the
     agent through the parent rule).

Each outcome is counted in ``credo_node_attestations_total`` and logged.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from cryptography import x509

from credo.keys import PublicKey
from credo.selector import Selector
from server import audit
from server.agents.authn import cert_not_after, cert_serial
from server.agents.errors import AgentBanned, RateLimited, ReattestationRefused
from server.attestation.errors import AttestationError, UnknownNodeAttestor
from server.attestation.protocol import NodeAttestor
from server.ca.ca import CertificateAuthority
from server.datastore.errors import AlreadyExists
from server.datastore.models import AttestedNode, RegistrationEntry
from server.datastore.protocol import DataStore
from server.ratelimit import KeyedRateLimiter
from server.revocation import issued_record
from server.telemetry import RESULT_FAILURE, RESULT_SUCCESS, Metrics

__all__ = ["NodeAttestation"]

log = logging.getLogger(__name__)


class NodeAttestation:
    """Attests agents with the configured node attestors and issues their first SVID."""

    def __init__(
        self,
        datastore: DataStore,
        ca: CertificateAuthority,
        attestors: Mapping[str, NodeAttestor],
        *,
        agent_svid_ttl: int = 3600,
        rate_limit: float = 1.0,
        metrics: Metrics | None = None,
    ) -> None:
        self._ds = datastore
        self._ca = ca
        self._attestors = dict(attestors)
        self._agent_svid_ttl = agent_svid_ttl
        self._rate_limit = rate_limit
        self._metrics = metrics
        # Bursts of a few attestations (an agent fleet restarting behind one NAT) are
        # allowed; the sustained rate is the configured one.
        self._limiter = KeyedRateLimiter(rate_limit, burst=max(5.0, rate_limit))

    @property
    def types(self) -> frozenset[str]:
        """The attestation data types this server accepts."""
        return frozenset(self._attestors)

    def admit(self, source: str, kind: str) -> NodeAttestor:
        """The attestor for ``kind``, if ``source`` is within its attestation rate."""
        if not self._limiter.allow(source):
            raise RateLimited(
                f"too many node attestations from {source}; at most {self._rate_limit:g} per second"
            )
        attestor = self._attestors.get(kind)
        if attestor is None:
            raise UnknownNodeAttestor(kind, self._attestors)
        return attestor

    async def attest(
        self, attestor: NodeAttestor, payload: bytes, public_key: PublicKey, source: str
    ) -> list[x509.Certificate]:
        """Verify ``payload`` with ``attestor``; the new agent SVID chain (leaf first)."""
        audit.identify(audit.Actor("node", source))
        try:
            result = await asyncio.to_thread(attestor.attest, payload)
        except AttestationError as err:
            self._count(RESULT_FAILURE)
            log.warning(
                "node attestation refused",
                extra={"attestation_type": attestor.type, "source": source, "error": str(err)},
            )
            await self._refused("", attestor.type, source, str(err))
            raise
        agent_id = str(result.agent_id)
        existing = await asyncio.to_thread(self._ds.fetch_attested_node, agent_id)
        if existing is not None and existing.banned:
            self._count(RESULT_FAILURE)
            log.warning("banned agent refused", extra={"agent_id": agent_id, "source": source})
            await self._refused(agent_id, attestor.type, source, "the agent is banned")
            raise AgentBanned()
        if existing is not None and not result.can_reattest:
            self._count(RESULT_FAILURE)
            log.warning(
                "re-attestation refused",
                extra={"agent_id": agent_id, "attestation_type": attestor.type, "source": source},
            )
            await self._refused(
                agent_id, attestor.type, source, "already attested; this attestor cannot re-attest"
            )
            raise ReattestationRefused(agent_id, attestor.type)
        chain = await asyncio.to_thread(
            self._ca.sign_agent_svid, result.agent_id, public_key, self._agent_svid_ttl
        )
        node = AttestedNode(
            spiffe_id=agent_id,
            attestation_type=attestor.type,
            selectors=tuple(result.selectors),
            cert_serial=cert_serial(chain[0]),
            cert_not_after=cert_not_after(chain[0]),
        )
        await asyncio.to_thread(self._record_node, node, existing is not None)
        await asyncio.to_thread(
            self._ds.create_issued_x509_svids,
            [issued_record(chain[0], agent_id, agent_id=agent_id)],
        )
        if result.alias_id is not None:
            await asyncio.to_thread(self._create_alias, agent_id, str(result.alias_id))
        self._count(RESULT_SUCCESS)
        log.info(
            "attested agent",
            extra={
                "agent_id": agent_id,
                "attestation_type": attestor.type,
                "source": source,
                "reattested": existing is not None,
            },
        )
        return chain

    async def _refused(self, agent_id: str, attestation_type: str, source: str, why: str) -> None:
        """Record a refused node attestation in the audit trail."""
        record = audit.pending(
            "agent.attest",
            subject=agent_id,
            outcome=audit.REFUSED,
            reason=why,
            details={"attestation_type": attestation_type, "source": source},
        )
        await asyncio.to_thread(self._ds.append_audit_records, [record])

    def _record_node(self, node: AttestedNode, exists: bool) -> None:
        if not exists:
            try:
                self._ds.create_attested_node(node)
                return
            except AlreadyExists:
                pass  # re-attested concurrently: update below
        self._ds.update_attested_node(node)

    def _create_alias(self, agent_id: str, alias_id: str) -> None:
        entry = RegistrationEntry(
            spiffe_id=alias_id,
            parent_id=agent_id,
            selectors=(Selector("spiffe_id", agent_id),),
        )
        try:
            created = self._ds.create_registration_entry(entry)
        except AlreadyExists:
            return
        log.info(
            "created node alias entry",
            extra={"agent_id": agent_id, "spiffe_id": alias_id, "entry_id": created.id},
        )

    def _count(self, result: str) -> None:
        if self._metrics is not None:
            self._metrics.node_attestations.labels(result).inc()
