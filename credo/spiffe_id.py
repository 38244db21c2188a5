"""SPIFFE IDs and trust domains, parsed exactly as the SPIFFE-ID standard says.

A SPIFFE ID is ``spiffe://`` + a trust domain name + an optional path:

* the scheme is the literal, lowercase ``spiffe://``;
* the trust domain is non-empty, at most 255 bytes, and made of lowercase letters,
  digits, ``.``, ``-`` and ``_`` (so no userinfo ``@``, no port ``:``);
* the path is ``/``-separated segments of letters, digits, ``.``, ``-`` and ``_``; no
  segment may be empty, ``.`` or ``..``, and there is no trailing ``/``;
* no percent-encoding, query (``?``) or fragment (``#``);
* the whole ID is at most 2048 bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from credo.errors import InvalidSpiffeId, InvalidTrustDomain

__all__ = ["MAX_SPIFFE_ID_LENGTH", "MAX_TRUST_DOMAIN_LENGTH", "SpiffeId", "TrustDomain"]

SCHEME_PREFIX = "spiffe://"
MAX_SPIFFE_ID_LENGTH = 2048
MAX_TRUST_DOMAIN_LENGTH = 255

_TD_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.-_")
_PATH_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.-_")


def _trust_domain_problem(name: str) -> str | None:
    """Return why ``name`` is not a valid trust domain name, or None if it is."""
    if not name:
        return "trust domain is empty; expected a name like 'example.org'"
    if len(name) > MAX_TRUST_DOMAIN_LENGTH:
        return f"trust domain is {len(name)} bytes long; expected at most {MAX_TRUST_DOMAIN_LENGTH}"
    for ch in name:
        if ch not in _TD_CHARS:
            return _bad_td_char(ch)
    return None


def _bad_td_char(ch: str) -> str:
    """Explain why ``ch`` may not appear in a trust domain name."""
    if ch == ":":
        return "trust domain contains ':' (a port is not allowed)"
    if ch == "@":
        return "trust domain contains '@' (userinfo is not allowed)"
    if ch == "%":
        return "trust domain contains '%' (percent-encoding is not allowed)"
    if ch.isupper() and ch.isascii():
        return f"trust domain contains uppercase {ch!r}; expected lowercase letters only"
    return (
        f"trust domain contains {ch!r}; expected only lowercase letters, digits, '.', '-' and '_'"
    )


def _path_problem(path: str) -> str | None:
    """Return why ``path`` (``""`` or ``"/a/b"``) is not a valid SPIFFE ID path, or None."""
    if not path:
        return None
    if not path.startswith("/"):
        return "path must start with '/'"
    for segment in path[1:].split("/"):
        if segment == "":
            if path.endswith("/"):
                return "path has a trailing '/'; expected none"
            return "path has an empty segment ('//'); expected non-empty segments"
        if segment in (".", ".."):
            return f"path has a {segment!r} segment; relative segments are not allowed"
        for ch in segment:
            if ch not in _PATH_CHARS:
                return _bad_path_char(ch)
    return None


def _bad_path_char(ch: str) -> str:
    """Explain why ``ch`` may not appear in a path segment."""
    if ch == "%":
        return "path contains '%' (percent-encoding is not allowed)"
    if ch == "?":
        return "path contains '?' (a query is not allowed)"
    if ch == "#":
        return "path contains '#' (a fragment is not allowed)"
    return f"path contains {ch!r}; expected only letters, digits, '.', '-' and '_'"


@dataclass(frozen=True, order=True, slots=True)
class TrustDomain:
    """A SPIFFE trust domain, e.g. ``TrustDomain("example.org")``.

    ``str()`` gives the bare name; :meth:`id_string` gives ``spiffe://<name>``.
    """

    name: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise InvalidTrustDomain(repr(self.name), "trust domain must be a string")
        problem = _trust_domain_problem(self.name)
        if problem is not None:
            raise InvalidTrustDomain(self.name, problem)

    @classmethod
    def parse(cls, text: str) -> TrustDomain:
        """Parse ``example.org`` or ``spiffe://example.org`` (no path allowed)."""
        if not isinstance(text, str):
            raise InvalidTrustDomain(repr(text), "trust domain must be a string")
        if "://" in text:
            if not text.startswith(SCHEME_PREFIX):
                raise InvalidTrustDomain(text, "scheme must be 'spiffe://' (lowercase)")
            rest = text[len(SCHEME_PREFIX) :]
            if "/" in rest:
                raise InvalidTrustDomain(text, "trust domain ID must not have a path")
            problem = _trust_domain_problem(rest)
            if problem is not None:
                raise InvalidTrustDomain(text, problem)
            return cls(rest)
        problem = _trust_domain_problem(text)
        if problem is not None:
            raise InvalidTrustDomain(text, problem)
        return cls(text)

    def id_string(self) -> str:
        """The trust domain's SPIFFE ID, ``spiffe://<name>``."""
        return SCHEME_PREFIX + self.name

    def spiffe_id(self) -> SpiffeId:
        """The trust domain's SPIFFE ID as a :class:`SpiffeId` with an empty path."""
        return SpiffeId(self, "")

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, order=True, slots=True)
class SpiffeId:
    """A SPIFFE ID: a trust domain and a path (``""`` or ``"/a/b"``).

    ``str()`` round-trips through :meth:`parse`. Instances are hashable and ordered
    (by trust domain name, then path).
    """

    trust_domain: TrustDomain
    path: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.trust_domain, TrustDomain):
            raise InvalidSpiffeId(repr(self.trust_domain), "trust_domain must be a TrustDomain")
        if not isinstance(self.path, str):
            raise InvalidSpiffeId(repr(self.path), "path must be a string")
        text = SCHEME_PREFIX + self.trust_domain.name + self.path
        problem = _path_problem(self.path)
        if problem is not None:
            raise InvalidSpiffeId(text, problem)
        if len(text) > MAX_SPIFFE_ID_LENGTH:
            raise InvalidSpiffeId(
                text,
                f"SPIFFE ID is {len(text)} bytes long; expected at most {MAX_SPIFFE_ID_LENGTH}",
            )

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        """Parse ``spiffe://<trust domain>[/<path>]``; raise :class:`credo.InvalidSpiffeId`."""
        if not isinstance(text, str):
            raise InvalidSpiffeId(repr(text), "SPIFFE ID must be a string")
        if not text:
            raise InvalidSpiffeId(text, "SPIFFE ID is empty")
        # Count bytes, not characters: the limit is defined on the (ASCII) URI.
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > MAX_SPIFFE_ID_LENGTH:
            raise InvalidSpiffeId(
                text, f"SPIFFE ID is {size} bytes long; expected at most {MAX_SPIFFE_ID_LENGTH}"
            )
        if not text.startswith(SCHEME_PREFIX):
            if text[: len(SCHEME_PREFIX)].lower() == SCHEME_PREFIX:
                raise InvalidSpiffeId(text, "scheme must be lowercase 'spiffe://'")
            raise InvalidSpiffeId(text, "scheme is missing or wrong; expected 'spiffe://'")
        rest = text[len(SCHEME_PREFIX) :]
        slash = rest.find("/")
        td_text, path = (rest, "") if slash < 0 else (rest[:slash], rest[slash:])
        problem = _trust_domain_problem(td_text)
        if problem is not None:
            raise InvalidSpiffeId(text, problem)
        problem = _path_problem(path)
        if problem is not None:
            raise InvalidSpiffeId(text, problem)
        return cls(TrustDomain(td_text), path)

    @classmethod
    def from_segments(cls, trust_domain: TrustDomain | str, *segments: str) -> SpiffeId:
        """Build an ID from a trust domain and path segments, e.g. ``("example.org", "db")``."""
        td = (
            trust_domain
            if isinstance(trust_domain, TrustDomain)
            else TrustDomain.parse(trust_domain)
        )
        for segment in segments:
            if not isinstance(segment, str) or "/" in segment:
                raise InvalidSpiffeId(
                    f"{td.id_string()}/{segment}",
                    "path segment must be a string without '/'",
                )
        path = "".join("/" + s for s in segments)
        return cls(td, path)

    def is_member_of(self, trust_domain: TrustDomain) -> bool:
        """True when this ID belongs to ``trust_domain``."""
        return self.trust_domain == trust_domain

    def __str__(self) -> str:
        return SCHEME_PREFIX + self.trust_domain.name + self.path
