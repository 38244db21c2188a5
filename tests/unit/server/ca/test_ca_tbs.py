"""Tests for the template-encoded workload leaves (server.ca.tbs) against the builder.

The reference is pyca/cryptography's ``CertificateBuilder`` fed by
:func:`server.ca.templates.workload_svid_template`, which signed every workload SVID before
the template existed. ECDSA signatures are randomized, so two certificates for the same
inputs differ in the signature only: the tests compare the TBSCertificate bytes, and
assemble the builder's own TBSCertificate and signature with the template's framing to
compare the whole Certificate DER. RSA (PKCS#1 v1.5) signatures are deterministic, so for
an RSA CA the whole DER of both paths is compared as well.
"""

from __future__ import annotations

import functools
import logging
import string
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from ca_testkit import TD
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.verification import PolicyBuilder, Store
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from credo.bundle import X509Bundle
from credo.keys import PrivateKey, PublicKey, generate_private_key
from credo.spiffe_id import SpiffeId
from credo.x509svid import signature_hash_for, verify_x509_svid
from server.ca import templates
from server.ca.ca import X509CA, build_workload_svid
from server.ca.tbs import SignedLeaf, WorkloadSvidSigner, request_key_info

DER = serialization.Encoding.DER
SPKI = serialization.PublicFormat.SubjectPublicKeyInfo
PREFIX = f"spiffe://{TD.name}"
MAX_PATH = 2048 - len(PREFIX)  # SPIFFE IDs up to 2048 bytes must be accepted
CA_START = datetime(1950, 1, 1, 0, 0, 10, tzinfo=UTC)  # NotBefore 1950-01-01T00:00:00Z
NOW = datetime(2030, 6, 1, 12, 0, 0, 500000, tzinfo=UTC)
WORKLOAD = SpiffeId.parse(f"{PREFIX}/workload/db")


@dataclass(frozen=True)
class Authority:
    """A CA to sign with, the bundle roots and intermediates that make its chain."""

    certificate: x509.Certificate
    key: PrivateKey
    roots: tuple[x509.Certificate, ...]
    intermediates: tuple[x509.Certificate, ...]


def _ca(key: PrivateKey, ttl: timedelta, issuer: Authority | None = None) -> Authority:
    builder = templates.ca_template(
        TD, key.public_key(), ttl, CA_START, None if issuer is None else issuer.certificate
    )
    signing_key = key if issuer is None else issuer.key
    cert = builder.sign(signing_key, signature_hash_for(signing_key))
    if issuer is None:
        return Authority(cert, key, (cert,), ())
    return Authority(cert, key, issuer.roots, (cert, *issuer.intermediates))


@functools.cache
def authority(name: str) -> Authority:
    """The CAs the tests sign with, by descriptive name (made once per test session)."""
    long = timedelta(days=250 * 365)  # until about 2199: leaves on both sides of 2050
    if name == "ec-p256-root":
        return _ca(generate_private_key("ec-p256"), long)
    if name == "ec-p384-root":
        return _ca(generate_private_key("ec-p384"), long)
    if name == "rsa-2048-root":
        return _ca(generate_private_key("rsa-2048"), long)
    if name == "ec-p256-under-rsa-root":  # issuer name and AKI come from another CA
        return _ca(generate_private_key("ec-p256"), long, authority("rsa-2048-root"))
    if name == "ec-p256-root-until-2050":  # NotAfter caps leaves at exactly 2050-01-01
        return _ca(generate_private_key("ec-p256"), datetime(2050, 1, 1, tzinfo=UTC) - CA_START)
    raise AssertionError(name)


AUTHORITIES = (
    "ec-p256-root",
    "ec-p384-root",
    "rsa-2048-root",
    "ec-p256-under-rsa-root",
    "ec-p256-root-until-2050",
)


