"""X509-SVID templates, signing, parsing and validation, per the X509-SVID standard."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from credo_testkit import NOW, X509_FIXTURES, Ca, make_ca
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from credo import (
    BundleSet,
    InvalidX509Svid,
    KeyType,
    SpiffeId,
    TrustDomain,
    X509Bundle,
    X509Svid,
    X509SvidError,
    generate_private_key,
    private_key_to_pkcs8_der,
    private_key_to_pkcs8_pem,
    sign_x509_svid,
    verify_x509_svid,
    x509_svid_template,
)
from credo.errors import (
    BadKeyUsage,
    LeafIsCa,
    MultipleUriSans,
    NoUriSan,
    SigningCertNotCa,
    UntrustedChain,
    X509SvidExpired,
    X509SvidNotYetValid,
)

BUNDLE = X509Bundle.parse_pem("example.org", (X509_FIXTURES / "bundle.pem").read_bytes())
FIXTURE_NOW = datetime(2027, 1, 1, tzinfo=UTC)


def _chain(name: str) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates((X509_FIXTURES / name).read_bytes())


GOOD_FIXTURES = [
    pytest.param("good-leaf-only.pem", id="leaf-only"),
    pytest.param("good-leaf-and-intermediate.pem", id="leaf-and-intermediate"),
    pytest.param("good-leaf-without-eku.pem", id="leaf-without-eku"),
]

WRONG_FIXTURES = [
    pytest.param("wrong-leaf-is-ca.pem", LeafIsCa, "cA=true", id="leaf-is-ca"),
    pytest.param("wrong-two-uri-sans.pem", MultipleUriSans, "2 URI SANs", id="two-uri-sans"),
    pytest.param("wrong-no-uri-san.pem", NoUriSan, "no URI SAN", id="no-uri-san"),
    pytest.param("wrong-no-san-extension.pem", NoUriSan, "no URI SAN", id="no-san-extension"),
    pytest.param(
        "wrong-uri-san-not-spiffe.pem", InvalidX509Svid, "not a SPIFFE ID", id="uri-not-spiffe"
    ),
    pytest.param(
        "wrong-leaf-id-without-path.pem", InvalidX509Svid, "no path", id="leaf-id-without-path"
    ),
    pytest.param("wrong-key-cert-sign.pem", BadKeyUsage, "keyCertSign", id="key-cert-sign"),
    pytest.param("wrong-crl-sign.pem", BadKeyUsage, "cRLSign", id="crl-sign"),
    pytest.param(
        "wrong-no-digital-signature.pem",
        BadKeyUsage,
        "digitalSignature",
        id="no-digital-signature",
    ),
    pytest.param("wrong-no-key-usage.pem", BadKeyUsage, "no key usage", id="no-key-usage"),
    pytest.param(
        "wrong-key-usage-not-critical.pem", BadKeyUsage, "not critical", id="ku-not-critical"
    ),
    pytest.param("expired-leaf.pem", X509SvidExpired, "expired", id="expired-leaf"),
    pytest.param(
        "not-yet-valid-leaf.pem", X509SvidNotYetValid, "not valid before", id="not-yet-valid"
    ),
    pytest.param("wrong-untrusted-root.pem", UntrustedChain, "authority", id="untrusted-root"),
    pytest.param(
        "wrong-other-trust-domain.pem", UntrustedChain, "other.org", id="other-trust-domain"
    ),
    pytest.param(
        "wrong-intermediate-did-not-sign-leaf.pem",
        UntrustedChain,
        "not signed by",
        id="intermediate-did-not-sign-leaf",
    ),
    pytest.param(
        "wrong-intermediate-no-ca.pem", SigningCertNotCa, "not a CA", id="intermediate-no-ca"
    ),
    pytest.param(
        "wrong-intermediate-no-key-cert-sign.pem",
        SigningCertNotCa,
        "keyCertSign",
        id="intermediate-no-key-cert-sign",
    ),
    pytest.param(
        "wrong-intermediate-id-with-path.pem",
        SigningCertNotCa,
        "has a path",
        id="intermediate-id-with-path",
    ),
]


@pytest.mark.parametrize("name", GOOD_FIXTURES)
def test_good_fixtures_verify_against_the_bundle(name: str) -> None:
    """Each good-* chain verifies against bundle.pem and yields the leaf's SPIFFE ID."""
    assert verify_x509_svid(_chain(name), BUNDLE, now=FIXTURE_NOW) == SpiffeId.parse(
        "spiffe://example.org/workload"
    )


