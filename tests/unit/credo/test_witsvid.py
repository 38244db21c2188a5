"""WIT-SVIDs (SPIFFE WIT-SVID standard) and Workload Proof Tokens (draft-ietf-wimse-wpt)."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import UTC, datetime, timedelta

import jwt as pyjwt
import pytest
from joserfc import jws as jose_jws
from joserfc.jwk import ECKey

from credo import (
    Bundle,
    BundleSet,
    InvalidWorkloadProof,
    SpiffeId,
    WitBundle,
    WitSvid,
    create_wpt,
    generate_private_key,
    sign_wit_svid,
    verify_request,
    verify_wpt,
)
from credo.errors import InvalidWitSvid, UntrustedWitSvid, WitSvidExpired
from credo.witsvid import private_key_from_jwk, private_key_to_jwk, token_hash
from credo.wpt import WIT_HEADER, WPT_HEADER

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
ID = SpiffeId.parse("spiffe://example.org/agent/a")
AUD = "https://b.example.org/api"


@pytest.fixture(scope="module")
def issuer_key():  # type: ignore[no-untyped-def]
    return generate_private_key()


@pytest.fixture(scope="module")
def workload_key():  # type: ignore[no-untyped-def]
    return generate_private_key()


@pytest.fixture
def wit(issuer_key, workload_key) -> str:  # type: ignore[no-untyped-def]
    return sign_wit_svid(ID, workload_key.public_key(), key=issuer_key, key_id="kid-1", now=NOW)


@pytest.fixture
def bundle(issuer_key) -> WitBundle:  # type: ignore[no-untyped-def]
    return WitBundle("example.org", {"kid-1": issuer_key.public_key()})


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _forge(header: dict[str, object], claims: dict[str, object], key) -> str:  # type: ignore[no-untyped-def]
    payload = json.dumps(claims).encode()
    return jose_jws.serialize_compact(header, payload, ECKey.import_key(key))  # type: ignore[arg-type]


def test_wit_header_and_claims_checked_by_pyjwt(wit, issuer_key, workload_key) -> None:  # type: ignore[no-untyped-def]
    """PyJWT verifies the signature and sees typ wit+jwt, kid, sub, exp, cnf.jwk and no aud."""
    header = pyjwt.get_unverified_header(wit)
    assert header == {"alg": "ES256", "typ": "wit+jwt", "kid": "kid-1"}
    claims = pyjwt.decode(
        wit,
        issuer_key.public_key(),
        algorithms=["ES256"],
        options={"verify_exp": False, "verify_nbf": False, "verify_iat": False},
    )
    assert claims["sub"] == str(ID)
    assert "aud" not in claims
    assert claims["exp"] - claims["iat"] == 3600
    assert claims["nbf"] < claims["iat"]
    assert isinstance(claims["jti"], str) and len(claims["jti"]) >= 16
    cnf_key = pyjwt.PyJWK(claims["cnf"]["jwk"])
    assert claims["cnf"]["jwk"]["alg"] == "ES256"
    assert cnf_key.key.public_numbers() == workload_key.public_key().public_numbers()


def test_parse_and_validate_accepts_a_good_wit(wit, bundle) -> None:  # type: ignore[no-untyped-def]
    """A WIT signed by a key of the WIT bundle validates; sub and the cnf key come back."""
    parsed = WitSvid.parse_and_validate(wit, bundle, now=NOW)
    assert parsed.spiffe_id == ID
    assert parsed.key_id == "kid-1"
    assert parsed.wth == token_hash(wit)
    assert parsed.expires_at == NOW + timedelta(hours=1)


def test_bundle_set_and_spiffe_bundle_carry_wit_keys(wit, issuer_key) -> None:  # type: ignore[no-untyped-def]
    """A SPIFFE bundle publishes WIT keys with use wit-svid; a JWT bundle never sees them."""
    spiffe = Bundle("example.org", wit_authorities={"kid-1": issuer_key.public_key()})
    doc = json.loads(spiffe.marshal())
    assert doc["keys"][0]["use"] == "wit-svid" and doc["keys"][0]["kid"] == "kid-1"
    parsed = Bundle.parse("example.org", spiffe.marshal())
    assert dict(parsed.wit_authorities) == {"kid-1": issuer_key.public_key()}
    assert not parsed.jwt_authorities
    WitSvid.parse_and_validate(wit, BundleSet([parsed]), now=NOW)


def test_wit_signed_by_a_jwt_key_is_untrusted(wit, issuer_key) -> None:  # type: ignore[no-untyped-def]
    """A key published for JWT-SVIDs does not validate WIT-SVIDs (use keeps them apart)."""
    jwt_only = Bundle("example.org", jwt_authorities={"kid-1": issuer_key.public_key()})
    with pytest.raises(UntrustedWitSvid, match="no WIT-SVID key"):
        WitSvid.parse_and_validate(wit, BundleSet([jwt_only]), now=NOW)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"typ": "JWT"}, InvalidWitSvid, "typ"),
        ({"kid": None}, InvalidWitSvid, "kid"),
        ({"sub": "https://example.org/a"}, InvalidWitSvid, "sub"),
        ({"exp": None}, InvalidWitSvid, "exp"),
        ({"cnf": None}, InvalidWitSvid, "cnf"),
        ({"cnf.alg": "HS256"}, InvalidWitSvid, "cnf.jwk.alg"),
        ({"cnf.alg": "ES384"}, InvalidWitSvid, "does not fit"),
        ({"kid": "other"}, UntrustedWitSvid, "no WIT-SVID key"),
        ({"sub": "spiffe://other.org/a"}, UntrustedWitSvid, "no WIT bundle"),
    ],
)
def test_malformed_or_untrusted_wits_are_refused(  # type: ignore[no-untyped-def]
    issuer_key, workload_key, bundle, change, error, match
) -> None:
    """Each broken rule of the standard is refused with its own error."""
    header: dict[str, object] = {"alg": "ES256", "typ": "wit+jwt", "kid": "kid-1"}
    jwk = {
        **ECKey.import_key(workload_key.public_key()).as_dict(private=False),
        "alg": "ES256",
    }
    claims: dict[str, object] = {
        "sub": str(ID),
        "exp": int((NOW + timedelta(minutes=5)).timestamp()),
        "cnf": {"jwk": jwk},
    }
    for name, value in change.items():
        if name == "cnf.alg":
            jwk["alg"] = value
        elif name in header:
            header.pop(name) if value is None else header.__setitem__(name, value)
        else:
            claims.pop(name) if value is None else claims.__setitem__(name, value)
    with pytest.raises(error, match=match):
        WitSvid.parse_and_validate(_forge(header, claims, issuer_key), bundle, now=NOW)


def test_expired_and_tampered_wits_are_refused(wit, bundle) -> None:  # type: ignore[no-untyped-def]
    """An expired WIT and one whose payload was changed are refused."""
    with pytest.raises(WitSvidExpired):
        WitSvid.parse_and_validate(wit, bundle, now=NOW + timedelta(hours=2))
    head, payload, sig = wit.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["sub"] = "spiffe://example.org/admin"
    tampered = f"{head}.{_b64(json.dumps(claims).encode())}.{sig}"
    with pytest.raises(UntrustedWitSvid, match="signature"):
        WitSvid.parse_and_validate(tampered, bundle, now=NOW)


def test_private_key_jwk_round_trip(workload_key) -> None:  # type: ignore[no-untyped-def]
    """The Workload API's wit_svid_key JWK loads back to the same key and names its alg."""
    text = private_key_to_jwk(workload_key)
    assert json.loads(text)["alg"] == "ES256"
    assert private_key_from_jwk(text).private_numbers() == workload_key.private_numbers()
    with pytest.raises(ValueError, match="'d'"):
        private_key_from_jwk(json.dumps({"kty": "EC"}))


