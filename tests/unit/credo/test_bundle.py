"""X.509, JWT and SPIFFE bundles: parsing, marshalling, and refusing malformed input."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from credo_testkit import Ca, make_ca

from credo import (
    Bundle,
    BundleError,
    BundleSet,
    JwtBundle,
    KeyType,
    TrustDomain,
    X509Bundle,
    generate_private_key,
)

TD = TrustDomain("example.org")


def test_x509_bundle_round_trips_der_and_pem(ca: Ca) -> None:
    """marshal_der/parse_der and marshal_pem/parse_pem give back the same authorities."""
    bundle = X509Bundle(TD, (ca.root, ca.intermediate))
    assert X509Bundle.parse_der(TD, bundle.marshal_der()) == bundle
    assert X509Bundle.parse_pem(TD, bundle.marshal_pem()) == bundle
    assert X509Bundle.parse(TD, bundle.marshal_der()) == bundle
    assert X509Bundle.parse("example.org", bundle.marshal_pem()) == bundle


@pytest.mark.parametrize(
    ("call", "data", "reason"),
    [
        pytest.param("parse", b"", "empty", id="empty"),
        pytest.param("parse", b"\x30\x82\x01", "cannot parse", id="truncated-der"),
        pytest.param("parse", b"hello", "cannot parse", id="garbage"),
        pytest.param("parse_der", b"-----BEGIN CERTIFICATE-----", "PEM", id="pem-to-parse-der"),
        pytest.param("parse_pem", b"\x30\x00", "not PEM", id="der-to-parse-pem"),
        pytest.param(
            "parse",
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            "cannot parse",
            id="pem-with-bad-body",
        ),
    ],
)
def test_x509_bundle_refuses_malformed_bytes(call: str, data: bytes, reason: str) -> None:
    """Malformed X.509 bundles raise BundleError naming the problem."""
    with pytest.raises(BundleError) as info:
        getattr(X509Bundle, call)(TD, data)
    assert reason in info.value.reason


@pytest.mark.parametrize("key_type", [KeyType.EC_P256, KeyType.EC_P384, KeyType.RSA_2048], ids=str)
def test_jwt_bundle_round_trips_jwks(key_type: KeyType) -> None:
    """JwtBundle.marshal emits RFC 7517 JWKS that parse() reads back to the same keys."""
    bundle = JwtBundle(TD, {"a": generate_private_key(key_type).public_key()})
    doc = json.loads(bundle.marshal())
    assert doc["keys"][0]["kid"] == "a"
    assert doc["keys"][0]["kty"] in ("EC", "RSA")
    assert JwtBundle.parse(TD, bundle.marshal()) == bundle


def test_jwt_bundle_skips_x509_entries_of_a_spiffe_bundle(ca: Ca) -> None:
    """JwtBundle.parse reads the jwt-svid keys of a full SPIFFE bundle and skips x509-svid ones."""
    key = generate_private_key().public_key()
    spiffe = Bundle(TD, (ca.root,), {"j": key})
    assert JwtBundle.parse(TD, spiffe.marshal()).keys == {"j": key}


def test_spiffe_bundle_document_follows_the_standard(ca: Ca) -> None:
    """x509-svid entries carry one x5c and no kid; jwt-svid entries carry a kid; top-level hints."""
    key = generate_private_key().public_key()
    bundle = Bundle(TD, (ca.root,), {"kid-1": key}, sequence_number=7, refresh_hint=300)
    doc = json.loads(bundle.marshal())
    x509_entry, jwt_entry = doc["keys"]
    assert x509_entry["use"] == "x509-svid"
    assert "kid" not in x509_entry
    assert len(x509_entry["x5c"]) == 1
    assert base64.b64decode(x509_entry["x5c"][0]) == bundle.x509_bundle().marshal_der()
    assert x509_entry["kty"] == "EC"
    assert jwt_entry["use"] == "jwt-svid"
    assert jwt_entry["kid"] == "kid-1"
    assert doc["spiffe_sequence"] == 7
    assert doc["spiffe_refresh_hint"] == 300


def test_spiffe_bundle_round_trips(ca: Ca) -> None:
    """Bundle.parse(marshal()) gives back an equal bundle, and the parts match."""
    key = generate_private_key(KeyType.RSA_2048).public_key()
    bundle = Bundle(TD, (ca.root, ca.intermediate), {"k": key}, 3, 60)
    parsed = Bundle.parse(TD, bundle.marshal())
    assert parsed == bundle
    assert parsed.x509_bundle() == X509Bundle(TD, (ca.root, ca.intermediate))
    assert parsed.jwt_bundle() == JwtBundle(TD, {"k": key})
    assert parsed.marshal_pem() == parsed.x509_bundle().marshal_pem()


def test_spiffe_bundle_without_refresh_hint_omits_it() -> None:
    """refresh_hint=None leaves spiffe_refresh_hint out, and parse gives None back."""
    bundle = Bundle(TD)
    doc = json.loads(bundle.marshal())
    assert "spiffe_refresh_hint" not in doc
    assert Bundle.parse(TD, bundle.marshal()).refresh_hint is None


def test_spiffe_bundle_ignores_unknown_use_and_x509_entry_without_x5c() -> None:
    """Unknown-use entries and x509-svid entries without x5c are ignored (X509-SVID 6.2)."""
    doc = {"keys": [{"use": "wit-svid", "kty": "EC"}, {"use": "x509-svid", "kty": "EC"}]}
    assert Bundle.parse(TD, json.dumps(doc).encode()) == Bundle(TD)


def _x509_entry(ca: Ca) -> dict[str, Any]:
    return json.loads(Bundle(TD, (ca.root,)).marshal())["keys"][0]


def _jwt_entry() -> dict[str, Any]:
    return json.loads(
        Bundle(TD, jwt_authorities={"k": generate_private_key().public_key()}).marshal()
    )["keys"][0]


CA = make_ca()

MALFORMED_SPIFFE_BUNDLES = [
    pytest.param(b"", "not valid JSON", id="empty"),
    pytest.param(b"{", "not valid JSON", id="truncated-json"),
    pytest.param(b"\xff\xfe", "not valid JSON", id="not-utf8"),
    pytest.param(b"[]", "JSON object", id="array-not-object"),
    pytest.param(b"{}", "no 'keys'", id="no-keys"),
    pytest.param(b'{"keys": {}}', "array", id="keys-not-array"),
    pytest.param(b'{"keys": [1]}', "JSON object", id="key-entry-not-object"),
    pytest.param({"keys": [{**_jwt_entry(), "kid": None}]}, "no 'kid'", id="jwt-entry-without-kid"),
    pytest.param({"keys": [_jwt_entry(), _jwt_entry()]}, "repeats kid", id="duplicate-kid"),
    pytest.param({"keys": [{**_jwt_entry(), "x": "AAAA"}]}, "32 bytes", id="short-ec-coordinate"),
    pytest.param(
        {"keys": [{**_jwt_entry(), "y": _jwt_entry()["x"]}]}, "not on curve", id="point-off-curve"
    ),
    pytest.param({"keys": [{**_jwt_entry(), "x": "!!"}]}, "base64url", id="bad-base64url"),
    pytest.param({"keys": [{**_x509_entry(CA), "x5c": ["%%%"]}]}, "x5c", id="x5c-not-base64"),
    pytest.param(
        {"keys": [{**_x509_entry(CA), "x5c": ["AAAA"]}]}, "x5c", id="x5c-not-a-certificate"
    ),
    pytest.param({"keys": [{**_x509_entry(CA), "x5c": "AAAA"}]}, "x5c", id="x5c-not-array"),
    pytest.param({"keys": [], "spiffe_sequence": -1}, "spiffe_sequence", id="negative-sequence"),
    pytest.param({"keys": [], "spiffe_sequence": True}, "spiffe_sequence", id="boolean-sequence"),
    pytest.param(
        {"keys": [], "spiffe_refresh_hint": "1h"}, "refresh_hint", id="string-refresh-hint"
    ),
]


@pytest.mark.parametrize(("data", "reason"), MALFORMED_SPIFFE_BUNDLES)
def test_spiffe_bundle_refuses_malformed_documents(
    data: bytes | dict[str, Any], reason: str
) -> None:
    """Malformed SPIFFE bundles raise BundleError naming the problem, never a raw error."""
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    with pytest.raises(BundleError) as info:
        Bundle.parse(TD, raw)
    assert reason in info.value.reason
    assert isinstance(info.value, ValueError)


ED25519_JWK = {
    "kty": "OKP",
    "crv": "Ed25519",
    "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo",
    "kid": "ed",
}


@pytest.mark.parametrize(
    "ignored",
    [
        pytest.param({"kty": "EC", "kid": "x"}, id="no-use"),
        pytest.param({**_jwt_entry(), "use": None, "kid": "nouse"}, id="use-null"),
        pytest.param({**ED25519_JWK, "use": "jwt-svid"}, id="okp-ed25519-jwt"),
        pytest.param({**ED25519_JWK, "use": "x509-svid", "x5c": []}, id="okp-ed25519-x509"),
        pytest.param({**_jwt_entry(), "kty": "oct", "k": "AAAA", "kid": "sym"}, id="symmetric"),
        pytest.param({**_jwt_entry(), "crv": "P-999", "kid": "curve"}, id="unknown-curve"),
        pytest.param({**_jwt_entry(), "use": "wit-svid", "kid": "wit"}, id="other-use"),
    ],
)
def test_spiffe_bundle_ignores_keys_it_does_not_know(ca: Ca, ignored: dict[str, Any]) -> None:
    """A key with no use, an unknown use or an unknown key type is skipped (SPIFFE bundle
    4.2.1, 4.2.2); the bundle's other keys still load."""
    good = json.loads(
        Bundle(TD, (ca.root,), {"k": generate_private_key().public_key()}, 3).marshal()
    )
    good["keys"].insert(1, ignored)
    parsed = Bundle.parse(TD, json.dumps(good).encode())
    assert parsed.x509_authorities == (ca.root,)
    assert list(parsed.jwt_authorities) == ["k"]
    assert parsed.sequence_number == 3