@pytest.mark.parametrize("name", GOOD_FIXTURES)
def test_good_fixtures_verify_against_a_bundle_set(name: str) -> None:
    """A BundleSet holding the trust domain's bundle works like the bundle itself."""
    from credo import Bundle

    bundles = BundleSet([Bundle(BUNDLE.trust_domain, BUNDLE.authorities)])
    verify_x509_svid(_chain(name), bundles, now=FIXTURE_NOW)


@pytest.mark.parametrize(("name", "error", "reason"), WRONG_FIXTURES)
def test_wrong_fixtures_raise_the_specific_error(
    name: str, error: type[X509SvidError], reason: str
) -> None:
    """Each wrong-* chain is refused with the error class and reason its name describes."""
    with pytest.raises(error) as info:
        verify_x509_svid(_chain(name), BUNDLE, now=FIXTURE_NOW)
    assert reason in info.value.reason
    assert isinstance(info.value, ValueError)


def test_default_now_is_the_current_time() -> None:
    """Without now=, verification uses the clock (fixtures are valid 2026..2126)."""
    verify_x509_svid(_chain("good-leaf-only.pem"), BUNDLE)


def test_empty_chain_is_refused() -> None:
    """An empty chain raises InvalidX509Svid instead of IndexError."""
    with pytest.raises(InvalidX509Svid, match="empty"):
        verify_x509_svid([], BUNDLE)


def test_missing_trust_domain_in_bundle_set_is_untrusted() -> None:
    """A BundleSet without the leaf's trust domain raises UntrustedChain."""
    with pytest.raises(UntrustedChain, match=r"no bundle for trust domain example\.org"):
        verify_x509_svid(_chain("good-leaf-only.pem"), BundleSet(), now=FIXTURE_NOW)


def test_chain_that_includes_the_root_verifies() -> None:
    """A chain that carries the bundle's root itself still verifies."""
    chain = _chain("good-leaf-and-intermediate.pem") + list(BUNDLE.authorities)
    verify_x509_svid(chain, BUNDLE, now=FIXTURE_NOW)


def test_path_length_constraint_is_enforced(ca: Ca, workload_id: SpiffeId) -> None:
    """A root with pathLenConstraint=0 may not sign an intermediate that signs leaves."""
    start, end = NOW - timedelta(days=1), NOW + timedelta(days=30)
    root_key = generate_private_key()
    from credo import ca_certificate_template

    builder = ca_certificate_template(
        ca.trust_domain, root_key.public_key(), not_before=start, not_after=end
    )
    builder._extensions = [  # type: ignore[attr-defined]
        x509.Extension(e.oid, e.critical, x509.BasicConstraints(ca=True, path_length=0))
        if isinstance(e.value, x509.BasicConstraints)
        else e
        for e in builder._extensions  # type: ignore[attr-defined]
    ]
    root = builder.sign(root_key, hashes.SHA256())
    inter_key = generate_private_key()
    inter = ca_certificate_template(
        ca.trust_domain, inter_key.public_key(), not_before=start, not_after=end, issuer=root
    ).sign(root_key, hashes.SHA256())
    leaf = sign_x509_svid(
        workload_id,
        generate_private_key().public_key(),
        ca_cert=inter,
        ca_key=inter_key,
        ttl=timedelta(hours=1),
        now=NOW,
    )
    with pytest.raises(UntrustedChain, match="allows 0 intermediates"):
        verify_x509_svid([leaf, inter], X509Bundle(ca.trust_domain, (root,)), now=NOW)


