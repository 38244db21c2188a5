"""Records <-> protobuf messages, and validation of what callers send, at the API edge.

Validation errors are :class:`InvalidField` (a ``ValueError``) whose message starts with
the field path, e.g. ``entries[1].spiffe_id: invalid SPIFFE ID 'x': scheme is missing``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

import jwt
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from credo._proto.credo.server.v1 import types_pb2
from credo._reserved import (
    RESERVED_PATH_PREFIX,
    SERVER_TLS_NAME,
    is_reserved_dns_name,
    is_reserved_path,
    server_spiffe_id,
)
from credo.bundle import Bundle
from credo.errors import InvalidSelector, InvalidSpiffeId
from credo.keys import PublicKey
from credo.selector import Selector
from credo.selector_rules import check_selector
from credo.spiffe_id import SpiffeId, TrustDomain
from server.datastore.models import AttestedNode, Authority, Crl, JoinToken, RegistrationEntry

__all__ = [
    "MAX_EXPIRES_AT",
    "InvalidField",
    "bundle_to_proto",
    "crl_to_proto",
    "entry_from_proto",
    "entry_to_proto",
    "join_token_to_proto",
    "jwt_expiry",
    "node_to_proto",
    "parse_csr",
    "selector_to_proto",
    "selectors_from_proto",
    "validate_owner",
    "validate_spiffe_id",
    "x509_svid_to_proto",
]

_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_ENTRY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_MAX_HINT = 1024
_MAX_OWNER = 256
_MAX_PURPOSE = 1024
_MAX_TTL = 10 * 365 * 24 * 3600
MAX_EXPIRES_AT = 253_402_300_799
"""9999-12-31T23:59:59Z: the latest ``expires_at`` an entry may be given."""
# Entry flags SPIRE honours and Credo refuses (entries stored with them still load and show).
_UNSUPPORTED_FLAGS = {
    "admin": "Credo has no admin API that workloads may call with their SVID",
    "downstream": "Credo does not sign CA certificates for nested (downstream) servers",
}


class InvalidField(ValueError):
    """A field of a request is invalid; ``field`` is its path (``entries[1].spiffe_id``)."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")


# --- validation ---------------------------------------------------------------------


def validate_spiffe_id(text: str, trust_domain: TrustDomain, field: str) -> SpiffeId:
    """Parse ``text`` as a SPIFFE ID in ``trust_domain``; raise :class:`InvalidField`."""
    if not text:
        raise InvalidField(field, "is required; expected a SPIFFE ID like spiffe://example.org/x")
    try:
        spiffe_id = SpiffeId.parse(text)
    except InvalidSpiffeId as err:
        raise InvalidField(field, str(err)) from None
    if not spiffe_id.is_member_of(trust_domain):
        raise InvalidField(
            field,
            f"{text!r} is in trust domain {spiffe_id.trust_domain}; "
            f"expected an ID in this server's trust domain {trust_domain}",
        )
    return spiffe_id


def _validate_ttl(value: int, field: str) -> int:
    if value < 0:
        raise InvalidField(field, f"must not be negative, got {value} (0 means the default)")
    if value > _MAX_TTL:
        raise InvalidField(field, f"{value}s is more than ten years")
    return value


def validate_dns_name(name: str, field: str) -> str:
    """Check a DNS SAN: letters, digits and '-' labels, an optional leading '*.'."""
    labels = name.split(".")
    if labels and labels[0] == "*":
        labels = labels[1:]
    if not name or len(name) > 253 or not labels or not all(_DNS_LABEL.match(x) for x in labels):
        raise InvalidField(
            field, f"{name!r} is not a valid DNS name; expected labels of letters, digits and '-'"
        )
    if is_reserved_dns_name(name):
        raise InvalidField(
            field,
            f"{name!r} is reserved for the Credo server's own certificate ({SERVER_TLS_NAME})",
        )
    return name