def test_jwt_bundle_skips_unknown_key_types_and_non_signing_uses() -> None:
    """A plain JWKS (RFC 7517) with an Ed25519 key, an encryption key and unknown members
    still yields its usable signing keys; ``use: sig`` keys count."""
    sig = {**_jwt_entry(), "use": "sig", "kid": "sig", "x-extra": {"a": 1}}
    enc = {**_jwt_entry(), "use": "enc", "kid": "enc"}
    doc = {"keys": [ED25519_JWK, sig, enc], "unknown-member": True}
    assert list(JwtBundle.parse(TD, json.dumps(doc).encode()).keys) == ["sig"]


def test_empty_key_set_is_a_valid_bundle() -> None:
    """A trust domain whose keys were all revoked publishes ``keys: []``: a valid bundle."""
    parsed = Bundle.parse(TD, b'{"keys": [], "spiffe_sequence": 7}')
    assert parsed == Bundle(TD, sequence_number=7)
    assert JwtBundle.parse(TD, b'{"keys": []}') == JwtBundle(TD)


def test_empty_der_is_an_x509_bundle_without_authorities() -> None:
    """Workload API bundle fields may be empty for a trust domain with JWT authorities
    only: ``parse_der`` gives an empty X.509 bundle instead of failing."""
    assert X509Bundle.parse_der(TD, b"") == X509Bundle(TD, ())