def test_expired_authority_is_refused(workload_id: SpiffeId) -> None:
    """A leaf signed by a bundle root that has since expired is refused as expired."""
    ca = make_ca()
    leaf = sign_x509_svid(
        workload_id,
        generate_private_key().public_key(),
        ca_cert=ca.root,
        ca_key=ca.root_key,
        ttl=timedelta(days=36500),
        now=NOW,
    )
    later = ca.root.not_valid_after_utc - timedelta(seconds=1)
    verify_x509_svid([leaf], X509Bundle(ca.trust_domain, (ca.root,)), now=later)
    with pytest.raises(X509SvidExpired):
        verify_x509_svid(
            [leaf], X509Bundle(ca.trust_domain, (ca.root,)), now=later + timedelta(seconds=5)
        )


# --- template and signing --------------------------------------------------------------


def test_leaf_template_has_every_field_the_standard_requires(ca: Ca, workload_id: SpiffeId) -> None:
    """The leaf has one URI SAN + DNS SANs, cA=false, critical KU, EKU, SKI, AKI and O=SPIFFE."""
    key = generate_private_key()
    cert = x509_svid_template(
        workload_id,
        key.public_key(),
        issuer=ca.intermediate,
        not_before=NOW,
        not_after=NOW + timedelta(hours=1),
        serial_number=42,
        dns_names=("api.example.org", "api"),
    ).sign(ca.intermediate_key, hashes.SHA256())
    ext = cert.extensions
    san = ext.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [str(workload_id)]
    assert san.get_values_for_type(x509.DNSName) == ["api.example.org", "api"]
    bc = ext.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = ext.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature
    assert not ku.value.key_cert_sign and not ku.value.crl_sign
    eku = ext.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    ski = ext.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    issuer_ski = ca.intermediate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert aki.key_identifier == issuer_ski.value.digest
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "SPIFFE"
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "api.example.org"
    assert cert.issuer == ca.intermediate.subject
    assert cert.serial_number == 42


def test_rsa_leaf_may_have_key_encipherment(ca: Ca, workload_id: SpiffeId) -> None:
    """RSA leaves get keyEncipherment in addition to digitalSignature."""
    key = generate_private_key(KeyType.RSA_2048)
    cert = sign_x509_svid(
        workload_id,
        key.public_key(),
        ca_cert=ca.root,
        ca_key=ca.root_key,
        ttl=timedelta(hours=1),
        now=NOW,
    )
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and ku.key_encipherment
    verify_x509_svid([cert], X509Bundle(ca.trust_domain, (ca.root,)), now=NOW)


def test_leaf_template_refuses_an_id_without_path(ca: Ca) -> None:
    """A leaf for a trust domain's root ID would be invalid, so the template refuses it."""
    from credo import InvalidSpiffeId

    with pytest.raises(InvalidSpiffeId, match="must have a path"):
        x509_svid_template(
            SpiffeId.parse("spiffe://example.org"),
            generate_private_key().public_key(),
            issuer=ca.root,
            not_before=NOW,
            not_after=NOW + timedelta(hours=1),
        )


def test_default_serials_are_random_and_128_bits(ca: Ca, workload_id: SpiffeId) -> None:
    """Two leaves signed back to back get different positive 128-bit serials."""
    key = generate_private_key().public_key()
    serials = {
        sign_x509_svid(
            workload_id, key, ca_cert=ca.root, ca_key=ca.root_key, ttl=timedelta(hours=1)
        ).serial_number
        for _ in range(3)
    }
    assert len(serials) == 3
    assert all(s.bit_length() == 128 for s in serials)