@functools.cache
def signer(name: str) -> WorkloadSvidSigner:
    """A signer for ``authority(name)`` that has learned its EC and RSA templates."""
    ca = authority(name)
    leaf_signer = WorkloadSvidSigner(ca.certificate, ca.key)
    now = datetime(2030, 1, 1, tzinfo=UTC)
    for key_type in ("ec-p256", "rsa-2048"):
        first = leaf_signer.sign(
            SpiffeId.parse(f"{PREFIX}/warm-up"), workload_key(key_type, 0), timedelta(1), (), now
        )
        assert not first.templated
    return leaf_signer


@functools.cache
def workload_private_key(key_type: str, index: int) -> PrivateKey:
    """Workload keys, a few per type (RSA keys are slow to make)."""
    return generate_private_key(key_type)


def workload_key(key_type: str, index: int) -> PublicKey:
    """The public half of ``workload_private_key(key_type, index)``."""
    return workload_private_key(key_type, index).public_key()


@functools.cache
def workload_csr(key_type: str, index: int) -> bytes:
    """A DER PKCS#10 request for ``workload_private_key(key_type, index)``."""
    key = workload_private_key(key_type, index)
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    return builder.sign(key, signature_hash_for(key)).public_bytes(DER)


def _compressed_key_info(key: PublicKey) -> bytes:
    """An EC key's SubjectPublicKeyInfo with the point compressed (``02``/``03`` then X):
    valid, but not what ``public_bytes`` writes."""
    assert isinstance(key, ec.EllipticCurvePublicKey)
    canonical = key.public_bytes(DER, SPKI)
    algorithm = canonical[2 : 4 + canonical[3]]  # short-form lengths for P-256 and P-384
    point = key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
    )
    body = algorithm + bytes((0x03, len(point) + 1, 0)) + point
    return bytes((0x30, len(body))) + body


def key_and_info(key_type: str, index: int, source: str) -> tuple[PublicKey, bytes | None]:
    """A workload public key and the ``key_info`` a caller would pass with it: none (the
    key object only), a CSR's SubjectPublicKeyInfo (what the server passes), or a valid
    non-canonical one (a compressed EC point) the key was loaded from."""
    if source == "key":
        return workload_key(key_type, index), None
    if source == "compressed" and key_type.startswith("ec-"):
        info = _compressed_key_info(workload_key(key_type, index))
        loaded = serialization.load_der_public_key(info)
        assert isinstance(loaded, ec.EllipticCurvePublicKey)
        return loaded, info
    csr = workload_csr(key_type, index)
    return x509.load_der_x509_csr(csr).public_key(), request_key_info(csr)


def _builder_leaf(
    ca: Authority,
    spiffe_id: SpiffeId,
    public_key: PublicKey,
    ttl: timedelta,
    dns_names: tuple[str, ...],
    now: datetime,
    serial: int | None,
) -> x509.Certificate:
    builder = templates.workload_svid_template(
        spiffe_id, dns_names, public_key, ca.certificate, ttl, now, serial
    )
    return builder.sign(ca.key, signature_hash_for(ca.key))


def _check_trusted(ca: Authority, leaf: x509.Certificate, spiffe_id: SpiffeId) -> None:
    """The leaf passes Credo's X509-SVID verification and cryptography's path validation."""
    at = leaf.not_valid_before_utc
    bundle = X509Bundle(TD, list(ca.roots))
    assert verify_x509_svid([leaf, *ca.intermediates], bundle, now=at) == spiffe_id
    verifier = PolicyBuilder().store(Store(list(ca.roots))).time(at).build_client_verifier()
    verified = verifier.verify(leaf, list(ca.intermediates))
    assert verified.chain[0] == leaf
    assert verified.subjects is not None
    assert x509.UniformResourceIdentifier(str(spiffe_id)) in verified.subjects


# --- generated inputs -----------------------------------------------------------------

