"""Structured logs for the signing server: ``text`` or ``json`` lines, fields not prose.

Every module logs with the standard library (``logging.getLogger(__name__)``) and puts
data in ``extra``: ``log.info("attested agent", extra={"agent_id": ...})``. This module
renders those fields:

* ``text``: ``2025-01-01T12:00:00.123Z INFO attested agent agent_id=spiffe://... logger=...``
* ``json``: one object per line with ``ts``, ``level``, ``msg``, ``logger`` and the fields.

Never put a private key, a join token, or a whole JWT in a field. As a last line of
defence, fields whose names say they hold a secret (``token``, ``private_key``, ``jwt``,
``key_pem``) are replaced by ``<redacted>``, and the token inside a join-token agent ID
(``.../credo/agent/join_token/<token>``) is shortened to its first 8 characters
(``join_token/1a2b3c4d...``): enough to tell agents apart, useless as a credential.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

__all__ = ["REDACTED_FIELDS", "StructuredFormatter", "redact", "setup_logging"]

REDACTED_FIELDS = frozenset({"token", "join_token", "private_key", "jwt", "key_pem", "svid_token"})
"""Field names whose values never reach a log line."""

# Attributes every LogRecord has; anything else on a record came from ``extra``.
_STANDARD = frozenset(
    vars(logging.LogRecord("n", logging.INFO, "p", 1, "m", None, None)).keys()
    | {"message", "asctime", "taskName"}
)
_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


_JOIN_TOKEN_IN_ID = re.compile(r"(/join_token/)([A-Za-z0-9._-]{8})[A-Za-z0-9._-]+")


def redact(text: str) -> str:
    """Shorten join tokens embedded in agent IDs (``join_token/<8 chars>...``)."""
    return _JOIN_TOKEN_IN_ID.sub(r"\1\2...", text) if "/join_token/" in text else text


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in vars(record).items():
        if key in _STANDARD or key.startswith("_"):
            continue
        out[key] = "<redacted>" if key in REDACTED_FIELDS else value
    return out


def _text_value(value: Any) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' "=\n\t'):
        return json.dumps(text)
    return text


class StructuredFormatter(logging.Formatter):
    """Render a record as one ``text`` (logfmt-like) or ``json`` line."""

    def __init__(self, fmt: str = "text") -> None:
        super().__init__()
        if fmt not in ("text", "json"):
            raise ValueError(f"log format {fmt!r} is not one of text, json")
        self._json = fmt == "json"

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        ts = ts.replace("+00:00", "Z")
        fields = _fields(record)
        fields["logger"] = record.name
        if record.exc_info:
            fields["error_trace"] = self.formatException(record.exc_info)
        msg = record.getMessage()
        if self._json:
            doc = {"ts": ts, "level": record.levelname.lower(), "msg": msg, **fields}
            return redact(json.dumps(doc, default=str))
        parts = [ts, record.levelname, msg]
        parts.extend(f"{key}={_text_value(value)}" for key, value in fields.items())
        return redact(" ".join(parts))


def setup_logging(level: str = "info", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Send every log record at ``level`` or above to ``stream`` (stderr) as ``fmt`` lines.

    Replaces the root logger's handlers, so calling it twice does not double the output.
    """
    if level not in _LEVELS:
        raise ValueError(f"log level {level!r} is not one of {', '.join(_LEVELS)}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(StructuredFormatter(fmt))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(_LEVELS[level])
    # Third-party chatter stays at warning unless we are debugging.
    for name in ("grpc", "asyncio"):
        logging.getLogger(name).setLevel(logging.DEBUG if level == "debug" else logging.WARNING)
    # SQLAlchemy's engine log prints statement parameters and result rows (join tokens,
    # agent IDs holding them): keep it at warning even at debug level.
    logging.getLogger("sqlalchemy").setLevel(logging.WARNING)
