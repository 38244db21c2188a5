"""Workload X509-SVIDs encoded from a per-CA template and signed with the CA key directly.

Building a leaf with pyca/cryptography's ``CertificateBuilder`` costs about twice the ECDSA
signature itself (``benchmarks/svid_sign.py``). Yet every workload leaf that one CA signs
for one kind of subject key (EC or RSA; they differ in key usage) is the same DER except
for these fields, which :mod:`server.ca.templates` and :mod:`credo.x509svid` decide:

* the serial number;
* the validity: NotBefore and NotAfter, whole seconds, UTCTime before 2050 and
  GeneralizedTime from 2050 on (RFC 5280, 4.1.2.5);
* the subject: ``O=SPIFFE``, plus ``CN=<first DNS name>`` when there are DNS names;
* the subject public key info, and the subject key identifier (SHA-1 of its key bits);
* the SAN: the SPIFFE ID as a URI, then the DNS names in order.

:class:`WorkloadSvidSigner` takes everything else (version, signature algorithm, issuer
name, basic constraints, key usage, extended key usage, authority key identifier) from the
first leaf the builder signs for each kind of key, the *prototype*. Before it uses that
template it encodes the prototype's own fields with it and checks that the result is the
prototype's TBSCertificate byte for byte; if not (the certificate shape changed in
:mod:`credo.x509svid`), that kind of key stays on the builder and a warning is logged.
It then signs the TBSCertificate with the CA key and assembles the Certificate.

Encoding an EC public key costs about a fifth of a P-256 signature (OpenSSL converts the
point to affine coordinates), so a caller that read the key from a CSR passes the request's own
SubjectPublicKeyInfo as ``key_info`` (:func:`request_key_info`). The signer puts those
bytes in the leaf only when they are what ``public_bytes`` would write for that key: an EC
key whose AlgorithmIdentifier and BIT STRING header are byte for byte the canonical ones
for its curve (learned from the first key of that curve the signer encodes) followed by an
uncompressed point (``04``, X, Y at full width). The key was parsed from exactly those
bytes, and re-encoding an uncompressed point gives the same X and Y, so the SPKI is the
one the builder writes. The prefixes are kept by the SPKI's length (91 bytes for P-256,
120 for P-384, 158 for P-521), and each names its curve by OID, so the check needs neither
the key's type nor its curve. Anything else (a compressed point, an RSA key, a curve whose
length another curve took first) is encoded again.

The builder still signs whatever the template does not cover, and so raises the errors it
always raised: a key that is neither EC nor RSA, a SPIFFE ID without a path, a DNS name
that is not ASCII, a first DNS name that does not fit a CN (1 to 64 bytes), a serial out
of range, a validity that starts before 1950 or ends before it starts.
``tests/unit/server/ca/test_ca_tbs.py`` compares the two paths over generated inputs.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Final, NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding

from credo.keys import PrivateKey, PublicKey
from credo.spiffe_id import SpiffeId
from credo.x509svid import signature_hash_for
from server.ca import templates

__all__ = ["SignedLeaf", "WorkloadSvidSigner", "request_key_info"]

log = logging.getLogger(__name__)

# DER tags (X.690) of the elements encoded here.
_INTEGER: Final = 0x02
_BIT_STRING: Final = 0x03
_OCTET_STRING: Final = 0x04
_UTF8_STRING: Final = 0x0C
_UTC_TIME: Final = 0x17
_GENERALIZED_TIME: Final = 0x18
_SEQUENCE: Final = 0x30
_SET: Final = 0x31
_DNS_NAME: Final = 0x82  # GeneralName [2] IA5String
_URI: Final = 0x86  # GeneralName [6] IA5String
_EXTENSIONS: Final = 0xA3  # TBSCertificate [3] EXPLICIT

# OIDs (RFC 5280), as complete DER elements.
_OID_COMMON_NAME: Final = bytes.fromhex("0603550403")  # 2.5.4.3
_OID_BASIC_CONSTRAINTS: Final = bytes.fromhex("0603551d13")  # 2.5.29.19
_OID_KEY_USAGE: Final = bytes.fromhex("0603551d0f")  # 2.5.29.15
_OID_EXT_KEY_USAGE: Final = bytes.fromhex("0603551d25")  # 2.5.29.37
_OID_SUBJECT_KEY_ID: Final = bytes.fromhex("0603551d0e")  # 2.5.29.14
_OID_AUTHORITY_KEY_ID: Final = bytes.fromhex("0603551d23")  # 2.5.29.35
_OID_SUBJECT_ALT_NAME: Final = bytes.fromhex("0603551d11")  # 2.5.29.17
_LEAF_EXTENSIONS: Final = (
    _OID_BASIC_CONSTRAINTS,
    _OID_KEY_USAGE,
    _OID_EXT_KEY_USAGE,
    _OID_SUBJECT_KEY_ID,
    _OID_AUTHORITY_KEY_ID,
    _OID_SUBJECT_ALT_NAME,
)
"""The leaf's extensions in the order :func:`credo.x509svid.x509_svid_template` adds them."""
_TBS_TAGS: Final = (0xA0, _INTEGER, *[_SEQUENCE] * 5, _EXTENSIONS)
"""version, serial, signature, issuer, validity, subject, subjectPublicKeyInfo, extensions."""

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_SECOND: Final = timedelta(seconds=1)
_YEAR_1950: Final = -631_152_000  # 1950-01-01T00:00:00Z: UTCTime's first instant
_YEAR_2050: Final = 2_524_608_000  # 2050-01-01T00:00:00Z: GeneralizedTime from here on
_SERIAL_LIMIT: Final = 1 << 159
_SERIAL_128: Final = bytes((_INTEGER, 17, 0))  # then 16 bytes, the first >= 0x80
_MAX_CN: Final = 64  # ub-common-name (RFC 5280); cryptography refuses a longer CN
_SHA1_SIZE: Final = 20
_DER: Final = serialization.Encoding.DER
_SPKI: Final = serialization.PublicFormat.SubjectPublicKeyInfo