def test_jwt_bundle_refuses_missing_kid() -> None:
    """A JWKS key without a kid cannot be a JWT authority."""
    entry = {k: v for k, v in _jwt_entry().items() if k not in ("kid", "use")}
    with pytest.raises(BundleError, match="kid"):
        JwtBundle.parse(TD, json.dumps({"keys": [entry]}).encode())


def test_bundle_rejects_a_bad_trust_domain() -> None:
    """A malformed trust domain name given as text raises BundleError."""
    with pytest.raises(BundleError, match="trust domain"):
        Bundle.parse("Bad Domain", b'{"keys": []}')


def test_bundle_set_looks_up_by_trust_domain(ca: Ca) -> None:
    """BundleSet maps trust domains to bundles and hands out their X.509 and JWT parts."""
    other = make_ca("other.org")
    bundles = BundleSet([ca.bundle()])
    bundles.add(other.bundle(sequence_number=2))
    assert len(bundles) == 2
    assert list(bundles) == [TrustDomain("example.org"), TrustDomain("other.org")]
    assert bundles[TrustDomain("other.org")].sequence_number == 2
    x509_bundle = bundles.get_x509_bundle_for_trust_domain(TrustDomain("other.org"))
    assert x509_bundle is not None and x509_bundle.authorities == (other.root,)
    jwt_bundle = bundles.get_jwt_bundle_for_trust_domain(TD)
    assert jwt_bundle is not None and jwt_bundle.keys == {}
    assert bundles.get_x509_bundle_for_trust_domain(TrustDomain("nope.org")) is None
    assert bundles.get_jwt_bundle_for_trust_domain(TrustDomain("nope.org")) is None
    bundles.add(ca.bundle(sequence_number=9))
    assert bundles[TD].sequence_number == 9
    bundles.remove(TD)
    assert TD not in bundles
