"""Credential templates: the one place that decides what goes into a certificate.

Given who the certificate is for, its public key, the issuing CA and the time, each
function returns an unsigned :class:`cryptography.x509.CertificateBuilder`; the CA only
signs it. The X509-SVID shape itself (SANs, key usage, extensions) comes from
:mod:`credo.x509svid`; this module decides identity, lifetime and DNS names:

* every leaf is valid from ``now - 10s`` (clock skew) to ``min(now + ttl, CA NotAfter)``;
* workload SVIDs carry the entry's SPIFFE ID and DNS names;
* agent SVIDs carry the agent's SPIFFE ID and no DNS names;
* the server's own SVID is ``spiffe://<td>/credo/server`` with DNS SANs
  (``server.credo.invalid``, ``localhost``);
* a CA certificate is a self-signed root, or an intermediate under an upstream CA, with
  NotAfter capped at the upstream certificate's.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from cryptography import x509

from credo._reserved import SERVER_TLS_NAME, server_spiffe_id
from credo.keys import PublicKey
from credo.spiffe_id import SpiffeId, TrustDomain
from credo.x509svid import BACKDATE, ca_certificate_template, x509_svid_template

__all__ = [
    "DEFAULT_SERVER_DNS_NAMES",
    "agent_svid_template",
    "ca_template",
    "leaf_window",
    "server_svid_template",
    "workload_svid_template",
]

# SERVER_TLS_NAME is what agents verify (see credo._reserved); localhost is for local tools.
DEFAULT_SERVER_DNS_NAMES: tuple[str, ...] = (SERVER_TLS_NAME, "localhost")
_NO_TIME = timedelta(0)


def leaf_window(ca_not_after: datetime, ttl: timedelta, now: datetime) -> tuple[datetime, datetime]:
    """NotBefore (backdated) and NotAfter (capped at ``ca_not_after``) for a leaf signed at
    ``now``."""
    if ttl <= _NO_TIME:
        raise ValueError(f"ttl is {ttl}; expected a positive duration")
    return now - BACKDATE, min(now + ttl, ca_not_after)


def _leaf_window(
    ca_cert: x509.Certificate, ttl: timedelta, now: datetime
) -> tuple[datetime, datetime]:
    """:func:`leaf_window` under ``ca_cert``."""
    return leaf_window(ca_cert.not_valid_after_utc, ttl, now)


def workload_svid_template(
    spiffe_id: SpiffeId,
    dns_names: Sequence[str],
    public_key: PublicKey,
    ca_cert: x509.Certificate,
    ttl: timedelta,
    now: datetime,
    serial_number: int | None = None,
) -> x509.CertificateBuilder:
    """The X509-SVID for a registration entry's ``spiffe_id`` and ``dns_names``.

    :mod:`server.ca.tbs` encodes the same certificate from a per-CA template; keep the two
    in step (its tests compare them).
    """
    not_before, not_after = _leaf_window(ca_cert, ttl, now)
    return x509_svid_template(
        spiffe_id,
        public_key,
        issuer=ca_cert,
        not_before=not_before,
        not_after=not_after,
        serial_number=serial_number,
        dns_names=tuple(dns_names),
    )


def agent_svid_template(
    spiffe_id: SpiffeId,
    public_key: PublicKey,
    ca_cert: x509.Certificate,
    ttl: timedelta,
    now: datetime,
) -> x509.CertificateBuilder:
    """The X509-SVID of a node agent (``spiffe://<td>/credo/agent/...``), no DNS names."""
    not_before, not_after = _leaf_window(ca_cert, ttl, now)
    return x509_svid_template(
        spiffe_id, public_key, issuer=ca_cert, not_before=not_before, not_after=not_after
    )


def server_svid_template(
    trust_domain: TrustDomain,
    public_key: PublicKey,
    ca_cert: x509.Certificate,
    ttl: timedelta,
    now: datetime,
    dns_names: Sequence[str] = DEFAULT_SERVER_DNS_NAMES,
) -> x509.CertificateBuilder:
    """The server's own TLS X509-SVID: ``spiffe://<td>/credo/server`` plus DNS SANs."""
    not_before, not_after = _leaf_window(ca_cert, ttl, now)
    return x509_svid_template(
        server_spiffe_id(trust_domain),
        public_key,
        issuer=ca_cert,
        not_before=not_before,
        not_after=not_after,
        dns_names=tuple(dns_names),
    )


def ca_template(
    trust_domain: TrustDomain,
    public_key: PublicKey,
    ttl: timedelta,
    now: datetime,
    upstream_cert: x509.Certificate | None = None,
) -> x509.CertificateBuilder:
    """A CA certificate valid ``now - 10s`` to ``now + ttl``.

    Self-signed when ``upstream_cert`` is None; otherwise an intermediate issued by it,
    with NotAfter capped at ``upstream_cert``'s NotAfter.
    """
    if ttl <= timedelta(0):
        raise ValueError(f"ca ttl is {ttl}; expected a positive duration")
    not_after = now + ttl
    if upstream_cert is not None:
        not_after = min(not_after, upstream_cert.not_valid_after_utc)
    return ca_certificate_template(
        trust_domain,
        public_key,
        not_before=now - BACKDATE,
        not_after=not_after,
        issuer=upstream_cert,
    )