class SignedLeaf(NamedTuple):
    """A signed workload leaf: its DER, its NotAfter (Unix seconds), and which path made it."""

    der: bytes
    not_after: int
    templated: bool
    """True when it was encoded from the template, False when the builder made it."""


# --- DER ------------------------------------------------------------------------------


def _head(tag: int, size: int) -> bytes:
    """A DER element's tag and definite length: short form below 128, else long form."""
    if size < 0x80:
        return bytes((tag, size))
    width = (size.bit_length() + 7) // 8
    return bytes((tag, 0x80 | width)) + size.to_bytes(width, "big")


def _tlv(tag: int, body: bytes) -> bytes:
    """One DER element: ``tag``, the length of ``body``, ``body``."""
    return _head(tag, len(body)) + body


def _header(der: bytes, pos: int) -> tuple[int, int]:
    """The (content start, end) of the element whose tag is at ``der[pos]``."""
    size = der[pos + 1]
    if size < 0x80:
        return pos + 2, pos + 2 + size
    start = pos + 2 + (size & 0x7F)
    return start, start + int.from_bytes(der[pos + 2 : start], "big")


class _Element(NamedTuple):
    tag: int
    start: int
    content: int
    end: int


def _children(der: bytes, parent: _Element) -> list[_Element]:
    """The elements directly inside ``parent``."""
    out = []
    pos = parent.content
    while pos < parent.end:
        content, end = _header(der, pos)
        out.append(_Element(der[pos], pos, content, end))
        pos = end
    if pos != parent.end:
        raise ValueError("element overruns its parent")
    return out


def _root(der: bytes) -> _Element:
    content, end = _header(der, 0)
    if end != len(der):
        raise ValueError("trailing bytes after the certificate")
    return _Element(der[0], 0, content, end)