def selectors_from_proto(
    selectors: Iterable[types_pb2.Selector], field: str
) -> tuple[Selector, ...]:
    out = []
    for i, pb in enumerate(selectors):
        try:
            out.append(Selector(pb.type, pb.value))
        except InvalidSelector as err:
            raise InvalidField(f"{field}[{i}]", err.reason) from None
    return tuple(out)


def entry_from_proto(
    pb: types_pb2.RegistrationEntry,
    trust_domain: TrustDomain,
    field: str,
    *,
    require_id: bool = False,
) -> RegistrationEntry:
    """Validate an entry sent by an admin and return it as a record."""
    if require_id and not pb.id:
        raise InvalidField(f"{field}.id", "is required to update an entry")
    if pb.id and not _ENTRY_ID.match(pb.id):
        raise InvalidField(
            f"{field}.id",
            f"{pb.id[:80]!r} is not a valid entry id; expected up to 64 letters, "
            "digits, '.', '-' or '_'",
        )
    spiffe_id = validate_spiffe_id(pb.spiffe_id, trust_domain, f"{field}.spiffe_id")
    if not spiffe_id.path:
        raise InvalidField(
            f"{field}.spiffe_id", "must have a path; the trust domain ID is not allowed"
        )
    if is_reserved_path(spiffe_id.path):
        raise InvalidField(
            f"{field}.spiffe_id",
            f"paths under {RESERVED_PATH_PREFIX} are reserved for the server and its agents",
        )
    parent = pb.parent_id
    if not parent and pb.node_alias:
        parent = str(server_spiffe_id(trust_domain))
    validate_spiffe_id(parent, trust_domain, f"{field}.parent_id")
    selectors = selectors_from_proto(pb.selectors, f"{field}.selectors")
    if not selectors:
        raise InvalidField(f"{field}.selectors", "at least one selector is required (type:value)")
    for i, selector in enumerate(selectors):
        try:
            check_selector(selector)  # one that no attestor can produce would never match
        except InvalidSelector as err:
            raise InvalidField(f"{field}.selectors[{i}]", err.reason) from None
    dns_names = tuple(
        validate_dns_name(n, f"{field}.dns_names[{i}]") for i, n in enumerate(pb.dns_names)
    )
    federates_with = []
    for i, name in enumerate(pb.federates_with):
        try:
            td = TrustDomain.parse(name)
        except InvalidSpiffeId as err:
            raise InvalidField(f"{field}.federates_with[{i}]", str(err)) from None
        if td == trust_domain:
            raise InvalidField(f"{field}.federates_with[{i}]", "is this server's own trust domain")
        federates_with.append(td.name)
    if len(pb.hint) > _MAX_HINT:
        raise InvalidField(f"{field}.hint", f"is longer than {_MAX_HINT} characters")
    _check_expires_at(pb.expires_at, f"{field}.expires_at")
    for flag, missing in _UNSUPPORTED_FLAGS.items():
        if getattr(pb, flag):
            raise InvalidField(
                f"{field}.{flag}",
                f"is not supported: {missing}; leave it unset (on an entry stored with it, "
                f"entry update --no-{flag} clears it)",
            )
    return RegistrationEntry(
        id=pb.id,
        spiffe_id=str(spiffe_id),
        parent_id=parent,
        selectors=selectors,
        x509_svid_ttl=_validate_ttl(pb.x509_svid_ttl, f"{field}.x509_svid_ttl"),
        jwt_svid_ttl=_validate_ttl(pb.jwt_svid_ttl, f"{field}.jwt_svid_ttl"),
        dns_names=dns_names,
        admin=pb.admin,
        downstream=pb.downstream,
        node_alias=pb.node_alias,
        hint=pb.hint,
        expires_at=pb.expires_at,
        federates_with=tuple(federates_with),
        owner=validate_owner(pb.owner, f"{field}.owner"),
        purpose=_validate_text(pb.purpose, f"{field}.purpose", _MAX_PURPOSE),
    )


def validate_owner(owner: str, field: str) -> str:
    """An entry's owner: a person or team name without control characters or edge spaces."""
    owner = _validate_text(owner, field, _MAX_OWNER)
    if owner != owner.strip():
        raise InvalidField(field, "must not start or end with whitespace")
    return owner


