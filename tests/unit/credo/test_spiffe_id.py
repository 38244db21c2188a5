"""SPIFFE ID and trust domain parsing, per the SPIFFE-ID standard (sections 2.1-2.3)."""

from __future__ import annotations

import pytest

from credo import InvalidSpiffeId, InvalidTrustDomain, SpiffeId, TrustDomain

LONG_SEGMENT = "a" * 100

VALID_IDS = [
    pytest.param("spiffe://example.org", "example.org", "", id="trust-domain-only"),
    pytest.param("spiffe://example.org/workload", "example.org", "/workload", id="one-segment"),
    pytest.param("spiffe://example.org/a/b/c", "example.org", "/a/b/c", id="three-segments"),
    pytest.param(
        "spiffe://example.org/AZaz09.-_", "example.org", "/AZaz09.-_", id="path-all-char-classes"
    ),
    pytest.param("spiffe://a-b_c.0-9", "a-b_c.0-9", "", id="td-all-char-classes"),
    pytest.param("spiffe://example.org/...", "example.org", "/...", id="three-dots-is-a-name"),
    pytest.param("spiffe://example.org/.a", "example.org", "/.a", id="dot-prefixed-segment"),
    pytest.param("spiffe://1.2.3.4/x", "1.2.3.4", "/x", id="ip-like-td"),
    pytest.param("spiffe://_/x", "_", "/x", id="underscore-td"),
]

INVALID_IDS = [
    pytest.param("", "empty", id="empty"),
    pytest.param("example.org/workload", "scheme", id="no-scheme"),
    pytest.param("SPIFFE://example.org/w", "lowercase", id="uppercase-scheme"),
    pytest.param("Spiffe://example.org/w", "lowercase", id="mixed-case-scheme"),
    pytest.param("https://example.org/w", "scheme", id="wrong-scheme"),
    pytest.param("spiffe:/example.org/w", "scheme", id="single-slash-after-scheme"),
    pytest.param("spiffe://", "empty", id="empty-trust-domain"),
    pytest.param("spiffe:///path", "empty", id="empty-trust-domain-with-path"),
    pytest.param("spiffe://Example.org/w", "uppercase", id="uppercase-trust-domain"),
    pytest.param("spiffe://example.org:8080/w", "port", id="port"),
    pytest.param("spiffe://user@example.org/w", "userinfo", id="userinfo"),
    pytest.param("spiffe://exa%41mple.org/w", "percent", id="percent-in-trust-domain"),
    pytest.param("spiffe://exam ple.org", "trust domain contains", id="space-in-trust-domain"),
    pytest.param("spiffe://example.org/", "trailing", id="trailing-slash-root"),
    pytest.param("spiffe://example.org/a/", "trailing", id="trailing-slash"),
    pytest.param("spiffe://example.org//a", "empty segment", id="empty-segment"),
    pytest.param("spiffe://example.org/a//b", "empty segment", id="empty-middle-segment"),
    pytest.param("spiffe://example.org/.", "relative", id="dot-segment"),
    pytest.param("spiffe://example.org/..", "relative", id="dot-dot-segment"),
    pytest.param("spiffe://example.org/a/../b", "relative", id="dot-dot-middle-segment"),
    pytest.param("spiffe://example.org/a%20b", "percent", id="percent-encoding-in-path"),
    pytest.param("spiffe://example.org/a?x=1", "query", id="query"),
    pytest.param("spiffe://example.org/a#frag", "fragment", id="fragment"),
    pytest.param("spiffe://example.org?x=1", "trust domain contains", id="query-after-td"),
    pytest.param("spiffe://example.org#f", "trust domain contains", id="fragment-after-td"),
    pytest.param("spiffe://example.org/a b", "path contains", id="space-in-path"),
    pytest.param("spiffe://example.org/caf\u00e9", "path contains", id="non-ascii-in-path"),
    pytest.param("spiffe://example.org/a:b", "path contains", id="colon-in-path"),
    pytest.param(" spiffe://example.org/a", "scheme", id="leading-space"),
    pytest.param("spiffe://" + "a" * 256, "255", id="trust-domain-over-255-bytes"),
]


@pytest.mark.parametrize(("text", "td", "path"), VALID_IDS)
def test_valid_ids_parse_into_trust_domain_and_path(text: str, td: str, path: str) -> None:
    """Every ID the standard allows parses, and str() gives back the same text."""
    spiffe_id = SpiffeId.parse(text)
    assert spiffe_id.trust_domain == TrustDomain(td)
    assert spiffe_id.path == path
    assert str(spiffe_id) == text