def test_ca_template_is_a_signing_certificate(ca: Ca) -> None:
    """CA certificates have cA=true, critical keyCertSign+cRLSign, and a path-less URI SAN."""
    ext = ca.root.extensions
    assert ext.get_extension_for_class(x509.BasicConstraints).value.ca
    ku = ext.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    assert not ku.value.digital_signature
    san = ext.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://example.org"]
    assert ca.root.issuer == ca.root.subject
    assert ca.intermediate.issuer == ca.root.subject
    assert ca.intermediate.subject != ca.root.subject


def test_sign_backdates_not_before_by_ten_seconds(ca: Ca, workload_id: SpiffeId) -> None:
    """NotBefore is now-10s and NotAfter now+ttl when the CA outlives the SVID."""
    cert = sign_x509_svid(
        workload_id,
        generate_private_key().public_key(),
        ca_cert=ca.intermediate,
        ca_key=ca.intermediate_key,
        ttl=timedelta(hours=1),
        now=NOW,
    )
    assert cert.not_valid_before_utc == NOW - timedelta(seconds=10)
    assert cert.not_valid_after_utc == NOW + timedelta(hours=1)


def test_sign_caps_not_after_at_the_ca_expiry(ca: Ca, workload_id: SpiffeId) -> None:
    """NotAfter never passes the signing CA's NotAfter."""
    cert = sign_x509_svid(
        workload_id,
        generate_private_key().public_key(),
        ca_cert=ca.intermediate,
        ca_key=ca.intermediate_key,
        ttl=timedelta(days=100000),
        now=NOW,
    )
    assert cert.not_valid_after_utc == ca.intermediate.not_valid_after_utc


@pytest.mark.parametrize(
    ("key_type", "hash_name"),
    [
        pytest.param(KeyType.EC_P256, "sha256", id="p256-sha256"),
        pytest.param(KeyType.EC_P384, "sha384", id="p384-sha384"),
        pytest.param(KeyType.RSA_2048, "sha256", id="rsa-sha256"),
    ],
)
def test_signature_hash_follows_the_ca_key(
    key_type: KeyType, hash_name: str, workload_id: SpiffeId
) -> None:
    """P-384 CAs sign with SHA-384; P-256 and RSA CAs with SHA-256."""
    ca = make_ca(key_type=key_type)
    cert = sign_x509_svid(
        workload_id,
        generate_private_key().public_key(),
        ca_cert=ca.root,
        ca_key=ca.root_key,
        ttl=timedelta(hours=1),
        now=NOW,
    )
    assert cert.signature_hash_algorithm is not None
    assert cert.signature_hash_algorithm.name == hash_name
    verify_x509_svid([cert], X509Bundle(ca.trust_domain, (ca.root,)), now=NOW)


# --- X509Svid parse / marshal ----------------------------------------------------------


@pytest.fixture
def svid(ca: Ca, workload_id: SpiffeId) -> X509Svid:
    """An X509Svid issued by the intermediate, chain leaf + intermediate."""
    key = generate_private_key()
    leaf = sign_x509_svid(
        workload_id,
        key.public_key(),
        ca_cert=ca.intermediate,
        ca_key=ca.intermediate_key,
        ttl=timedelta(hours=1),
        now=NOW,
    )
    return X509Svid(workload_id, (leaf, ca.intermediate), key)


@pytest.mark.parametrize("encoding", ["der", "pem"])
def test_parse_round_trips_marshal(svid: X509Svid, encoding: str) -> None:
    """parse(marshal_chain_*, marshal_key_*) gives back an equal SVID, DER or PEM."""
    if encoding == "der":
        chain, key = svid.marshal_chain_der(), svid.marshal_key_der()
    else:
        chain, key = svid.marshal_chain_pem(), svid.marshal_key_pem()
    parsed = X509Svid.parse(chain, key)
    assert parsed.spiffe_id == svid.spiffe_id
    assert parsed.cert_chain == svid.cert_chain
    assert parsed.marshal_key_der() == svid.marshal_key_der()
    assert parsed.leaf == svid.cert_chain[0]
    assert parsed.expires_at == NOW + timedelta(hours=1)
    assert parsed.expires_at.tzinfo is not None
    assert parsed.hint == ""