_SEGMENT = st.text(string.ascii_letters + string.digits + "._-", min_size=1, max_size=30).filter(
    lambda s: s not in (".", "..")
)
_PATHS = st.one_of(
    st.lists(_SEGMENT, min_size=1, max_size=8).map(lambda segments: "/" + "/".join(segments)),
    st.integers(1, MAX_PATH - 1).map(lambda n: "/" + "x" * n),  # long IDs: long-form lengths
)
_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", fullmatch=True)
_DNS_NAME = st.lists(_LABEL, min_size=1, max_size=4).map(".".join)
_DNS_NAMES = st.one_of(
    st.just(()),
    st.lists(_DNS_NAME.map(lambda n: n[:64].rstrip(".-") or "a"), min_size=1, max_size=4).map(
        tuple
    ),
    st.lists(_DNS_NAME, min_size=1, max_size=8).map(tuple),
    # first names of 62 to 253 bytes: over 64 the builder refuses them as a CN
    st.integers(50, 241).map(lambda n: ("d" * n + ".example.org", "db")),
    st.just(("*.example.org", "db")),
)
_WHEN = st.datetimes(
    min_value=datetime(1950, 1, 1, 0, 0, 10), max_value=datetime(2199, 1, 1), timezones=st.just(UTC)
)
_TTL = st.one_of(st.integers(1, 7200), st.integers(1, 200 * 365 * 86400))
_SERIAL = st.one_of(
    st.none(),
    st.integers(1, 2**159 - 1),
    # every size boundary: a top bit that needs a leading zero byte, and the value below it
    st.integers(0, 158).map(lambda bit: 1 << bit),
    st.integers(1, 159).map(lambda bits: (1 << bits) - 1),
)
_KEY = st.tuples(
    st.sampled_from(["ec-p256", "ec-p384", "rsa-2048"]),
    st.integers(0, 1),
    st.sampled_from(["key", "csr", "compressed"]),
)