# --- Workload Proof Tokens -----------------------------------------------------------------


def test_wpt_fields_checked_by_pyjwt(wit, workload_key) -> None:  # type: ignore[no-untyped-def]
    """The proof is a wpt+jwt signed with the cnf key: aud, exp, jti, wth and ath are set."""
    proof = create_wpt(wit, workload_key, AUD, access_token="at-123", now=NOW)
    assert pyjwt.get_unverified_header(proof) == {"alg": "ES256", "typ": "wpt+jwt"}
    claims = pyjwt.decode(
        proof,
        workload_key.public_key(),
        algorithms=["ES256"],
        audience=AUD,
        options={"verify_exp": False, "verify_iat": False},
    )
    sha = hashlib.sha256
    assert claims["wth"] == _b64(sha(wit.encode()).digest())
    assert claims["ath"] == _b64(sha(b"at-123").digest())
    assert claims["exp"] - claims["iat"] == 30
    assert claims["jti"]


def test_verify_wpt_accepts_the_right_proof(wit, bundle, workload_key) -> None:  # type: ignore[no-untyped-def]
    """A proof bound to the WIT, for this audience and unexpired, is accepted."""
    parsed = WitSvid.parse_and_validate(wit, bundle, now=NOW)
    proof = create_wpt(parsed, workload_key, AUD, txn_token="txn", now=NOW)
    result = verify_wpt(proof, parsed, AUD, txn_token="txn", now=NOW)
    assert result.spiffe_id == str(ID)
    assert result.jti == json.loads(base64.urlsafe_b64decode(proof.split(".")[1] + "=="))["jti"]


