"""The certificate authority: signs X509-, JWT- and WIT-SVIDs with the ACTIVE authorities.

:class:`CertificateAuthority` holds one active X.509 CA (:class:`X509CA`), one active JWT
signing key and one active WIT-SVID signing key (both :class:`JwtKey`). The
:class:`server.ca.manager.AuthorityManager` swaps them during rotation; signing threads read
a consistent snapshot (the slot holds an immutable object, replaced under a lock), so a
rotation never mixes one CA's certificate with another's key.

What a certificate contains is decided by :mod:`server.ca.templates`; this class only
picks the issuer, signs, and returns the chain to hand out:

* self-signed CA: ``[leaf]`` — the root is in the bundle;
* CA under an upstream: ``[leaf, our intermediate, upstream intermediates...]`` — the
  upstream root(s) are in the bundle.

Lifetimes are capped at the CA's NotAfter (X.509) or the signing key's NotAfter (JWT, WIT).
Every signature calls the ``on_sign(kind, seconds)`` hook, so the API layer can export
metrics without this module importing a metrics library.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from credo.errors import InvalidSpiffeId
from credo.jwtsvid import sign_jwt_svid
from credo.keys import PrivateKey, PublicKey
from credo.revocation import REVOCATION_LIST_AUDIENCE
from credo.spiffe_id import SpiffeId, TrustDomain
from credo.witsvid import sign_wit_svid
from credo.x509svid import signature_hash_for
from server.ca import templates
from server.ca.errors import InvalidAuthorityState
from server.ca.tbs import SignedLeaf, WorkloadSvidSigner

__all__ = [
    "SIGN_JWT",
    "SIGN_WIT",
    "SIGN_X509_AGENT",
    "SIGN_X509_SERVER",
    "SIGN_X509_WORKLOAD",
    "X509CA",
    "CertificateAuthority",
    "Clock",
    "JwtKey",
    "SignHook",
    "build_workload_svid",
    "utc_now",
]

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
"""Returns the current time as an aware UTC datetime."""

SignHook = Callable[[str, float], None]
"""``on_sign(kind, seconds)``: called after every signature with its duration."""

SIGN_X509_WORKLOAD: Final = "x509_workload"
SIGN_X509_AGENT: Final = "x509_agent"
SIGN_X509_SERVER: Final = "x509_server"
SIGN_JWT: Final = "jwt"
SIGN_WIT: Final = "wit"


def utc_now() -> datetime:
    """The current time, aware UTC."""
    return datetime.now(UTC)


@dataclass(frozen=True)
class X509CA:
    """An X.509 signing authority: our CA certificate, its key, and the upstream chain.

    ``upstream_chain`` holds the upstream certificates to send after ours, up to but not
    including a root (empty for a self-signed CA or when the upstream signer is the root).
    """

    authority_id: str
    certificate: x509.Certificate
    private_key: PrivateKey = field(repr=False)
    upstream_chain: tuple[x509.Certificate, ...] = ()
    leaf_signer: WorkloadSvidSigner = field(init=False, repr=False, compare=False)
    """Signs this CA's workload leaves (:mod:`server.ca.tbs`)."""

    def __post_init__(self) -> None:
        signer = WorkloadSvidSigner(self.certificate, self.private_key)
        object.__setattr__(self, "leaf_signer", signer)

    @property
    def self_signed(self) -> bool:
        """True when the CA certificate is its own issuer (a root)."""
        return self.certificate.issuer == self.certificate.subject

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        """The certificates to append after a leaf signed by this CA."""
        if self.self_signed:
            return ()
        return (self.certificate, *self.upstream_chain)

    @property
    def not_after(self) -> datetime:
        """The CA certificate's NotAfter."""
        return self.certificate.not_valid_after_utc


@dataclass(frozen=True)
class JwtKey:
    """A JWT-SVID or WIT-SVID signing key, its ``kid``, and when it stops being trusted."""

    kid: str
    private_key: PrivateKey = field(repr=False)
    not_after: datetime


def build_workload_svid(
    trust_domain: TrustDomain,
    signer: WorkloadSvidSigner,
    spiffe_id: SpiffeId,
    public_key: PublicKey,
    ttl: int,
    dns_names: Sequence[str],
    now: datetime,
    key_info: bytes | None = None,
) -> SignedLeaf:
    """Sign a workload X509-SVID leaf with ``signer`` (the issuing CA's
    :attr:`X509CA.leaf_signer`): the one implementation of its contents.

    ``key_info`` is the DER SubjectPublicKeyInfo ``public_key`` was loaded from (a CSR's,
    :func:`server.ca.tbs.request_key_info`), if the caller has it: it saves encoding the
    key again (:meth:`WorkloadSvidSigner.sign`).

    Used by :meth:`CertificateAuthority.sign_x509_svid` and by the signing worker
    processes (:mod:`server.ca.pool`), so both paths hand out identical certificates.
    """
    if spiffe_id.trust_domain != trust_domain:
        raise InvalidSpiffeId(str(spiffe_id), f"not in trust domain {trust_domain}; cannot sign it")
    return signer.sign(spiffe_id, public_key, _ttl(ttl), dns_names, now, key_info=key_info)


