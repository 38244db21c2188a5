"""credo.revocation: the signed JWT revocation list, and ``revoked=`` in JWT-SVID validation."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from credo import JwtBundle, JwtSvid, SpiffeId, generate_private_key, sign_jwt_svid
from credo.errors import (
    InvalidJwtSvid,
    JwtAudienceMismatch,
    JwtSvidRevoked,
    UnknownJwtKey,
    UntrustedJwtSvid,
)
from credo.revocation import REVOCATION_LIST_AUDIENCE, JwtRevocationList

NOW = datetime(2027, 6, 1, 12, 0, tzinfo=UTC)
KEY = generate_private_key()
BUNDLE = JwtBundle("example.org", {"k1": KEY.public_key()})
TD_ID = SpiffeId.parse("spiffe://example.org")
SUB = SpiffeId.parse("spiffe://example.org/agent")


def _token(jti: str) -> str:
    return sign_jwt_svid(SUB, ["svc"], key=KEY, key_id="k1", now=NOW, jwt_id=jti)


def _list(revoked: list[str], sub: SpiffeId = TD_ID, **kw: object) -> str:
    return sign_jwt_svid(
        sub,
        [str(kw.get("aud", REVOCATION_LIST_AUDIENCE))],
        key=kw.get("key", KEY),  # type: ignore[arg-type]
        key_id=str(kw.get("kid", "k1")),
        now=NOW,
        ttl=timedelta(seconds=60),
        extra_claims={"revoked": [{"jti": j, "exp": 2_000_000_000} for j in revoked]},
    )


def test_validation_refuses_a_jti_in_the_revoked_container() -> None:
    """parse_and_validate raises JwtSvidRevoked for a revoked jti and accepts the others."""
    with pytest.raises(JwtSvidRevoked, match="revoked"):
        JwtSvid.parse_and_validate(_token("bad"), BUNDLE, ["svc"], now=NOW, revoked={"bad"})
    ok = JwtSvid.parse_and_validate(_token("good"), BUNDLE, ["svc"], now=NOW, revoked={"bad"})
    assert ok.jwt_id == "good"


def test_a_signed_list_verifies_and_is_a_revocation_source() -> None:
    """A list signed with the trust domain's JWT key parses into the revoked jtis."""
    revoked = JwtRevocationList.parse(_list(["bad", "worse"]), BUNDLE, now=NOW)
    assert revoked.revoked == {"bad", "worse"} and "bad" in revoked
    assert revoked.trust_domain == "example.org"
    assert revoked.expires_at == NOW + timedelta(seconds=60)
    with pytest.raises(JwtSvidRevoked):
        JwtSvid.parse_and_validate(_token("worse"), BUNDLE, ["svc"], now=NOW, revoked=revoked)


@pytest.mark.parametrize(
    ("token", "error"),
    [
        (_list(["x"], key=generate_private_key()), UntrustedJwtSvid),
        (_list(["x"], kid="other"), UnknownJwtKey),
        (_list(["x"], aud="svc"), JwtAudienceMismatch),
        (_list(["x"], sub=SUB), InvalidJwtSvid),
    ],
    ids=["wrong-key", "unknown-kid", "wrong-audience", "signed-for-a-workload"],
)
def test_a_list_that_does_not_verify_is_refused(token: str, error: type[Exception]) -> None:
    """Only a list signed by the trust domain's JWT key, for the list audience and the
    trust domain's own ID, is accepted."""
    with pytest.raises(error):
        JwtRevocationList.parse(token, BUNDLE, now=NOW)
