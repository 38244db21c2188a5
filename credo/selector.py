"""Selectors: the ``type:value`` facts that attestation produces and entries match on."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from credo.errors import InvalidSelector

__all__ = ["Selector", "is_subset"]

_TYPE = re.compile(r"^[a-z0-9][a-z0-9_\-]*$")
_MAX_LEN = 1024


@dataclass(frozen=True, order=True, slots=True)
class Selector:
    """One attested fact, e.g. ``Selector("unix", "uid:1000")``.

    The type names the attestor that produced it (``unix``, ``k8s``, ``join_token``);
    the value is everything after the first colon and may itself contain colons.
    """

    type: str
    value: str

    def __post_init__(self) -> None:
        if not self.type:
            raise InvalidSelector(f"{self.type}:{self.value}", "selector type is empty")
        if not _TYPE.match(self.type):
            raise InvalidSelector(
                f"{self.type}:{self.value}",
                "selector type must be lowercase letters, digits, '_' or '-'",
            )
        if not self.value:
            raise InvalidSelector(f"{self.type}:{self.value}", "selector value is empty")
        if len(self.type) + len(self.value) + 1 > _MAX_LEN:
            raise InvalidSelector(
                f"{self.type}:{self.value[:32]}...", f"selector is longer than {_MAX_LEN} bytes"
            )

    @classmethod
    def parse(cls, text: str) -> Selector:
        """Parse ``type:value``; raise :class:`credo.InvalidSelector` if either part is missing."""
        kind, sep, value = text.partition(":")
        if not sep:
            raise InvalidSelector(text, "selector must be 'type:value', e.g. 'unix:uid:1000'")
        return cls(kind, value)

    def __str__(self) -> str:
        return f"{self.type}:{self.value}"


def is_subset(wanted: Iterable[Selector], have: Iterable[Selector]) -> bool:
    """True when every selector in ``wanted`` is also in ``have``."""
    return set(wanted) <= set(have)