@functools.lru_cache(maxsize=64)
def _ttl(seconds: int) -> timedelta:
    """``timedelta(seconds=seconds)``, cached: entries share a handful of TTLs."""
    return timedelta(seconds=seconds)


def _public(key: PublicKey | PrivateKey) -> PublicKey:
    """The public half of ``key`` (which may already be public)."""
    if isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        return key.public_key()
    return key


class CertificateAuthority:
    """Signs SVIDs for ``trust_domain`` with whatever authorities are active right now."""

    def __init__(
        self,
        trust_domain: TrustDomain,
        *,
        clock: Clock = utc_now,
        on_sign: SignHook | None = None,
        jwt_issuer: str = "",
    ) -> None:
        self.trust_domain = trust_domain
        # The ``iss`` of every JWT-SVID ("" signs tokens without one).
        self.jwt_issuer = jwt_issuer
        self._clock = clock
        self._lock = threading.Lock()
        self._x509: X509CA | None = None
        self._jwt: JwtKey | None = None
        self._wit: JwtKey | None = None
        self.on_sign: list[SignHook] = [on_sign] if on_sign is not None else []

    # --- active slots ---------------------------------------------------------------

    @property
    def x509_ca(self) -> X509CA | None:
        """The active X.509 CA, or None before the manager has started."""
        with self._lock:
            return self._x509

    @property
    def jwt_key(self) -> JwtKey | None:
        """The active JWT signing key, or None before the manager has started."""
        with self._lock:
            return self._jwt

    @property
    def jwt_key_id(self) -> str | None:
        """The ``kid`` of the active JWT key, or None."""
        key = self.jwt_key
        return None if key is None else key.kid

    @property
    def wit_key(self) -> JwtKey | None:
        """The active WIT-SVID signing key, or None before the manager has started."""
        with self._lock:
            return self._wit

    def set_wit_key(self, key: JwtKey | None) -> None:
        """Make ``key`` the active WIT-SVID signing key (the manager calls this on activation)."""
        with self._lock:
            self._wit = key

    def set_x509_ca(self, ca: X509CA | None) -> None:
        """Make ``ca`` the active X.509 CA (the manager calls this on activation)."""
        with self._lock:
            self._x509 = ca

    def set_jwt_key(self, key: JwtKey | None) -> None:
        """Make ``key`` the active JWT signing key (the manager calls this on activation)."""
        with self._lock:
            self._jwt = key

    def _active_x509(self) -> X509CA:
        ca = self.x509_ca
        if ca is None:
            raise InvalidAuthorityState(
                "x509",
                "",
                "no active x509 authority; expected the authority manager to start first",
            )
        return ca

    def x509_snapshot(self) -> tuple[X509CA, datetime]:
        """The active X.509 CA and the current time, for signing a batch elsewhere.

        Raises :class:`InvalidAuthorityState` when no CA is active (as signing would).
        """
        return self._active_x509(), self._clock()

    def _check_member(self, spiffe_id: SpiffeId) -> None:
        if spiffe_id.trust_domain != self.trust_domain:
            raise InvalidSpiffeId(
                str(spiffe_id), f"not in trust domain {self.trust_domain}; cannot sign it"
            )

    def _notify(self, kind: str, started: float) -> None:
        seconds = time.perf_counter() - started
        for hook in list(self.on_sign):
            try:
                hook(kind, seconds)
            except Exception:  # a broken metrics hook must not fail issuance; it is logged
                log.exception("on_sign hook failed", extra={"sign_kind": kind})

    # --- X.509 ----------------------------------------------------------------------

    def _sign(
        self, kind: str, ca: X509CA, builder: x509.CertificateBuilder, started: float
    ) -> list[x509.Certificate]:
        return self._signed(
            kind, ca, builder.sign(ca.private_key, signature_hash_for(ca.private_key)), started
        )

    def _signed(
        self, kind: str, ca: X509CA, leaf: x509.Certificate, started: float
    ) -> list[x509.Certificate]:
        self._notify(kind, started)
        if log.isEnabledFor(logging.DEBUG):  # the fields cost more than a fast-path signature
            log.debug(
                "signed x509-svid",
                extra={
                    "sign_kind": kind,
                    "serial": format(leaf.serial_number, "x"),
                    "authority_id": ca.authority_id,
                    "expires_at": leaf.not_valid_after_utc.isoformat(),
                },
            )
        return [leaf, *ca.chain]

    def sign_x509_svid(
        self,
        spiffe_id: SpiffeId,
        public_key: PublicKey,
        ttl: int,
        dns_names: Sequence[str] = (),
        key_info: bytes | None = None,
    ) -> list[x509.Certificate]:
        """Sign a workload X509-SVID; return ``[leaf, *intermediates]`` (never the root).

        ``key_info``: the DER SubjectPublicKeyInfo ``public_key`` was loaded from, if known
        (see :func:`build_workload_svid`)."""
        started = time.perf_counter()
        self._check_member(spiffe_id)
        ca = self._active_x509()
        signed = build_workload_svid(
            self.trust_domain,
            ca.leaf_signer,
            spiffe_id,
            public_key,
            ttl,
            dns_names,
            self._clock(),
            key_info,
        )
        leaf = x509.load_der_x509_certificate(signed.der)
        return self._signed(SIGN_X509_WORKLOAD, ca, leaf, started)

    def sign_agent_svid(
        self, spiffe_id: SpiffeId, public_key: PublicKey, ttl: int
    ) -> list[x509.Certificate]:
        """Sign a node agent's X509-SVID; return ``[leaf, *intermediates]``."""
        started = time.perf_counter()
        self._check_member(spiffe_id)
        ca = self._active_x509()
        builder = templates.agent_svid_template(
            spiffe_id, public_key, ca.certificate, timedelta(seconds=ttl), self._clock()
        )
        return self._sign(SIGN_X509_AGENT, ca, builder, started)

    def sign_server_svid(
        self,
        key: PublicKey | PrivateKey,
        ttl: int,
        dns_names: Sequence[str] = templates.DEFAULT_SERVER_DNS_NAMES,
    ) -> list[x509.Certificate]:
        """Sign the server's own TLS SVID (``spiffe://<td>/credo/server``) for ``key``.

        ``key`` may be the private key (only its public half is used). The caller
        re-signs at half-life.
        """
        started = time.perf_counter()
        ca = self._active_x509()
        builder = templates.server_svid_template(
            self.trust_domain,
            _public(key),
            ca.certificate,
            timedelta(seconds=ttl),
            self._clock(),
            dns_names,
        )
        return self._sign(SIGN_X509_SERVER, ca, builder, started)

    # --- JWT ------------------------------------------------------------------------

    def sign_jwt_revocation_list(self, revoked: Sequence[tuple[str, int]], ttl: int) -> str:
        """The signed JWT revocation list (:mod:`credo.revocation`): ``sub`` the trust
        domain's ID, ``revoked`` the (jti, exp) pairs, signed with the active JWT key."""
        key = self.jwt_key
        if key is None:
            raise InvalidAuthorityState(
                "jwt", "", "no active jwt authority; expected the authority manager to start first"
            )
        now = self._clock()
        return sign_jwt_svid(
            SpiffeId.parse(f"spiffe://{self.trust_domain.name}"),
            [REVOCATION_LIST_AUDIENCE],
            key=key.private_key,
            key_id=key.kid,
            expires_at=min(now + timedelta(seconds=ttl), key.not_after),
            now=now,
            extra_claims={"revoked": [{"jti": jti, "exp": exp} for jti, exp in revoked]},
        )

    def sign_jwt_svid(self, spiffe_id: SpiffeId, audience: Sequence[str], ttl: int) -> str:
        """Sign a JWT-SVID with the active JWT key; ``exp`` capped at the key's NotAfter."""
        started = time.perf_counter()
        self._check_member(spiffe_id)
        if ttl <= 0:
            raise ValueError(f"ttl is {ttl}s; expected a positive number of seconds")
        key = self.jwt_key
        if key is None:
            raise InvalidAuthorityState(
                "jwt", "", "no active jwt authority; expected the authority manager to start first"
            )
        now = self._clock()
        expires_at = min(now + timedelta(seconds=ttl), key.not_after)
        token = sign_jwt_svid(
            spiffe_id,
            list(audience),
            key=key.private_key,
            key_id=key.kid,
            expires_at=expires_at,
            now=now,
            issuer=self.jwt_issuer or None,
        )
        self._notify(SIGN_JWT, started)
        log.debug(
            "signed jwt-svid",
            extra={
                "spiffe_id": str(spiffe_id),
                "authority_id": key.kid,
                "expires_at": expires_at.isoformat(),
            },
        )
        return token

    # --- WIT ------------------------------------------------------------------------

    def sign_wit_svid(self, spiffe_id: SpiffeId, public_key: PublicKey, ttl: int) -> str:
        """Sign a WIT-SVID binding ``public_key`` to ``spiffe_id`` with the active WIT key;
        ``exp`` capped at the key's NotAfter."""
        started = time.perf_counter()
        self._check_member(spiffe_id)
        if ttl <= 0:
            raise ValueError(f"ttl is {ttl}s; expected a positive number of seconds")
        key = self.wit_key
        if key is None:
            raise InvalidAuthorityState(
                "wit", "", "no active wit authority; expected the authority manager to start first"
            )
        now = self._clock()
        expires_at = min(now + timedelta(seconds=ttl), key.not_after)
        token = sign_wit_svid(
            spiffe_id,
            public_key,
            key=key.private_key,
            key_id=key.kid,
            expires_at=expires_at,
            now=now,
        )
        self._notify(SIGN_WIT, started)
        log.debug(
            "signed wit-svid",
            extra={
                "spiffe_id": str(spiffe_id),
                "authority_id": key.kid,
                "expires_at": expires_at.isoformat(),
            },
        )
        return token