GENERATED = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@GENERATED
@given(
    ca_name=st.sampled_from(AUTHORITIES),
    path=_PATHS,
    dns_names=_DNS_NAMES,
    now=_WHEN,
    ttl=_TTL,
    serial=_SERIAL,
    key=_KEY,
)
@example(
    "ec-p256-root",
    "/" + "x" * (MAX_PATH - 1),
    ("db",),
    datetime(2030, 1, 1, tzinfo=UTC),
    3600,
    None,
    ("ec-p256", 0, "csr"),
)
@example(
    "ec-p256-root",
    "/a",
    (),
    datetime(1950, 1, 1, 0, 0, 10, tzinfo=UTC),
    1,
    1,
    ("ec-p256", 0, "key"),
)
@example(
    "rsa-2048-root",
    "/a",
    (),
    datetime(2049, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    1,
    2**159 - 1,
    ("rsa-2048", 0, "csr"),
)
@example(
    "ec-p256-root-until-2050",
    "/w",
    ("a" * 64,),
    datetime(2049, 12, 31, tzinfo=UTC),
    86400 * 2,
    2**127,
    ("ec-p384", 1, "compressed"),
)
@example(
    "ec-p256-root-until-2050",
    "/w",
    (),
    datetime(2050, 1, 1, 0, 0, 9, tzinfo=UTC),
    60,
    None,
    ("ec-p256", 1, "key"),
)
@example(
    "ec-p256-root-until-2050",
    "/w",
    (),
    datetime(2050, 1, 1, 0, 0, 11, tzinfo=UTC),
    60,
    None,
    ("ec-p256", 1, "key"),
)
def test_template_leaves_are_the_builders_certificates(
    ca_name: str,
    path: str,
    dns_names: tuple[str, ...],
    now: datetime,
    ttl: int,
    serial: int | None,
    key: tuple[str, int, str],
) -> None:
    """For any ID, DNS names, time, TTL, key (with or without the SubjectPublicKeyInfo it
    was loaded from) and serial, the signer hands out the builder's certificate (or raises
    the builder's error), and every leaf it makes is trusted."""
    ca = authority(ca_name)
    leaf_signer = signer(ca_name)
    spiffe_id = SpiffeId.parse(PREFIX + path)
    public_key, key_info = key_and_info(*key)
    lifetime = timedelta(seconds=ttl)
    try:
        signed = leaf_signer.sign(
            spiffe_id,
            public_key,
            lifetime,
            dns_names,
            now,
            serial_number=serial,
            key_info=key_info,
        )
    except ValueError as err:
        event(f"builder error: {str(err)[:30]}")
        with pytest.raises(type(err)) as expected:
            _builder_leaf(ca, spiffe_id, public_key, lifetime, dns_names, now, serial)
        assert str(expected.value) == str(err)
        return
    assert signed.templated
    event("signed from the template")
    leaf = x509.load_der_x509_certificate(signed.der)
    reference = _builder_leaf(
        ca, spiffe_id, public_key, lifetime, dns_names, now, leaf.serial_number
    )
    assert serial is None or leaf.serial_number == serial
    assert leaf.tbs_certificate_bytes == reference.tbs_certificate_bytes
    framed = leaf_signer.assemble(reference.tbs_certificate_bytes, reference.signature)
    assert framed == reference.public_bytes(DER)
    if ca_name == "rsa-2048-root":
        assert signed.der == reference.public_bytes(DER)
    assert signed.not_after == int(reference.not_valid_after_utc.timestamp())
    leaf.verify_directly_issued_by(ca.certificate)
    _check_trusted(ca, leaf, spiffe_id)


@pytest.mark.parametrize("dns_names", [(), ("db.example.org", "db")])
def test_every_id_length_encodes_as_the_builder_does(dns_names: tuple[str, ...]) -> None:
    """For every SPIFFE ID length up to 2048 bytes (every DER length form and boundary the
    names can cross), the template's TBSCertificate is the builder's."""
    ca = authority("ec-p256-root")
    leaf_signer = signer("ec-p256-root")
    public_key = workload_key("ec-p256", 0)
    for length in range(len(PREFIX) + 2, 2049):
        spiffe_id = SpiffeId.parse(PREFIX + "/" + "x" * (length - len(PREFIX) - 1))
        signed = leaf_signer.sign(
            spiffe_id, public_key, timedelta(hours=1), dns_names, NOW, serial_number=length
        )
        reference = _builder_leaf(
            ca, spiffe_id, public_key, timedelta(hours=1), dns_names, NOW, length
        )
        leaf = x509.load_der_x509_certificate(signed.der)
        assert signed.templated
        assert leaf.tbs_certificate_bytes == reference.tbs_certificate_bytes, length
        assert leaf_signer.assemble(reference.tbs_certificate_bytes, reference.signature) == (
            reference.public_bytes(DER)
        ), length


# --- inputs the template leaves to the builder -------------------------------------------


@pytest.mark.parametrize(
    ("case", "spiffe_id", "dns_names", "now", "serial"),
    [
        ("first-dns-name-over-64-bytes", WORKLOAD, ("a" * 65,), NOW, None),
        ("empty-first-dns-name", WORKLOAD, ("",), NOW, None),
        ("non-ascii-dns-name", WORKLOAD, ("db", "bücher.example"), NOW, None),
        ("id-without-path", SpiffeId.parse(PREFIX), (), NOW, None),
        ("serial-zero", WORKLOAD, (), NOW, 0),
        ("serial-over-159-bits", WORKLOAD, (), NOW, 2**159),
        ("validity-before-1950", WORKLOAD, (), datetime(1950, 1, 1, 0, 0, 9, tzinfo=UTC), None),
    ],
)
def test_uncovered_inputs_get_the_builders_error(
    case: str, spiffe_id: SpiffeId, dns_names: tuple[str, ...], now: datetime, serial: int | None
) -> None:
    """What the template does not cover goes to the builder and fails exactly as it did."""
    ca = authority("ec-p256-root")
    public_key = workload_key("ec-p256", 0)
    with pytest.raises(ValueError) as expected:
        _builder_leaf(ca, spiffe_id, public_key, timedelta(hours=1), dns_names, now, serial)
    with pytest.raises(type(expected.value)) as got:
        signer("ec-p256-root").sign(
            spiffe_id, public_key, timedelta(hours=1), dns_names, now, serial_number=serial
        )
    assert str(got.value) == str(expected.value), case


def test_unsupported_key_types_get_the_builders_error() -> None:
    """An Ed25519 workload key is refused as before, with the builder's InvalidKey."""
    ca = authority("ec-p256-root")
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    with pytest.raises(ValueError) as expected:
        _builder_leaf(ca, WORKLOAD, key, timedelta(hours=1), (), NOW, None)
    with pytest.raises(type(expected.value), match="expected an EC or RSA public key"):
        signer("ec-p256-root").sign(WORKLOAD, key, timedelta(hours=1), (), NOW)


def test_first_leaf_of_each_key_kind_is_built_then_templated() -> None:
    """A new CA's first EC and first RSA leaf come from the builder, later ones from the
    template, through the function both the CA and the worker pool call."""
    ca = authority("ec-p384-root")
    x509_ca = X509CA("test-ca", ca.certificate, ca.key)
    made = [
        build_workload_svid(
            TD, x509_ca.leaf_signer, WORKLOAD, workload_key(key_type, 1), 60, ("db.local",), NOW
        ).templated
        for key_type in ("ec-p256", "ec-p384", "rsa-2048", "rsa-2048")
    ]
    assert made == [False, True, False, True]


def test_template_serials_are_random_128_bit_numbers_like_the_builders() -> None:
    """Serials the template picks are 128 bits with the top bit set and never repeat, like
    the ones credo.x509svid picks for the builder."""
    ca = authority("ec-p256-root")
    leaf_signer = signer("ec-p256-root")
    public_key = workload_key("ec-p256", 0)
    serials = [
        x509.load_der_x509_certificate(
            leaf_signer.sign(WORKLOAD, public_key, timedelta(hours=1), (), NOW).der
        ).serial_number
        for _ in range(64)
    ]
    built = _builder_leaf(ca, WORKLOAD, public_key, timedelta(hours=1), (), NOW, None)
    assert {s.bit_length() for s in serials} == {built.serial_number.bit_length()} == {128}
    assert len(set(serials)) == len(serials)


def test_changed_certificate_shape_keeps_the_builder(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """If the leaf template gains a field the encoder does not know, the signer notices on
    its first leaf, warns, and keeps signing with the builder, so nothing is dropped."""
    original = templates.workload_svid_template

    def with_extra_extension(*args: object, **kwargs: object) -> x509.CertificateBuilder:
        builder = original(*args, **kwargs)
        return builder.add_extension(x509.OCSPNoCheck(), critical=False)

    monkeypatch.setattr(templates, "workload_svid_template", with_extra_extension)
    ca = authority("ec-p256-root")
    leaf_signer = WorkloadSvidSigner(ca.certificate, ca.key)
    with caplog.at_level(logging.WARNING, logger="server.ca.tbs"):
        leaves = [
            leaf_signer.sign(WORKLOAD, workload_key("ec-p256", 0), timedelta(hours=1), (), NOW)
            for _ in range(3)
        ]
    assert [leaf.templated for leaf in leaves] == [False, False, False]
    for signed in leaves:
        leaf = x509.load_der_x509_certificate(signed.der)
        leaf.extensions.get_extension_for_class(x509.OCSPNoCheck)
    assert [r.message for r in caplog.records].count(
        "workload svid template does not match the certificate builder; "
        "signing these leaves with the builder"
    ) == 1


# --- an independent verifier ------------------------------------------------------------


def _openssl_verify(ca: Authority, leaf: x509.Certificate, tmp_path: Path) -> str:
    roots = tmp_path / "roots.pem"
    roots.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in ca.roots))
    leaf_pem = tmp_path / "leaf.pem"
    leaf_pem.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    command = ["openssl", "verify", "-x509_strict", "-purpose", "sslclient", "-CAfile", str(roots)]
    command += ["-attime", str(int(leaf.not_valid_before_utc.timestamp()) + 1)]
    if ca.intermediates:
        untrusted = tmp_path / "untrusted.pem"
        untrusted.write_bytes(
            b"".join(c.public_bytes(serialization.Encoding.PEM) for c in ca.intermediates)
        )
        command += ["-untrusted", str(untrusted)]
    result = subprocess.run(
        [*command, str(leaf_pem)], capture_output=True, text=True, check=False, timeout=30
    )
    return (result.stdout + result.stderr).strip()


