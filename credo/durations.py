"""Durations as users write them in flags and TOML.

``90`` (seconds), ``90s``, ``10m``, ``1h``, ``1h30m``, ``7d``.
"""

from __future__ import annotations

import re

__all__ = ["format_duration", "parse_duration"]

_PART = re.compile(r"(\d+)([smhd])")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: str | int | float) -> int:
    """Return whole seconds; raise ``ValueError`` naming the expected form."""
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r}: expected e.g. '90s', '10m', '1h'")
    if isinstance(value, int | float):
        seconds = int(value)
    else:
        text = value.strip().lower()
        if text.isdigit():
            seconds = int(text)
        else:
            pos = 0
            seconds = 0
            for m in _PART.finditer(text):
                if m.start() != pos:
                    break
                seconds += int(m.group(1)) * _UNIT[m.group(2)]
                pos = m.end()
            if pos != len(text) or not text:
                raise ValueError(f"invalid duration {value!r}: expected e.g. '90s', '10m', '1h'")
    return seconds


def format_duration(seconds: int) -> str:
    """Render seconds the way :func:`parse_duration` reads them (``3600`` -> ``1h``)."""
    if seconds <= 0:
        return f"{seconds}s"
    out = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            out.append(f"{seconds // size}{unit}")
            seconds %= size
    return "".join(out)
