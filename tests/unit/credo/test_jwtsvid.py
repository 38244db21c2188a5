"""JWT-SVID signing and validation, per the SPIFFE JWT-SVID standard."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from credo import (
    Bundle,
    BundleSet,
    JwtBundle,
    JwtSvid,
    JwtSvidError,
    KeyType,
    SpiffeId,
    generate_private_key,
    sign_jwt_svid,
)
from credo.errors import (
    InvalidJwtSvid,
    JwtAudienceMismatch,
    JwtIssuerMismatch,
    JwtSvidExpired,
    UnknownJwtKey,
    UnsupportedJwtAlgorithm,
    UntrustedJwtSvid,
)

NOW = datetime(2027, 6, 1, 12, 0, tzinfo=UTC)
SUB = SpiffeId.parse("spiffe://example.org/agent")
KEY = generate_private_key()
BUNDLE = JwtBundle("example.org", {"k1": KEY.public_key()})


def _b64(data: dict[str, Any] | bytes) -> str:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _forge(header: dict[str, Any], claims: dict[str, Any], key: Any = KEY) -> str:
    """Sign arbitrary header and claims with PyJWT (to build deliberately bad tokens)."""
    alg = header.pop("alg", "ES256")
    return jwt.encode(claims, key, algorithm=alg, headers=header)


def _claims(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "sub": str(SUB),
        "aud": ["svc"],
        "exp": int((NOW + timedelta(minutes=5)).timestamp()),
        "iat": int(NOW.timestamp()),
    }
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def test_sign_then_validate_round_trips() -> None:
    """A token we sign validates against the bundle and exposes its claims."""
    token = sign_jwt_svid(SUB, ["svc", "other"], key=KEY, key_id="k1", now=NOW)
    svid = JwtSvid.parse_and_validate(token, BUNDLE, ["svc"], now=NOW)
    assert svid.spiffe_id == SUB
    assert svid.audience == ("svc", "other")
    assert svid.key_id == "k1"
    assert svid.algorithm == "ES256"
    assert svid.expires_at == NOW + timedelta(minutes=5)
    assert svid.issued_at == NOW
    assert svid.claims["sub"] == str(SUB)
    assert svid.token == token
    assert token not in repr(svid)


def test_signed_header_and_claims_follow_the_standard() -> None:
    """Header has alg, kid, typ=JWT; claims have sub, aud as a list, exp, iat and a jti."""
    token = sign_jwt_svid(
        SUB,
        ["svc"],
        key=KEY,
        key_id="k1",
        ttl=timedelta(minutes=1),
        now=NOW,
        extra_claims={"x": 1},
    )
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "ES256", "kid": "k1", "typ": "JWT"}
    claims = jwt.decode(token, options={"verify_signature": False})
    jti = claims.pop("jti")
    assert claims == {
        "sub": str(SUB),
        "aud": ["svc"],
        "x": 1,
        "exp": int(NOW.timestamp()) + 60,
        "iat": int(NOW.timestamp()),
    }
    assert isinstance(jti, str) and len(jti) >= 22  # 128 random bits, base64url


def test_every_token_has_its_own_jti() -> None:
    """Two tokens for the same ID, audience and second still differ in jti (revocation by
    jti and replay checks need that)."""
    tokens = [sign_jwt_svid(SUB, ["svc"], key=KEY, key_id="k1", now=NOW) for _ in range(50)]
    ids = {JwtSvid.parse_and_validate(t, BUNDLE, ["svc"], now=NOW).jwt_id for t in tokens}
    assert len(ids) == 50
    assert None not in ids


def test_issuer_is_set_when_given() -> None:
    """With issuer=..., iss is that URL; without, the token has no iss."""
    token = sign_jwt_svid(SUB, ["svc"], key=KEY, key_id="k1", now=NOW, issuer="https://oidc.x")
    assert jwt.decode(token, options={"verify_signature": False})["iss"] == "https://oidc.x"
    assert JwtSvid.parse_and_validate(token, BUNDLE, ["svc"], now=NOW).issuer == "https://oidc.x"
    plain = sign_jwt_svid(SUB, ["svc"], key=KEY, key_id="k1", now=NOW)
    assert "iss" not in jwt.decode(plain, options={"verify_signature": False})
    assert JwtSvid.parse_and_validate(plain, BUNDLE, ["svc"], now=NOW).issuer is None


def test_tokens_with_and_without_iss_validate_unless_an_issuer_is_asked_for() -> None:
    """The JWT-SVID standard makes iss optional: both validate; asking for an issuer
    requires iss to be exactly it."""
    with_iss = sign_jwt_svid(SUB, ["svc"], key=KEY, key_id="k1", now=NOW, issuer="https://a.x")
    without = sign_jwt_svid(SUB, ["svc"], key=KEY, key_id="k1", now=NOW)
    for token in (with_iss, without):
        JwtSvid.parse_and_validate(token, BUNDLE, ["svc"], now=NOW)
        JwtSvid.parse_insecure(token, ["svc"], now=NOW)
    JwtSvid.parse_and_validate(with_iss, BUNDLE, ["svc"], now=NOW, issuer="https://a.x")
    with pytest.raises(JwtIssuerMismatch, match="not the expected"):
        JwtSvid.parse_and_validate(with_iss, BUNDLE, ["svc"], now=NOW, issuer="https://b.x")
    with pytest.raises(JwtIssuerMismatch, match="no 'iss'"):
        JwtSvid.parse_and_validate(without, BUNDLE, ["svc"], now=NOW, issuer="https://a.x")
    with pytest.raises(JwtIssuerMismatch):
        JwtSvid.parse_insecure(without, ["svc"], now=NOW, issuer="https://a.x")


def test_a_non_string_iss_or_jti_is_refused() -> None:
    """iss and jti are strings (RFC 7519 4.1.1, 4.1.7); anything else is a malformed token."""
    for claim in ("iss", "jti"):
        payload = json.dumps(_claims(**{claim: 7})).encode()
        token = jwt.api_jws.PyJWS().encode(payload, KEY, algorithm="ES256", headers={"kid": "k1"})
        with pytest.raises(InvalidJwtSvid, match=claim):
            JwtSvid.parse_and_validate(token, BUNDLE, ["svc"], now=NOW)


@pytest.mark.parametrize(
    ("key_type", "alg"),
    [
        pytest.param(KeyType.EC_P256, "ES256", id="p256"),
        pytest.param(KeyType.EC_P384, "ES384", id="p384"),
        pytest.param(KeyType.RSA_2048, "RS256", id="rsa"),
    ],
)
def test_algorithm_follows_the_key(key_type: KeyType, alg: str) -> None:
    """The signing algorithm is chosen from the key type, and each validates."""
    key = generate_private_key(key_type)
    token = sign_jwt_svid(SUB, ["svc"], key=key, key_id="k", now=NOW)
    bundle = JwtBundle("example.org", {"k": key.public_key()})
    assert JwtSvid.parse_and_validate(token, bundle, ["svc"], now=NOW).algorithm == alg


def test_expires_at_sets_exp_exactly() -> None:
    """expires_at overrides the default TTL."""
    token = sign_jwt_svid(
        SUB, ["svc"], key=KEY, key_id="k1", expires_at=NOW + timedelta(hours=2), now=NOW
    )
    assert JwtSvid.parse_insecure(token, ["svc"], now=NOW).expires_at == NOW + timedelta(hours=2)


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"audience": []}, id="empty-audience"),
        pytest.param({"audience": "svc"}, id="audience-is-a-string"),
        pytest.param({"key_id": ""}, id="empty-kid"),
        pytest.param({"ttl": timedelta(0)}, id="zero-ttl"),
        pytest.param({"extra_claims": {"sub": "x"}}, id="extra-claims-override-sub"),
        pytest.param({"extra_claims": {"jti": "x"}}, id="extra-claims-override-jti"),
        pytest.param({"extra_claims": {"iss": "x"}}, id="extra-claims-override-iss"),
        pytest.param({"issuer": ""}, id="empty-issuer"),
    ],
)
def test_sign_refuses_bad_arguments(kwargs: dict[str, Any]) -> None:
    """Signing refuses arguments that would make an invalid JWT-SVID."""
    args: dict[str, Any] = {"audience": ["svc"], "key_id": "k1"} | kwargs
    audience = args.pop("audience")
    with pytest.raises(ValueError):
        sign_jwt_svid(SUB, audience, key=KEY, now=NOW, **args)


OTHER_KEY = generate_private_key()
P384_KEY = generate_private_key(KeyType.EC_P384)

Token = Callable[[], str]

INVALID_TOKENS: list[Any] = [
    pytest.param(
        lambda: _b64({"alg": "none", "kid": "k1"}) + "." + _b64(_claims()) + ".",
        UnsupportedJwtAlgorithm,
        "not allowed",
        id="alg-none",
    ),
    pytest.param(
        lambda: _forge({"alg": "HS256", "kid": "k1"}, _claims(), key=b"s" * 32),
        UnsupportedJwtAlgorithm,
        "not allowed",
        id="alg-hs256",
    ),
    pytest.param(
        lambda: _b64({"alg": "EdDSA", "kid": "k1"}) + "." + _b64(_claims()) + ".AA",
        UnsupportedJwtAlgorithm,
        "not allowed",
        id="alg-eddsa",
    ),
    pytest.param(
        lambda: _b64({"kid": "k1"}) + "." + _b64(_claims()) + ".AA",
        InvalidJwtSvid,
        "no 'alg'",
        id="alg-missing",
    ),
    pytest.param(lambda: _forge({}, _claims()), InvalidJwtSvid, "no 'kid'", id="kid-missing"),
    pytest.param(
        lambda: _forge({"kid": "k1", "typ": "at+jwt"}, _claims()),
        InvalidJwtSvid,
        "typ",
        id="bad-typ",
    ),
    pytest.param(
        lambda: _forge({"kid": "k1"}, _claims(exp=None)),
        InvalidJwtSvid,
        "'exp' is missing",
        id="exp-missing",
    ),
    pytest.param(
        lambda: _forge({"kid": "k1"}, _claims(exp="tomorrow")),
        InvalidJwtSvid,
        "'exp' must be a number",
        id="exp-not-a-number",
    ),
    pytest.param(
        lambda: _forge({"kid": "k1"}, _claims(exp=int(NOW.timestamp()) - 31)),
        JwtSvidExpired,
        "expired",
        id="expired-beyond-leeway",
    ),
    pytest.param(
        lambda: _forge({"kid": "k1"}, _claims(aud=["elsewhere"])),
        JwtAudienceMismatch,
        "none of",
        id="wrong-audience",
    ),
    pytest.param(
        lambda: _forge({"kid": "k1"}, _claims(aud=None)),
        InvalidJwtSvid,
        "'aud' is missing",
        id="aud-missing",
    ),
    pytest.param(
        lambda: _forge({"kid": "k1"}, _claims(aud=[])),
        InvalidJwtSvid,
        "'aud' is empty",
        id="aud-empty",
    ),
    pytest.param(
        lambda: _forge({"kid": "k1"}, _claims(sub="alice")),
        InvalidJwtSvid,
        "not a SPIFFE ID",
        id="sub-not-spiffe-id",
    ),
    pytest.param(
        lambda: _forge({"kid": "k1"}, _claims(sub=None)),
        InvalidJwtSvid,
        "'sub' is missing",
        id="sub-missing",
    ),
    pytest.param(
        lambda: _forge({"kid": "k2"}, _claims()),
        UnknownJwtKey,
        "k2",
        id="unknown-kid",
    ),
    pytest.param(
        lambda: _forge({"kid": "k1"}, _claims(sub="spiffe://other.org/agent")),
        UntrustedJwtSvid,
        "other.org",
        id="wrong-trust-domain",
    ),
    pytest.param(
        lambda: _forge({"kid": "k1"}, _claims(), key=OTHER_KEY),
        UntrustedJwtSvid,
        "signature does not verify",
        id="signed-by-another-key",
    ),
    pytest.param(
        lambda: _forge({"alg": "ES384", "kid": "k1"}, _claims(), key=P384_KEY),
        UntrustedJwtSvid,
        "curve",
        id="alg-does-not-match-key-curve",
    ),
    pytest.param(
        lambda: _forge(
            {"alg": "RS256", "kid": "k1"}, _claims(), key=generate_private_key(KeyType.RSA_2048)
        ),
        UntrustedJwtSvid,
        "not an RSA key",
        id="rsa-alg-with-ec-key",
    ),
    pytest.param(
        lambda: _forge({"kid": "k1"}, _claims(nbf=int(NOW.timestamp()) + 3600)),
        InvalidJwtSvid,
        "not valid before",
        id="not-yet-valid",
    ),
    pytest.param(lambda: "a.b", InvalidJwtSvid, "3", id="two-parts"),
    pytest.param(lambda: "", InvalidJwtSvid, "empty", id="empty"),
    pytest.param(lambda: "!!.!!.!!", InvalidJwtSvid, "base64url", id="not-base64"),
    pytest.param(
        lambda: _b64(b"[1]") + "." + _b64(_claims()) + ".AA",
        InvalidJwtSvid,
        "JSON object",
        id="header-not-object",
    ),
    pytest.param(
        lambda: _forge({"kid": "k1"}, _claims()).rsplit(".", 1)[0] + ".AAAA",
        UntrustedJwtSvid,
        "signature",
        id="tampered-signature",
    ),
]


@pytest.mark.parametrize(("make", "error", "reason"), INVALID_TOKENS)
def test_invalid_tokens_raise_the_specific_error(
    make: Token, error: type[JwtSvidError], reason: str
) -> None:
    """Each broken JWT-SVID rule raises its own JwtSvidError subclass, with a clear reason."""
    with pytest.raises(error) as info:
        JwtSvid.parse_and_validate(make(), BUNDLE, ["svc", "other"], now=NOW)
    assert reason in info.value.reason


def test_expiry_within_leeway_is_accepted() -> None:
    """A token expired by less than the leeway (30s by default) still validates."""
    token = _forge({"kid": "k1"}, _claims(exp=int(NOW.timestamp()) - 20))
    JwtSvid.parse_and_validate(token, BUNDLE, ["svc"], now=NOW)
    with pytest.raises(JwtSvidExpired):
        JwtSvid.parse_and_validate(token, BUNDLE, ["svc"], now=NOW, leeway=timedelta(0))


@pytest.mark.parametrize("typ", ["JWT", "JOSE"])
def test_typ_jwt_or_jose_is_accepted(typ: str) -> None:
    """The standard allows typ JWT or JOSE."""
    JwtSvid.parse_and_validate(
        _forge({"kid": "k1", "typ": typ}, _claims()), BUNDLE, ["svc"], now=NOW
    )


def test_string_aud_is_accepted() -> None:
    """A single audience may be a string rather than a list."""
    svid = JwtSvid.parse_and_validate(
        _forge({"kid": "k1"}, _claims(aud="svc")), BUNDLE, ["svc"], now=NOW
    )
    assert svid.audience == ("svc",)


def test_bundle_set_selects_the_bundle_by_trust_domain() -> None:
    """With a BundleSet the bundle is chosen by the sub's trust domain."""
    bundles = BundleSet(
        [
            Bundle("other.org", jwt_authorities={"k1": OTHER_KEY.public_key()}),
            Bundle("example.org", jwt_authorities={"k1": KEY.public_key()}),
        ]
    )
    token = sign_jwt_svid(SUB, ["svc"], key=KEY, key_id="k1", now=NOW)
    assert JwtSvid.parse_and_validate(token, bundles, ["svc"], now=NOW).spiffe_id == SUB
    with pytest.raises(UntrustedJwtSvid, match="no JWT bundle"):
        JwtSvid.parse_and_validate(token, BundleSet(), ["svc"], now=NOW)


