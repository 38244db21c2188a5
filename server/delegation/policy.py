"""Fields of a delegation policy: how they are written, checked and matched.

* agent pattern: a SPIFFE ID (that agent only) or a path prefix ending in ``/*``
  (``spiffe://example.org/agents/*``: every ID below ``/agents``);
* subject claim: ``name=value``; a person's token matches when its claim ``name`` equals
  ``value`` or, for a list claim, contains it;
* scope: an RFC 6749 scope token (printable ASCII, no space, ``"`` or ``\\``);
* budget: ``SCOPE=N/PERIOD`` (``repo:write=10/1h``; ``*`` counts every token).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from credo.durations import parse_duration
from credo.errors import InvalidSpiffeId
from credo.spiffe_id import SpiffeId
from server.datastore.models import Budget, DelegationPolicy

__all__ = [
    "DEFAULT_MAX_DEPTH",
    "DEFAULT_MAX_TTL",
    "MAX_DEPTH",
    "MAX_TTL",
    "agent_patterns_for",
    "claims_match",
    "describe",
    "parse_budget",
    "parse_subject_claim",
    "validate_agent_pattern",
    "validate_scope",
]

DEFAULT_MAX_TTL = 300
DEFAULT_MAX_DEPTH = 1
MAX_TTL = 24 * 3600
MAX_DEPTH = 16
_SCOPE = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]{1,256}$")
_CLAIM_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


def validate_scope(scope: str) -> str:
    """``scope`` if it is one RFC 6749 scope token; ValueError otherwise."""
    if not _SCOPE.match(scope):
        raise ValueError(
            f"{scope[:80]!r} is not a scope; expected printable ASCII without spaces, "
            "quotes or backslashes"
        )
    return scope


def validate_agent_pattern(pattern: str) -> str:
    """A SPIFFE ID, or a SPIFFE ID prefix ending in ``/*``; ValueError otherwise."""
    base = pattern[:-2] if pattern.endswith("/*") else pattern
    try:
        parsed = SpiffeId.parse(base)
    except InvalidSpiffeId as exc:
        raise ValueError(
            f"{pattern[:120]!r}: {exc}; expected a SPIFFE ID or a prefix ending in /*"
        ) from None
    if not parsed.path and not pattern.endswith("/*"):
        raise ValueError(f"{pattern!r} is a trust domain ID; agents have a path (or use /*)")
    return pattern


def agent_patterns_for(agent_id: SpiffeId) -> list[str]:
    """Every pattern that matches ``agent_id``: itself and each ancestor path + ``/*``."""
    patterns = [str(agent_id)]
    segments = [s for s in agent_id.path.split("/") if s]
    for n in range(len(segments) - 1, -1, -1):
        prefix = "/".join(segments[:n])
        patterns.append(f"spiffe://{agent_id.trust_domain.name}{'/' + prefix if prefix else ''}/*")
    return patterns


def parse_subject_claim(text: str) -> tuple[str, str]:
    """``name=value`` -> ``(name, value)``; ValueError naming what is wrong."""
    name, sep, value = text.partition("=")
    if not sep or not value:
        raise ValueError(f"{text[:80]!r}: expected claim=value, e.g. groups=eng or sub=alice")
    if not _CLAIM_NAME.match(name):
        raise ValueError(f"{name[:80]!r} is not a claim name")
    return name, value


def parse_budget(text: str) -> Budget:
    """``SCOPE=N/PERIOD`` -> :class:`Budget`; ValueError naming what is wrong."""
    scope, sep, rest = text.rpartition("=")
    count, slash, period = rest.partition("/")
    if not sep or not slash or not scope:
        raise ValueError(f"{text[:80]!r}: expected SCOPE=N/PERIOD, e.g. repo:write=10/1h")
    if scope != "*":
        validate_scope(scope)
    if not count.isdigit() or len(count) > 12:
        raise ValueError(f"{text[:80]!r}: {count!r} is not a whole number of tokens")
    seconds = parse_duration(period)
    if seconds <= 0:
        raise ValueError(f"{text[:80]!r}: the period must be positive")
    return Budget(scope, int(count), seconds)


def _claim_values(value: Any) -> list[str]:
    if isinstance(value, list):
        return [str(v) for v in value if isinstance(v, str | int) and not isinstance(v, bool)]
    if isinstance(value, str):
        return [value]
    if isinstance(value, int) and not isinstance(value, bool):
        return [str(value)]
    return []


def claims_match(required: Iterable[tuple[str, str]], claims: Mapping[str, Any]) -> bool:
    """Whether ``claims`` carries every ``(name, value)`` in ``required``."""
    return all(value in _claim_values(claims.get(name)) for name, value in required)


def describe(policy: DelegationPolicy) -> str:
    """One line naming the policy, for logs and errors."""
    return f"delegation policy {policy.id} ({policy.agent_id} for {policy.subject_issuer})"