def _validate_text(value: str, field: str, limit: int) -> str:
    if len(value) > limit:
        raise InvalidField(field, f"is longer than {limit} characters")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        raise InvalidField(field, "must not contain control characters")
    return value


def _check_expires_at(value: int, field: str) -> None:
    """An entry's expiry: 0 (never), or a time in the future no later than year 9999."""
    if value < 0:
        raise InvalidField(field, "must not be negative (0 means never)")
    if value > MAX_EXPIRES_AT:
        raise InvalidField(
            field,
            f"{value} is after 9999-12-31T23:59:59Z ({MAX_EXPIRES_AT}), the latest expiry "
            "an entry may have; expected unix seconds or RFC 3339 (0 means never)",
        )
    if 0 < value <= time.time():
        raise InvalidField(
            field,
            f"{datetime.fromtimestamp(value, UTC):%Y-%m-%dT%H:%M:%SZ} is in the past: an "
            "expired entry is never served and is pruned at once; give a later time, 0 "
            "(never), or delete the entry",
        )


_CSR_CURVES = frozenset({"secp256r1", "secp384r1", "secp521r1"})


def parse_csr(data: bytes, field: str) -> PublicKey:
    """Parse a DER PKCS#10 CSR, check its signature and key type; return its public key.

    Only the public key is used: names and extensions in the request are ignored.
    """
    if not data:
        raise InvalidField(field, "is required; expected a DER PKCS#10 certificate request")
    try:
        csr = x509.load_der_x509_csr(data)
    except ValueError:
        raise InvalidField(field, "is not a DER PKCS#10 certificate request") from None
    try:
        key = csr.public_key()
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise InvalidField(field, f"cannot read the request's public key: {err}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise InvalidField(
            field, f"key type {type(key).__name__} is not supported; expected an EC or RSA key"
        )
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name not in _CSR_CURVES:
        raise InvalidField(
            field,
            f"EC curve {key.curve.name} is not supported; expected one of "
            f"{', '.join(sorted(_CSR_CURVES))}",
        )
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < 2048:
        raise InvalidField(field, f"RSA key of {key.key_size} bits is too small; expected >= 2048")
    try:
        valid = csr.is_signature_valid
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise InvalidField(field, f"cannot check the request's signature: {err}") from None
    if not valid:
        raise InvalidField(
            field, "signature does not verify; the request was not signed by its key"
        )
    return key


def parse_public_key(data: bytes, field: str) -> PublicKey:
    """Parse a DER SubjectPublicKeyInfo of a supported key (EC P-256/384/521, RSA >= 2048)."""
    if not data:
        raise InvalidField(field, "is required; expected a DER SubjectPublicKeyInfo")
    try:
        key = serialization.load_der_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise InvalidField(field, "is not a DER SubjectPublicKeyInfo") from None
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise InvalidField(
            field, f"key type {type(key).__name__} is not supported; expected an EC or RSA key"
        )
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name not in _CSR_CURVES:
        raise InvalidField(
            field,
            f"EC curve {key.curve.name} is not supported; expected one of "
            f"{', '.join(sorted(_CSR_CURVES))}",
        )
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < 2048:
        raise InvalidField(field, f"RSA key of {key.key_size} bits is too small; expected >= 2048")
    return key


# --- records -> messages --------------------------------------------------------------


def selector_to_proto(selector: Selector) -> types_pb2.Selector:
    return types_pb2.Selector(type=selector.type, value=selector.value)


def entry_to_proto(entry: RegistrationEntry) -> types_pb2.RegistrationEntry:
    return types_pb2.RegistrationEntry(
        id=entry.id,
        spiffe_id=entry.spiffe_id,
        parent_id=entry.parent_id,
        selectors=[selector_to_proto(s) for s in entry.selectors],
        x509_svid_ttl=entry.x509_svid_ttl,
        jwt_svid_ttl=entry.jwt_svid_ttl,
        dns_names=list(entry.dns_names),
        admin=entry.admin,
        downstream=entry.downstream,
        node_alias=entry.node_alias,
        hint=entry.hint,
        expires_at=entry.expires_at,
        federates_with=list(entry.federates_with),
        revision_number=entry.revision_number,
        created_at=entry.created_at,
        owner=entry.owner,
        purpose=entry.purpose,
    )