def test_parse_fixture_with_its_key() -> None:
    """The committed good fixture and its PKCS#8 PEM key parse as an X509Svid."""
    parsed = X509Svid.parse(
        (X509_FIXTURES / "good-leaf-and-intermediate.pem").read_bytes(),
        (X509_FIXTURES / "good-leaf-and-intermediate.key.pem").read_bytes(),
    )
    assert str(parsed.spiffe_id) == "spiffe://example.org/workload"
    assert len(parsed.cert_chain) == 2


def test_parse_refuses_a_key_that_does_not_match_the_leaf(svid: X509Svid) -> None:
    """A private key for another public key raises InvalidX509Svid."""
    other = private_key_to_pkcs8_der(generate_private_key())
    with pytest.raises(InvalidX509Svid, match="does not match"):
        X509Svid.parse(svid.marshal_chain_der(), other)


@pytest.mark.parametrize(
    ("chain", "key", "reason"),
    [
        pytest.param(b"", b"", "empty", id="empty-chain"),
        pytest.param(b"\x30\x03\x02\x01", b"", "DER", id="truncated-der"),
        pytest.param(b"-----BEGIN CERTIFICATE-----\nzz\n", b"", "PEM", id="broken-pem"),
        pytest.param(b"not a cert", b"", "DER", id="garbage"),
    ],
)
def test_parse_refuses_malformed_chains(chain: bytes, key: bytes, reason: str) -> None:
    """Unparsable chains raise InvalidX509Svid, never a bare ValueError from cryptography."""
    with pytest.raises(InvalidX509Svid) as info:
        X509Svid.parse(chain, key)
    assert reason in info.value.reason


def test_parse_refuses_malformed_keys(svid: X509Svid) -> None:
    """An unparsable private key raises InvalidX509Svid."""
    with pytest.raises(InvalidX509Svid, match="private key"):
        X509Svid.parse(svid.marshal_chain_der(), b"junk")


@pytest.mark.parametrize(
    ("name", "error"),
    [
        pytest.param("wrong-leaf-is-ca.pem", LeafIsCa, id="leaf-is-ca"),
        pytest.param("wrong-two-uri-sans.pem", MultipleUriSans, id="two-uri-sans"),
        pytest.param("wrong-intermediate-no-ca.pem", SigningCertNotCa, id="intermediate-no-ca"),
    ],
)
def test_parse_checks_leaf_and_signing_cert_shape(name: str, error: type[Exception]) -> None:
    """parse applies the same shape rules as verification (the key check comes after)."""
    with pytest.raises(error):
        X509Svid.parse(
            (X509_FIXTURES / name).read_bytes(), private_key_to_pkcs8_pem(generate_private_key())
        )


def test_x509svid_repr_hides_the_private_key(svid: X509Svid) -> None:
    """repr() never shows the private key."""
    assert "private_key" not in repr(svid)


def test_signing_a_non_ec_or_rsa_key_is_refused(ca: Ca, workload_id: SpiffeId) -> None:
    """Only EC and RSA public keys can be certified."""
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from credo import InvalidKey

    with pytest.raises(InvalidKey, match="expected an EC or RSA"):
        sign_x509_svid(
            workload_id,
            ed25519.Ed25519PrivateKey.generate().public_key(),  # type: ignore[arg-type]
            ca_cert=ca.root,
            ca_key=ca.root_key,
            ttl=timedelta(hours=1),
        )


def test_unused_import_guard() -> None:
    """The trust-domain type used by bundles is the credo one."""
    assert BUNDLE.trust_domain == TrustDomain("example.org")
    assert isinstance(generate_private_key(), ec.EllipticCurvePrivateKey)
