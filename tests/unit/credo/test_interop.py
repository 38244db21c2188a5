"""Interop: py-spiffe and cryptography's X.509 verifier accept what Credo produces."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import spiffe
from credo_testkit import Ca
from cryptography.x509.verification import PolicyBuilder, Store

from credo import (
    Bundle,
    JwtBundle,
    SpiffeId,
    X509Svid,
    generate_private_key,
    sign_jwt_svid,
    sign_x509_svid,
)


@pytest.fixture
def svid(ca: Ca, workload_id: SpiffeId) -> X509Svid:
    """A current X509Svid with chain leaf + intermediate."""
    key = generate_private_key()
    leaf = sign_x509_svid(
        workload_id,
        key.public_key(),
        ca_cert=ca.intermediate,
        ca_key=ca.intermediate_key,
        ttl=timedelta(hours=1),
    )
    return X509Svid(workload_id, (leaf, ca.intermediate), key)


def test_py_spiffe_parses_our_x509_svid_der(svid: X509Svid) -> None:
    """spiffe.X509Svid.parse_raw reads our DER chain and PKCS#8 DER key (the Workload API form)."""
    theirs = spiffe.X509Svid.parse_raw(svid.marshal_chain_der(), svid.marshal_key_der())
    assert str(theirs.spiffe_id) == str(svid.spiffe_id)
    assert list(theirs.cert_chain) == list(svid.cert_chain)


def test_py_spiffe_parses_our_x509_svid_pem(svid: X509Svid) -> None:
    """spiffe.X509Svid.parse reads our PEM chain and PKCS#8 PEM key."""
    theirs = spiffe.X509Svid.parse(svid.marshal_chain_pem(), svid.marshal_key_pem())
    assert str(theirs.spiffe_id) == str(svid.spiffe_id)


def test_py_spiffe_parses_our_x509_bundle(ca: Ca) -> None:
    """spiffe.X509Bundle reads our PEM and DER bundles."""
    bundle = ca.bundle().x509_bundle()
    td = spiffe.TrustDomain("example.org")
    assert spiffe.X509Bundle.parse(td, bundle.marshal_pem()).x509_authorities == {ca.root}
    assert spiffe.X509Bundle.parse_raw(td, bundle.marshal_der()).x509_authorities == {ca.root}


def test_py_spiffe_validates_our_jwt_svid_with_a_bundle_from_our_jwks(ca: Ca) -> None:
    """spiffe.JwtSvid.parse_and_validate accepts our token against a JwtBundle from our JWKS."""
    key = generate_private_key()
    ours = JwtBundle("example.org", {"kid-1": key.public_key()})
    theirs = spiffe.JwtBundle.parse(spiffe.TrustDomain("example.org"), ours.marshal())
    sub = SpiffeId.parse("spiffe://example.org/agent")
    token = sign_jwt_svid(sub, ["svc"], key=key, key_id="kid-1")
    parsed = spiffe.JwtSvid.parse_and_validate(token, theirs, {"svc"})
    assert str(parsed.spiffe_id) == str(sub)
    assert parsed.audience == ["svc"] or set(parsed.audience) == {"svc"}


def test_py_spiffe_reads_jwt_keys_from_our_spiffe_bundle_jwt_part(ca: Ca) -> None:
    """The JWT part of our SPIFFE bundle, marshalled as JWKS, is readable by py-spiffe."""
    key = generate_private_key()
    bundle = Bundle("example.org", (ca.root,), {"k": key.public_key()})
    theirs = spiffe.JwtBundle.parse(
        spiffe.TrustDomain("example.org"), bundle.jwt_bundle().marshal()
    )
    assert set(theirs.jwt_authorities) == {"k"}


def test_cryptography_verifier_accepts_our_leaf_and_intermediate(svid: X509Svid, ca: Ca) -> None:
    """cryptography's RFC 5280 client verifier builds a path from our chain to our bundle."""
    verifier = (
        PolicyBuilder()
        .store(Store(list(ca.bundle().x509_bundle().authorities)))
        .time(datetime.now(UTC))
        .build_client_verifier()
    )
    result = verifier.verify(svid.leaf, list(svid.cert_chain[1:]))
    assert [str(s.value) for s in result.subjects or []] == [str(svid.spiffe_id)]
    assert result.chain[-1] == ca.root