def node_to_proto(node: AttestedNode) -> types_pb2.AttestedNode:
    return types_pb2.AttestedNode(
        spiffe_id=node.spiffe_id,
        attestation_type=node.attestation_type,
        selectors=[selector_to_proto(s) for s in node.selectors],
        cert_serial=node.cert_serial,
        cert_not_after=node.cert_not_after,
        new_cert_serial=node.new_cert_serial,
        new_cert_not_after=node.new_cert_not_after,
        banned=node.banned,
        created_at=node.created_at,
    )


def join_token_to_proto(token: JoinToken) -> types_pb2.JoinToken:
    return types_pb2.JoinToken(
        token=token.token, expires_at=token.expires_at, spiffe_id=token.spiffe_id
    )


def x509_svid_to_proto(
    chain: Sequence[x509.Certificate], spiffe_id: str | None = None
) -> types_pb2.X509Svid:
    """An SVID message; pass ``spiffe_id`` when known to skip reading it from the leaf."""
    leaf = chain[0]
    if spiffe_id is None:
        uris = leaf.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value.get_values_for_type(x509.UniformResourceIdentifier)
        spiffe_id = uris[0] if uris else ""
    return types_pb2.X509Svid(
        spiffe_id=spiffe_id,
        cert_chain=[c.public_bytes(serialization.Encoding.DER) for c in chain],
        expires_at=int(leaf.not_valid_after_utc.timestamp()),
    )


def bundle_to_proto(bundle: Bundle, authorities: Iterable[Authority] = ()) -> types_pb2.Bundle:
    """A bundle message; ``authorities`` (our own CA journal) adds taint flags and expiries."""
    tainted_x509 = set()
    jwt_rows: dict[str, Authority] = {}
    for row in authorities:
        if row.kind == "x509" and row.tainted:
            tainted_x509.add(bytes(row.public_data))
        elif row.kind in ("jwt", "wit"):
            jwt_rows[row.authority_id] = row
    der = serialization.Encoding.DER
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    x509_authorities = []
    for cert in bundle.x509_authorities:
        data = cert.public_bytes(der)
        x509_authorities.append(types_pb2.X509Authority(asn1=data, tainted=data in tainted_x509))
    jwt_authorities: list[types_pb2.JwtAuthority] = []
    wit_authorities: list[types_pb2.JwtAuthority] = []
    for keys, out in (
        (bundle.jwt_authorities, jwt_authorities),
        (bundle.wit_authorities, wit_authorities),
    ):
        for kid, key in keys.items():
            jwt_row = jwt_rows.get(kid)
            out.append(
                types_pb2.JwtAuthority(
                    public_key=key.public_bytes(der, spki),
                    key_id=kid,
                    expires_at=jwt_row.not_after if jwt_row else 0,
                    tainted=jwt_row.tainted if jwt_row else False,
                )
            )
    return types_pb2.Bundle(
        trust_domain=bundle.trust_domain.name,
        x509_authorities=x509_authorities,
        jwt_authorities=jwt_authorities,
        wit_authorities=wit_authorities,
        refresh_hint=bundle.refresh_hint or 0,
        sequence_number=bundle.sequence_number,
    )


def crl_to_proto(crl: Crl) -> types_pb2.Crl:
    """A stored CRL as a message."""
    return types_pb2.Crl(
        authority_id=crl.authority_id, der=crl.data, number=crl.number, next_update=crl.next_update
    )


def jwt_expiry(token: str) -> int:
    """The ``exp`` claim of a token this server just signed (read without verifying)."""
    claims = jwt.decode(token, options={"verify_signature": False})
    return int(claims["exp"])