def test_parse_insecure_skips_the_signature_but_checks_claims() -> None:
    """parse_insecure accepts a token signed by an unknown key but still checks aud and exp."""
    token = _forge({"kid": "zzz"}, _claims(), key=OTHER_KEY)
    assert JwtSvid.parse_insecure(token, ["svc"], now=NOW).spiffe_id == SUB
    with pytest.raises(JwtAudienceMismatch):
        JwtSvid.parse_insecure(token, ["nope"], now=NOW)
    with pytest.raises(JwtSvidExpired):
        JwtSvid.parse_insecure(token, ["svc"], now=NOW + timedelta(hours=1))
    with pytest.raises(UnsupportedJwtAlgorithm):
        JwtSvid.parse_insecure(_forge({"alg": "HS256"}, _claims(), key=b"k" * 32), ["svc"])


def test_validation_refuses_an_empty_expected_audience() -> None:
    """An empty expected-audience list is a caller bug, not a pass-all."""
    token = sign_jwt_svid(SUB, ["svc"], key=KEY, key_id="k1", now=NOW)
    with pytest.raises(ValueError, match="audience is empty"):
        JwtSvid.parse_and_validate(token, BUNDLE, [], now=NOW)


def test_key_is_ec() -> None:
    """The module-level test key is the default P-256 key type."""
    assert isinstance(KEY, ec.EllipticCurvePrivateKey)