def _integer(value: int) -> bytes:
    """A positive INTEGER: big-endian, with a 0 byte first when the top bit is set."""
    return _tlv(_INTEGER, value.to_bytes((value.bit_length() + 8) // 8, "big"))


def _random_serial() -> bytes:
    """A random 128-bit serial with its top bit set, as an INTEGER: what
    ``credo.x509svid`` picks when it builds a leaf, without the detour through ``int``."""
    raw = os.urandom(16)
    return _SERIAL_128 + bytes((raw[0] | 0x80,)) + raw[1:]


def _time(seconds: int) -> bytes:
    """``seconds`` (Unix time, UTC) as RFC 5280 Time: UTCTime before 2050, else Generalized."""
    t = time.gmtime(seconds)
    if seconds < _YEAR_2050:
        text = f"{t.tm_year % 100:02d}{t.tm_mon:02d}{t.tm_mday:02d}"
        tag = _UTC_TIME
    else:
        text = f"{t.tm_year:04d}{t.tm_mon:02d}{t.tm_mday:02d}"
        tag = _GENERALIZED_TIME
    text += f"{t.tm_hour:02d}{t.tm_min:02d}{t.tm_sec:02d}Z"
    return _tlv(tag, text.encode("ascii"))


def _key_bits(spki: bytes) -> bytes:
    """The subjectPublicKey bits of a SubjectPublicKeyInfo (what the SKI hashes)."""
    content, _ = _header(spki, 0)
    _, algorithm_end = _header(spki, content)
    bits, end = _header(spki, algorithm_end)
    return spki[bits + 1 : end]  # after the unused-bits byte (always 0 for a key)


def request_key_info(csr: bytes) -> bytes:
    """The SubjectPublicKeyInfo element of a DER PKCS#10 request (RFC 2986): the third
    field of its CertificationRequestInfo. ``csr`` must already have loaded with
    ``x509.load_der_x509_csr``, which accepts DER only."""
    info, _ = _header(csr, 0)  # CertificationRequest ::= SEQUENCE { info, ... }
    version, _ = _header(csr, info)  # CertificationRequestInfo ::= SEQUENCE { version, ...
    _, subject = _header(csr, version)
    _, spki = _header(csr, subject)  # ... subject, subjectPKInfo, attributes }
    return csr[spki : _header(csr, spki)[1]]


def _seconds(when: datetime) -> int:
    """Whole Unix seconds of an aware datetime, rounded down as the builder truncates."""
    return (when - _EPOCH) // _SECOND


# --- the template -----------------------------------------------------------------------


class _Template:
    """The fixed DER pieces of one CA's workload leaves for one kind of subject key.

    The length octets of the nested elements around the variable fields (the SAN, the
    extension list, the TBSCertificate) follow from the variable fields' lengths alone;
    :meth:`tbs` keeps them per combination of those lengths (a *frame*), so one leaf costs
    one join of ready pieces.
    """

    _MAX_FRAMES: Final = 4096

    def __init__(self, prototype: bytes) -> None:
        """Cut the pieces out of ``prototype`` (a builder-made leaf); ValueError if its
        shape is not the one this module encodes."""
        certificate = _root(prototype)
        tbs, _, _ = _children(prototype, certificate)
        fields = _children(prototype, tbs)
        if [f.tag for f in fields] != list(_TBS_TAGS):
            raise ValueError("unexpected TBSCertificate fields")
        version, _, signature, issuer, _, subject, _, wrapper = fields
        (extension_list,) = _children(prototype, wrapper)
        extensions = _children(prototype, extension_list)
        oids = [prototype[e.content : _children(prototype, e)[0].end] for e in extensions]
        if oids != list(_LEAF_EXTENSIONS):
            raise ValueError("unexpected leaf extensions")
        basic, _, _, ski, aki, _ = extensions
        organization = _children(prototype, subject)[0]
        self.version = prototype[version.start : version.end]
        self.signature_and_issuer = prototype[signature.start : issuer.end]
        self.organization = prototype[organization.start : organization.end]
        # basic constraints, key usage, extended key usage, then the SKI up to its digest
        self.before_ski = prototype[basic.start : ski.end - _SHA1_SIZE]
        self.aki = prototype[aki.start : aki.end]
        self.subject_plain = _tlv(_SEQUENCE, self.organization)
        self._frames: dict[tuple[int, int, int, int, int], tuple[bytes, bytes, bytes]] = {}

    def subject(self, dns_names: Sequence[str]) -> bytes:
        """``O=SPIFFE``, plus ``CN=<first DNS name>`` when there are DNS names."""
        if not dns_names:
            return self.subject_plain
        cn = _tlv(_SEQUENCE, _OID_COMMON_NAME + _tlv(_UTF8_STRING, dns_names[0].encode()))
        return _tlv(_SEQUENCE, self.organization + _tlv(_SET, cn))

    def tbs(
        self,
        serial: bytes,
        validity: bytes,
        spki: bytes,
        uri: str,
        dns_names: Sequence[str],
    ) -> bytes:
        """The TBSCertificate DER for these variable fields (``serial`` as an INTEGER)."""
        names = _tlv(_URI, uri.encode())
        if dns_names:
            names += b"".join([_tlv(_DNS_NAME, name.encode()) for name in dns_names])
        subject = self.subject(dns_names)
        lengths = (len(serial), len(validity), len(subject), len(spki), len(names))
        frame = self._frames.get(lengths)
        if frame is None:
            frame = self._frame(*lengths)
        tbs_head, extensions_head, san_head = frame
        return b"".join(
            (
                tbs_head,
                self.version,
                serial,
                self.signature_and_issuer,
                validity,
                subject,
                spki,
                extensions_head,
                self.before_ski,
                hashlib.sha1(_key_bits(spki)).digest(),  # RFC 5280 4.2.1.2, method (1)
                self.aki,
                san_head,
                names,
            )
        )

    def _frame(
        self, serial: int, validity: int, subject: int, spki: int, names: int
    ) -> tuple[bytes, bytes, bytes]:
        """The length octets around fields of these lengths: the TBSCertificate's head, the
        extensions' heads, and the SAN extension up to its names."""
        names_head = _head(_SEQUENCE, names)
        octets = len(names_head) + names
        octets_head = _head(_OCTET_STRING, octets)
        san_size = len(_OID_SUBJECT_ALT_NAME) + len(octets_head) + octets
        san_head = _head(_SEQUENCE, san_size) + _OID_SUBJECT_ALT_NAME + octets_head + names_head
        extensions = len(self.before_ski) + _SHA1_SIZE + len(self.aki) + len(san_head) + names
        list_head = _head(_SEQUENCE, extensions)
        extensions_head = _head(_EXTENSIONS, len(list_head) + extensions) + list_head
        size = len(self.version) + serial + len(self.signature_and_issuer) + validity
        size += subject + spki + len(extensions_head) + extensions
        frame = (_head(_SEQUENCE, size), extensions_head, san_head)
        if len(self._frames) >= self._MAX_FRAMES:
            self._frames = {}
        self._frames[(serial, validity, subject, spki, names)] = frame
        return frame


def _validity(not_before: int, not_after: int) -> bytes:
    return _tlv(_SEQUENCE, _time(not_before) + _time(not_after))


def _covered(spiffe_id: SpiffeId, uri: str, dns_names: Sequence[str], start: int, end: int) -> bool:
    """True if the template encodes these fields as the builder would (which would not raise)."""
    return (
        spiffe_id.path != ""
        and uri.isascii()
        and (not dns_names or (1 <= len(dns_names[0]) <= _MAX_CN and _ascii(dns_names)))
        and _YEAR_1950 <= start <= end
    )


def _ascii(names: Sequence[str]) -> bool:
    return all(name.isascii() for name in names)


class WorkloadSvidSigner:
    """Signs workload X509-SVID leaves for one CA certificate and key; see the module doc.

    Safe to share between threads: the template table and the cached validity are replaced
    whole, and a template's frame cache only gains entries that never change.
    """

    def __init__(self, ca_certificate: x509.Certificate, ca_key: PrivateKey) -> None:
        self._ca_certificate = ca_certificate
        self._ca_key = ca_key
        self._ca_not_after = ca_certificate.not_valid_after_utc
        self._hash = signature_hash_for(ca_key)
        self._sign_tbs = self._tbs_signer(ca_key)
        # by the subject key's class (EC and RSA keys are one class each); None = builder
        self._templates: dict[type, _Template | None] = {}
        self._last_validity: tuple[int, int, bytes] = (0, 0, b"")
        self._signature_algorithm = b""
        # by the length of a curve's SPKI: its canonical bytes up to the point's X and Y
        self._ec_spki_heads: dict[int, bytes] = {}

    def __repr__(self) -> str:
        return f"WorkloadSvidSigner(ca_serial={self._ca_certificate.serial_number:x})"

    def _tbs_signer(self, key: PrivateKey) -> Callable[[bytes], bytes]:
        """Sign TBS bytes as ``CertificateBuilder.sign(key, signature_hash_for(key))`` does."""
        if isinstance(key, ec.EllipticCurvePrivateKey):
            algorithm = ec.ECDSA(self._hash)
            return lambda data: key.sign(data, algorithm)
        pkcs1 = padding.PKCS1v15()
        return lambda data: key.sign(data, pkcs1, self._hash)

    def sign(
        self,
        spiffe_id: SpiffeId,
        public_key: PublicKey,
        ttl: timedelta,
        dns_names: Sequence[str] = (),
        now: datetime | None = None,
        *,
        serial_number: int | None = None,
        key_info: bytes | None = None,
    ) -> SignedLeaf:
        """Sign the workload X509-SVID :func:`server.ca.templates.workload_svid_template`
        describes for these arguments (a random serial unless ``serial_number`` is given).

        ``key_info`` is the DER SubjectPublicKeyInfo ``public_key`` was loaded from, if the
        caller has it (see the module doc); it must be those very bytes.
        """
        now = now if now is not None else datetime.now(UTC)
        not_before, not_after = templates.leaf_window(self._ca_not_after, ttl, now)
        template = self._templates.get(type(public_key))
        uri = str(spiffe_id)
        start, end = _seconds(not_before), _seconds(not_after)
        if template is None or not _covered(spiffe_id, uri, dns_names, start, end):
            return self._build(spiffe_id, public_key, ttl, dns_names, now, serial_number, uri)
        if serial_number is None:
            serial = _random_serial()
        elif 0 < serial_number < _SERIAL_LIMIT:
            serial = _integer(serial_number)
        else:
            return self._build(spiffe_id, public_key, ttl, dns_names, now, serial_number, uri)
        cached_start, cached_end, validity = self._last_validity
        if cached_start != start or cached_end != end:
            validity = _validity(start, end)
            self._last_validity = (start, end, validity)
        tbs = template.tbs(serial, validity, self._spki(public_key, key_info), uri, dns_names)
        return SignedLeaf(self.assemble(tbs, self._sign_tbs(tbs)), end, True)

    def _spki(self, public_key: PublicKey, key_info: bytes | None) -> bytes:
        """``public_key.public_bytes(DER, SubjectPublicKeyInfo)``: ``key_info`` itself when
        it is a canonical EC encoding (see the module doc), else encoded here."""
        if key_info is not None:
            # The prefix names the curve (its OID): no need to look at the key itself.
            prefix = self._ec_spki_heads.get(len(key_info))
            if prefix is not None and key_info.startswith(prefix):
                return key_info
        spki = public_key.public_bytes(_DER, _SPKI)
        if (
            isinstance(public_key, ec.EllipticCurvePublicKey)
            and len(spki) not in self._ec_spki_heads
        ):
            coordinate = (public_key.curve.key_size + 7) // 8
            prefix = spki[: len(spki) - 2 * coordinate]
            if prefix.endswith(b"\x04"):  # uncompressed, as public_bytes always writes
                self._ec_spki_heads = {**self._ec_spki_heads, len(spki): prefix}
        return spki

    def assemble(self, tbs: bytes, signature: bytes) -> bytes:
        """The Certificate DER for a TBSCertificate and the CA's signature over it."""
        algorithm = self._signature_algorithm
        if not algorithm:
            raise ValueError("no template yet; sign a leaf with the builder first")
        bits = _head(_BIT_STRING, len(signature) + 1)
        size = len(tbs) + len(algorithm) + len(bits) + 1 + len(signature)
        return b"".join((_head(_SEQUENCE, size), tbs, algorithm, bits, b"\x00", signature))

    def _build(
        self,
        spiffe_id: SpiffeId,
        public_key: PublicKey,
        ttl: timedelta,
        dns_names: Sequence[str],
        now: datetime,
        serial_number: int | None,
        uri: str,
    ) -> SignedLeaf:
        """Sign with the certificate builder; learn the template from the first leaf of a
        kind of key."""
        leaf = templates.workload_svid_template(
            spiffe_id, dns_names, public_key, self._ca_certificate, ttl, now, serial_number
        ).sign(self._ca_key, self._hash)
        der = leaf.public_bytes(_DER)
        key_class = type(public_key)
        if key_class not in self._templates and _ascii(dns_names):
            self._learn(key_class, leaf, der, uri, dns_names)
        return SignedLeaf(der, _seconds(leaf.not_valid_after_utc), False)

    def _learn(
        self,
        key_class: type,
        prototype: x509.Certificate,
        der: bytes,
        uri: str,
        dns_names: Sequence[str],
    ) -> None:
        """Make the template for keys of ``key_class`` from a builder-made leaf, if the
        template re-encodes that leaf's TBSCertificate exactly."""
        template: _Template | None = None
        try:
            template = _Template(der)
            tbs, algorithm, _ = _children(der, _root(der))
            again = template.tbs(
                _integer(prototype.serial_number),
                _validity(
                    _seconds(prototype.not_valid_before_utc),
                    _seconds(prototype.not_valid_after_utc),
                ),
                prototype.public_key().public_bytes(_DER, _SPKI),
                uri,
                dns_names,
            )
            if again != der[tbs.start : tbs.end]:
                raise ValueError("re-encoding the prototype gives different bytes")
            self._signature_algorithm = der[algorithm.start : algorithm.end]
        except (ValueError, IndexError) as err:
            template = None
            log.warning(
                "workload svid template does not match the certificate builder; "
                "signing these leaves with the builder",
                extra={"key_class": key_class.__name__, "error": str(err)},
            )
        self._templates = {**self._templates, key_class: template}
