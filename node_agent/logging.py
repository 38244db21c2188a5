"""Structured logs for the node agent: a message plus fields, as text or JSON lines.

Call sites use the standard library logger and pass fields through :func:`kv`::

    log.info("agent attested", extra=kv(spiffe_id=str(agent_id), server=address))

Text lines read ``2024-05-01T10:00:00Z level=info logger=... msg="agent attested"
spiffe_id=spiffe://...``; JSON lines carry the same keys. Never pass a private key, a
token or a whole JWT as a field.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

__all__ = ["configure_logging", "kv"]

_FIELDS = "credo_fields"


def kv(**fields: Any) -> dict[str, Any]:
    """The ``extra`` argument that attaches ``fields`` to a log record."""
    return {_FIELDS: fields}


def _text_value(value: Any) -> str:
    """Quote a field value when it has spaces or quotes, as logfmt does."""
    text = str(value)
    if text == "" or any(c in text for c in ' "=\n\t'):
        return json.dumps(text)
    return text


class _Formatter(logging.Formatter):
    """Renders a record and its :func:`kv` fields as logfmt text or one JSON object."""

    def __init__(self, fmt: str) -> None:
        super().__init__()
        self._json = fmt == "json"

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = dict(getattr(record, _FIELDS, None) or {})
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        stamp += f".{int(record.msecs):03d}Z"
        level = record.levelname.lower()
        if record.exc_info and record.exc_info[1] is not None:
            fields.setdefault("error", str(record.exc_info[1]))
        if self._json:
            doc: dict[str, Any] = {
                "time": stamp,
                "level": level,
                "logger": record.name,
                "msg": record.getMessage(),
            }
            doc.update(
                {k: v if isinstance(v, int | float | bool) else str(v) for k, v in fields.items()}
            )
            return json.dumps(doc)
        parts = [
            stamp,
            f"level={level}",
            f"logger={record.name}",
            f"msg={json.dumps(record.getMessage())}",
        ]
        parts.extend(f"{k}={_text_value(v)}" for k, v in fields.items())
        return " ".join(parts)


def configure_logging(level: str = "info", fmt: str = "text") -> None:
    """Send the agent's logs (and grpc's warnings) to stderr in ``fmt`` at ``level``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(fmt))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