@pytest.mark.parametrize(
    ("ca_name", "key_type", "path", "dns_names", "now"),
    [
        ("ec-p256-root", "ec-p256", "/workload/db", (), NOW),
        ("ec-p384-root", "ec-p384", "/workload/db", ("db.example.org", "db"), NOW),
        ("rsa-2048-root", "rsa-2048", "/x" * 1000, ("a" * 64, "*.example.org"), NOW),
        ("ec-p256-under-rsa-root", "rsa-2048", "/agents/" + "y" * 300, ("svc",), NOW),
        ("ec-p256-root", "ec-p256", "/after-2050", (), datetime(2060, 2, 29, 1, 2, 3, tzinfo=UTC)),
    ],
)
def test_openssl_verifies_template_leaves(
    ca_name: str,
    key_type: str,
    path: str,
    dns_names: tuple[str, ...],
    now: datetime,
    tmp_path: Path,
) -> None:
    """``openssl verify -x509_strict -purpose sslclient`` accepts template-made leaves."""
    ca = authority(ca_name)
    signed: SignedLeaf = signer(ca_name).sign(
        SpiffeId.parse(PREFIX + path),
        workload_key(key_type, 1),
        timedelta(hours=1),
        dns_names,
        now,
    )
    assert signed.templated
    leaf = x509.load_der_x509_certificate(signed.der)
    assert _openssl_verify(ca, leaf, tmp_path) == f"{tmp_path / 'leaf.pem'}: OK"


