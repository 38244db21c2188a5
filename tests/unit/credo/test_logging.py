"""The shared log formatter: fields from ``extra``, both formats, and redaction no call site
can bypass."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator

import pytest

from credo._logging import REDACTED, StructuredFormatter, redact, setup_logging

JWT = (
    "eyJhbGciOiJFUzI1NiIsImtpZCI6ImsxIiwidHlwIjoiSldUIn0"
    ".eyJzdWIiOiJzcGlmZmU6Ly9leGFtcGxlLm9yZy93IiwiYXVkIjpbImEiXX0"
    ".MEUCIQDx3v1c2Yp0gk0mJ6b7bq0Jd4m1nS7wq1gC1lHk3wAbcdEFg"
)
TOKEN = "0f4b8c2d-9e1a-4f3b-8c7d-6e5f4a3b2c1d"
PEM = (
    "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg\n"
    "-----END PRIVATE KEY-----\n"
)


def _record(msg: str, **fields: object) -> logging.LogRecord:
    record = logging.LogRecord("credo.test", logging.WARNING, __file__, 1, msg, None, None)
    for key, value in fields.items():
        setattr(record, key, value)
    return record


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    out = io.StringIO()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    # setup_logging also sets the level of third-party loggers: put those back too.
    others = {name: logging.getLogger(name).level for name in ("grpc", "asyncio", "sqlalchemy")}
    setup_logging("debug", "json", stream=out)
    try:
        yield out
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)
        for name, old in others.items():
            logging.getLogger(name).setLevel(old)


def test_text_line_carries_every_extra_field() -> None:
    """A text line has the time, level, message and each ``extra`` field as key=value."""
    line = StructuredFormatter("text").format(
        _record("workload refused", pid=42, uid=1000, selectors=["unix:uid:1000", "unix:gid:5"])
    )
    assert " WARNING workload refused " in line
    assert "pid=42" in line and "uid=1000" in line
    assert "selectors=unix:uid:1000,unix:gid:5" in line
    assert "logger=credo.test" in line


def test_json_line_keeps_field_types() -> None:
    """A JSON line is one object; numbers stay numbers and lists stay lists."""
    doc = json.loads(
        StructuredFormatter("json").format(_record("x", pid=42, ok=True, ids=["a", "b"]))
    )
    assert doc["msg"] == "x" and doc["level"] == "warning" and doc["logger"] == "credo.test"
    assert doc["pid"] == 42 and doc["ok"] is True and doc["ids"] == ["a", "b"]


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_secret_named_fields_are_redacted(fmt: str) -> None:
    """Fields named like secrets never show their value, in either format."""
    line = StructuredFormatter(fmt).format(_record("m", token=TOKEN, private_key="k", jwt="j"))
    assert TOKEN not in line
    assert line.count(REDACTED) == 3


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_values_that_look_like_secrets_are_redacted_wherever_they_are(fmt: str) -> None:
    """A join-token agent ID, a whole JWT or a PEM key is cut in the message and in any field."""
    agent_id = f"spiffe://example.org/credo/agent/join_token/{TOKEN}"
    line = StructuredFormatter(fmt).format(
        _record(f"agent {agent_id} sent {JWT}", spiffe_id=agent_id, error=f"bad {JWT}", pem=PEM)
    )
    assert TOKEN not in line
    assert TOKEN[:8] in line  # enough to tell agents apart
    assert JWT not in line and JWT.split(".")[2] not in line and JWT.split(".")[1] not in line
    assert "MIGHAgEA" not in line


def test_exception_text_is_redacted() -> None:
    """An exception's text goes through the same redaction."""
    try:
        raise ValueError(f"token {JWT} refused")
    except ValueError:
        record = _record("failed")
        record.exc_info = sys.exc_info()
    line = StructuredFormatter("json").format(record)
    assert JWT not in line and "token eyJ" in line


def test_standard_logging_calls_render_fields(captured: io.StringIO) -> None:
    """``log.info(msg, extra={...})``, the one way call sites pass fields, reaches the line."""
    logging.getLogger("node_agent.test").info("sync open", extra={"event_id": 7, "server": "s:1"})
    doc = json.loads(captured.getvalue().splitlines()[-1])
    assert doc["event_id"] == 7 and doc["server"] == "s:1" and doc["logger"] == "node_agent.test"


def test_redact_leaves_ordinary_text_alone() -> None:
    """Text without secrets is unchanged (IDs, dotted names, version strings)."""
    text = "spiffe://example.org/web a.b.c v1.2.3 eyJ"
    assert redact(text) == text


def test_unknown_format_or_level_is_refused() -> None:
    """A typo in the format or the level is an error, not silence."""
    with pytest.raises(ValueError, match="log format"):
        StructuredFormatter("yaml")
    with pytest.raises(ValueError, match="log level"):
        setup_logging("verbose")