def test_verify_request_reads_the_two_headers(wit, bundle, workload_key) -> None:  # type: ignore[no-untyped-def]
    """verify_request authenticates the Workload-Identity-Token / -Proof-Token headers."""
    proof = create_wpt(wit, workload_key, AUD, now=NOW)
    headers = {WIT_HEADER.lower(): wit, WPT_HEADER: proof}
    assert verify_request(headers, AUD, bundle, now=NOW).spiffe_id == str(ID)
    with pytest.raises(InvalidWorkloadProof, match="no Workload-Proof-Token"):
        verify_request({WIT_HEADER: wit}, AUD, bundle, now=NOW)


def test_proof_with_wrong_wth_aud_exp_or_key_is_refused(  # type: ignore[no-untyped-def]
    wit, bundle, issuer_key, workload_key
) -> None:
    """A proof for another WIT, another audience, expired, or signed by another key fails."""
    parsed = WitSvid.parse_and_validate(wit, bundle, now=NOW)
    other_wit = sign_wit_svid(
        ID, workload_key.public_key(), key=issuer_key, key_id="kid-1", now=NOW
    )
    wrong_wth = create_wpt(other_wit, workload_key, AUD, now=NOW)
    with pytest.raises(InvalidWorkloadProof, match="wth"):
        verify_wpt(wrong_wth, parsed, AUD, now=NOW)
    proof = create_wpt(parsed, workload_key, AUD, now=NOW)
    with pytest.raises(InvalidWorkloadProof, match="aud"):
        verify_wpt(proof, parsed, "https://c.example.org/", now=NOW)
    with pytest.raises(InvalidWorkloadProof, match="expired"):
        verify_wpt(proof, parsed, AUD, now=NOW + timedelta(minutes=2))
    stolen = generate_private_key()
    header = {"alg": "ES256", "typ": "wpt+jwt"}
    claims = {"aud": AUD, "exp": int(NOW.timestamp()) + 30, "jti": "x", "wth": parsed.wth}
    with pytest.raises(InvalidWorkloadProof, match="signature"):
        verify_wpt(_forge(header, claims, stolen), parsed, AUD, now=NOW)
    with pytest.raises(ValueError, match="cnf"):
        create_wpt(parsed, stolen, AUD, now=NOW)


def test_proof_must_match_the_tokens_that_travel_with_it(wit, bundle, workload_key) -> None:  # type: ignore[no-untyped-def]
    """ath/tth/oth are required when their token travels with the request and must match."""
    parsed = WitSvid.parse_and_validate(wit, bundle, now=NOW)
    bare = create_wpt(parsed, workload_key, AUD, now=NOW)
    with pytest.raises(InvalidWorkloadProof, match="'ath' is missing"):
        verify_wpt(bare, parsed, AUD, access_token="at", now=NOW)
    with_ath = create_wpt(parsed, workload_key, AUD, access_token="at", now=NOW)
    with pytest.raises(InvalidWorkloadProof, match="'ath' does not match"):
        verify_wpt(with_ath, parsed, AUD, access_token="another", now=NOW)
    with_oth = create_wpt(parsed, workload_key, AUD, other_tokens={"x-t": "tok"}, now=NOW)
    verify_wpt(with_oth, parsed, AUD, other_tokens={"x-t": "tok"}, now=NOW)
    with pytest.raises(InvalidWorkloadProof, match="oth"):
        verify_wpt(with_oth, parsed, AUD, now=NOW)