# --- the SubjectPublicKeyInfo a CSR carries ----------------------------------------------


@pytest.mark.parametrize("key_type", ["ec-p256", "ec-p384", "rsa-2048"])
def test_request_key_info_is_the_csrs_subject_public_key_info(key_type: str) -> None:
    """``request_key_info`` cuts out exactly the SPKI cryptography reads the CSR's key from."""
    csr = workload_csr(key_type, 0)
    key = x509.load_der_x509_csr(csr).public_key()
    assert request_key_info(csr) == key.public_bytes(DER, SPKI)
    assert serialization.load_der_public_key(request_key_info(csr)) == key


def test_canonical_key_info_goes_into_the_leaf_as_given() -> None:
    """A canonical EC ``key_info`` is put in the leaf as it is, without encoding the key
    again, which is why callers must pass the bytes the key was loaded from: given another
    key's SPKI, the leaf carries that other key."""
    leaf_signer = signer("ec-p256-root")
    own, other = workload_key("ec-p256", 0), workload_key("ec-p256", 1)
    signed = leaf_signer.sign(
        WORKLOAD, own, timedelta(hours=1), (), NOW, key_info=other.public_bytes(DER, SPKI)
    )
    assert signed.templated
    assert x509.load_der_x509_certificate(signed.der).public_key() == other


def test_non_canonical_key_info_is_encoded_again() -> None:
    """A compressed EC point is valid but not what the builder writes: the leaf gets the
    key encoded by cryptography, as the builder's does."""
    key, info = key_and_info("ec-p256", 0, "compressed")
    signed = signer("ec-p256-root").sign(WORKLOAD, key, timedelta(hours=1), (), NOW, key_info=info)
    leaf = x509.load_der_x509_certificate(signed.der)
    assert signed.templated
    assert leaf.public_key().public_bytes(DER, SPKI) == key.public_bytes(DER, SPKI) != info
