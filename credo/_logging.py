"""Structured logs for both processes (``credo-server`` and ``credo-agent``).

Call sites use the standard library and put data in ``extra``, never in the message::

    log.info("attested agent", extra={"agent_id": agent_id, "source": peer})

:func:`setup_logging` renders each record as one line:

* ``text``: ``2025-01-01T12:00:00.123Z INFO attested agent agent_id=spiffe://... logger=...``
  (logfmt-style ``key=value``; values with spaces or quotes are JSON-quoted);
* ``json``: one object per line with ``ts``, ``level``, ``msg``, the fields and ``logger``.

Redaction is part of the formatter, so no call site can bypass it:

* fields whose names say they hold a secret (:data:`REDACTED_FIELDS`) become ``<redacted>``;
* the token inside a join-token agent ID (``.../credo/agent/join_token/<token>``) is
  shortened to its first 8 characters (``join_token/1a2b3c4d...``): enough to tell agents
  apart, useless as a credential;
* anything shaped like a compact JWS (three base64url parts, the first decoding to a JSON
  header) keeps only its header part (``eyJhbGciOi....<redacted>``);
* a PEM private key block is replaced by ``<redacted private key>``.

These rules apply to the message, to every field and to exception text alike.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

__all__ = [
    "LOG_FORMATS",
    "LOG_LEVELS",
    "REDACTED",
    "REDACTED_FIELDS",
    "StructuredFormatter",
    "redact",
    "setup_logging",
]

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")

REDACTED = "<redacted>"
REDACTED_FIELDS = frozenset(
    {
        "token",
        "join_token",
        "private_key",
        "key",
        "key_pem",
        "jwt",
        "svid_token",
        "subject_token",
        "actor_token",
        "access_token",
        "client_assertion",
        "password",
        "secret",
    }
)
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
# A compact JWS: base64url header starting with '{"' (eyJ), payload and signature.
_JWS = re.compile(r"\b(eyJ[A-Za-z0-9_-]{4,})\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_PEM_KEY = re.compile(
    r"-----BEGIN ([A-Z ]*)PRIVATE KEY-----.*?(?:-----END \1PRIVATE KEY-----|$)", re.DOTALL
)


def redact(text: str) -> str:
    """``text`` with join tokens shortened, JWTs cut to their header and private keys removed."""
    if "/join_token/" in text:
        text = _JOIN_TOKEN_IN_ID.sub(r"\1\2...", text)
    if "eyJ" in text:
        text = _JWS.sub(lambda m: f"{m.group(1)[:12]}....{REDACTED}", text)
    if "PRIVATE KEY" in text:
        text = _PEM_KEY.sub("<redacted private key>", text)
    return text


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in vars(record).items():
        if key in _STANDARD or key.startswith("_"):
            continue
        out[key] = REDACTED if key in REDACTED_FIELDS else value
    return out


def _json_value(value: Any) -> Any:
    if isinstance(value, bool | int | float) or value is None:
        return value
    if isinstance(value, list | tuple | set | frozenset):
        return [_json_value(v) for v in value]
    return str(value)


def _text_value(value: Any) -> str:
    if isinstance(value, list | tuple | set | frozenset):
        value = ",".join(str(v) for v in value)
    text = str(value)
    if text == "" or any(c in text for c in ' "=\n\t'):
        return json.dumps(text)
    return text


class StructuredFormatter(logging.Formatter):
    """Render a record as one ``text`` (logfmt-like) or ``json`` line, redacted."""

    def __init__(self, fmt: str = "text") -> None:
        super().__init__()
        if fmt not in LOG_FORMATS:
            raise ValueError(f"log format {fmt!r} is not one of {', '.join(LOG_FORMATS)}")
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
            doc = {"ts": ts, "level": record.levelname.lower(), "msg": msg}
            doc.update({key: _json_value(value) for key, value in fields.items()})
            return redact(json.dumps(doc))
        parts = [ts, record.levelname, msg]
        parts.extend(f"{key}={_text_value(value)}" for key, value in fields.items())
        return redact(" ".join(parts))


def setup_logging(level: str = "info", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Send every record at ``level`` or above to ``stream`` (stderr) as ``fmt`` lines.

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
    logging.getLogger("asyncio").setLevel(logging.DEBUG if level == "debug" else logging.WARNING)
    # grpc's Python logger stays at warning even at debug level: its Cython layer logs debug
    # records from its own threads with arguments it does not own a reference to, and a
    # record kept alive afterwards (as pytest's log capture does) crashed the interpreter in
    # the garbage collector. GRPC_VERBOSITY/GRPC_TRACE are the switches for grpc internals.
    logging.getLogger("grpc").setLevel(logging.WARNING)
    # SQLAlchemy's engine log prints statement parameters and result rows (join tokens,
    # agent IDs holding them): keep it at warning even at debug level.
    logging.getLogger("sqlalchemy").setLevel(logging.WARNING)
