"""Property tests: parsers round-trip valid input and raise only their own error on junk."""

from __future__ import annotations

import contextlib
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from credo import (
    Bundle,
    BundleError,
    InvalidSpiffeId,
    JwtBundle,
    JwtSvid,
    JwtSvidError,
    SpiffeId,
    TrustDomain,
    X509Bundle,
)

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

TD_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.-_"
PATH_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.-_"

trust_domains = st.text(TD_CHARS, min_size=1, max_size=40)
segments = st.text(PATH_CHARS, min_size=1, max_size=20).filter(lambda s: s not in (".", ".."))
spiffe_ids = st.builds(
    lambda td, segs: SpiffeId.from_segments(td, *segs),
    trust_domains,
    st.lists(segments, max_size=6),
)


@FAST
@given(spiffe_ids)
def test_parse_of_str_round_trips(spiffe_id: SpiffeId) -> None:
    """Every valid generated ID parses back from its string form to an equal ID."""
    assert SpiffeId.parse(str(spiffe_id)) == spiffe_id


@FAST
@given(
    st.one_of(
        st.text(max_size=80),
        st.text(max_size=60).map(lambda t: "spiffe://" + t),
        st.text(TD_CHARS + "/%?#:@A. ", max_size=60).map(lambda t: "spiffe://" + t),
    )
)
def test_arbitrary_text_parses_or_raises_invalid_spiffe_id(text: str) -> None:
    """Any text either parses into an ID that round-trips, or raises InvalidSpiffeId only."""
    try:
        spiffe_id = SpiffeId.parse(text)
    except InvalidSpiffeId:
        return
    assert str(spiffe_id) == text


@FAST
@given(st.text(max_size=60))
def test_arbitrary_text_to_trust_domain_raises_only_its_error(text: str) -> None:
    """TrustDomain.parse accepts or raises InvalidSpiffeId (InvalidTrustDomain) only."""
    with contextlib.suppress(InvalidSpiffeId):
        TrustDomain.parse(text)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "keys",
                    "use",
                    "kid",
                    "kty",
                    "crv",
                    "x",
                    "y",
                    "n",
                    "e",
                    "x5c",
                    "spiffe_sequence",
                    "spiffe_refresh_hint",
                ]
            ),
            children,
            max_size=6,
        )
    ),
    max_leaves=20,
)
bundle_bytes = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=100).map(lambda b: b"\x30" + b),
    st.binary(max_size=100).map(lambda b: b"-----BEGIN CERTIFICATE-----\n" + b),
)


@FAST
@given(bundle_bytes)
def test_arbitrary_bytes_to_bundle_parsers_raise_only_bundle_error(data: bytes) -> None:
    """Bundle.parse, X509Bundle.parse and JwtBundle.parse raise BundleError and nothing else."""
    for parse in (Bundle.parse, X509Bundle.parse, JwtBundle.parse):
        with contextlib.suppress(BundleError):
            parse(TrustDomain("example.org"), data)


b64ish = st.text(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=+/.!", max_size=60
)


@FAST
@given(st.one_of(st.text(max_size=120), b64ish))
def test_arbitrary_text_to_parse_insecure_raises_only_jwt_svid_error(token: str) -> None:
    """JwtSvid.parse_insecure raises JwtSvidError and nothing else for any text."""
    with contextlib.suppress(JwtSvidError):
        JwtSvid.parse_insecure(token, ["svc"])


def _b64(value: object) -> str:
    import base64

    return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()


@FAST
@given(json_values, json_values)
def test_arbitrary_json_header_and_claims_raise_only_jwt_svid_error(
    header: object, claims: object
) -> None:
    """Tokens built from arbitrary JSON header/claims raise only JwtSvidError."""
    token = f"{_b64(header)}.{_b64(claims)}.AAAA"
    with contextlib.suppress(JwtSvidError):
        JwtSvid.parse_insecure(token, ["svc"])


claim_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True),
    st.text(max_size=30),
    st.just("spiffe://example.org/x"),
    st.lists(st.one_of(st.text(max_size=5), st.integers()), max_size=3),
)


@FAST
@given(
    st.sampled_from(["ES256", "RS256", "PS512", "none", "HS256"]),
    st.dictionaries(st.sampled_from(["sub", "aud", "exp", "iat", "nbf"]), claim_values),
)
def test_arbitrary_claims_under_a_valid_header_raise_only_jwt_svid_error(
    alg: str, claims: dict[str, object]
) -> None:
    """Claim sets of any shape, under an allowed or forbidden alg, raise only JwtSvidError."""
    token = f"{_b64({'alg': alg, 'kid': 'k'})}.{_b64(claims)}.AAAA"
    with contextlib.suppress(JwtSvidError):
        JwtSvid.parse_insecure(token, ["svc"])