@pytest.mark.parametrize(("text", "reason"), INVALID_IDS)
def test_invalid_ids_raise_naming_the_broken_rule(text: str, reason: str) -> None:
    """Every ID the standard forbids raises InvalidSpiffeId whose reason names the rule."""
    with pytest.raises(InvalidSpiffeId) as info:
        SpiffeId.parse(text)
    assert reason in info.value.reason
    assert info.value.text == text


def test_id_of_exactly_2048_bytes_is_accepted() -> None:
    """The standard says implementations must accept IDs up to 2048 bytes."""
    prefix = "spiffe://example.org"
    segments, size = [], len(prefix)
    while size + 1 + len(LONG_SEGMENT) <= 2048:
        segments.append(LONG_SEGMENT)
        size += 1 + len(LONG_SEGMENT)
    tail = "b" * (2048 - size - 1)
    text = prefix + "".join("/" + s for s in segments) + "/" + tail
    assert len(text) == 2048
    assert str(SpiffeId.parse(text)) == text


def test_id_over_2048_bytes_is_rejected_with_the_limit_in_the_reason() -> None:
    """IDs longer than 2048 bytes raise with a reason that states the limit."""
    text = "spiffe://example.org/" + "a" * 2048
    with pytest.raises(InvalidSpiffeId, match="2048"):
        SpiffeId.parse(text)


def test_from_segments_builds_the_same_id_as_parse() -> None:
    """from_segments joins segments with '/' under the trust domain."""
    assert SpiffeId.from_segments("example.org", "ns", "prod") == SpiffeId.parse(
        "spiffe://example.org/ns/prod"
    )
    assert SpiffeId.from_segments(TrustDomain("example.org")) == SpiffeId.parse(
        "spiffe://example.org"
    )


@pytest.mark.parametrize(
    "segments",
    [
        pytest.param(("a/b",), id="slash-in-segment"),
        pytest.param(("",), id="empty-segment"),
        pytest.param(("..",), id="dot-dot-segment"),
        pytest.param(("a b",), id="space-in-segment"),
    ],
)
def test_from_segments_rejects_bad_segments(segments: tuple[str, ...]) -> None:
    """from_segments applies the same segment rules as parse."""
    with pytest.raises(InvalidSpiffeId):
        SpiffeId.from_segments("example.org", *segments)


def test_ids_are_hashable_ordered_and_compare_by_value() -> None:
    """Equal IDs hash alike, and IDs sort by trust domain then path."""
    a = SpiffeId.parse("spiffe://a.org/z")
    b = SpiffeId.parse("spiffe://b.org/a")
    assert a == SpiffeId.parse("spiffe://a.org/z")
    assert len({a, SpiffeId.parse("spiffe://a.org/z")}) == 1
    assert sorted([b, a]) == [a, b]


def test_is_member_of_compares_trust_domains() -> None:
    """is_member_of is true only for the ID's own trust domain."""
    spiffe_id = SpiffeId.parse("spiffe://example.org/w")
    assert spiffe_id.is_member_of(TrustDomain("example.org"))
    assert not spiffe_id.is_member_of(TrustDomain("example.com"))


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("example.org", id="bare-name"),
        pytest.param("spiffe://example.org", id="trust-domain-id"),
    ],
)
def test_trust_domain_parse_accepts_name_or_id(text: str) -> None:
    """TrustDomain.parse accepts the bare name and the spiffe:// form."""
    td = TrustDomain.parse(text)
    assert td.name == "example.org"
    assert str(td) == "example.org"
    assert td.id_string() == "spiffe://example.org"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        pytest.param("", "empty", id="empty"),
        pytest.param("Example.org", "uppercase", id="uppercase"),
        pytest.param("spiffe://example.org/path", "path", id="id-with-path"),
        pytest.param("https://example.org", "scheme", id="wrong-scheme"),
        pytest.param("example.org:443", "port", id="port"),
        pytest.param("a" * 256, "255", id="too-long"),
    ],
)
def test_trust_domain_parse_rejects_bad_names(text: str, reason: str) -> None:
    """Bad trust domain names raise InvalidTrustDomain (an InvalidSpiffeId) naming the rule."""
    with pytest.raises(InvalidTrustDomain) as info:
        TrustDomain.parse(text)
    assert reason in info.value.reason
    assert isinstance(info.value, InvalidSpiffeId)


def test_trust_domain_constructor_validates() -> None:
    """Building a TrustDomain directly applies the same rules as parse."""
    with pytest.raises(InvalidTrustDomain):
        TrustDomain("Bad.Org")
