"""Options every admin command shares, and parameter types that check input locally.

A value that cannot be right (a selector without a type, a malformed SPIFFE ID, a TTL
that is not a positive duration) is refused before the server is contacted, with one
line naming the value and the option, and exit code 1.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

import click

from credo.durations import parse_duration
from credo.errors import CredoError
from credo.selector import Selector
from credo.selector_rules import check_selector
from credo.spiffe_id import SpiffeId, TrustDomain
from server.cli.client import DEFAULT_SOCKET, SOCKET_ENV
from server.cli.errors import CliError
from server.cli.output import OUTPUT_FORMATS

__all__ = [
    "DURATION",
    "INT32_MAX",
    "SELECTOR",
    "SPIFFE_ID",
    "TIMESTAMP",
    "TRUST_DOMAIN",
    "DurationType",
    "admin_options",
    "parse_timestamp",
]

F = TypeVar("F", bound=Callable[..., Any])

INT32_MAX = 2**31 - 1

if TYPE_CHECKING:  # click >= 8.5 types ParamType by (value, input); older clicks do not
    _StrParam = click.ParamType[str, Any]
    _IntParam = click.ParamType[int, Any]
    _SelectorParam = click.ParamType[Selector, Any]
else:
    _StrParam = _IntParam = _SelectorParam = click.ParamType


def _where(param: click.Parameter | None) -> str:
    if param is None or not param.opts:
        return ""
    return f" ({max(param.opts, key=len)})"


class SpiffeIdType(_StrParam):
    """``spiffe://<trust domain>/<path>``; the value stays a string, checked."""

    name = "spiffe-id"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            return str(SpiffeId.parse(str(value)))
        except CredoError as exc:
            raise CliError(f"{exc}{_where(param)}") from None


class TrustDomainType(_StrParam):
    """A trust domain name, ``example.org`` or ``spiffe://example.org``; gives the name."""

    name = "trust-domain"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            return TrustDomain.parse(str(value)).name
        except CredoError as exc:
            raise CliError(f"{exc}{_where(param)}") from None


class SelectorType(_SelectorParam):
    """``type:value``, e.g. ``unix:uid:1000``."""

    name = "type:value"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> Selector:
        if isinstance(value, Selector):
            return value
        try:
            selector = Selector.parse(str(value))
            check_selector(selector)
        except CredoError as exc:
            raise CliError(f"{exc}{_where(param)}") from None
        return selector


class DurationType(_IntParam):
    """A positive duration (``90``, ``90s``, ``10m``, ``1h``), converted to whole seconds."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            seconds = value
        else:
            try:
                seconds = parse_duration(str(value))
            except ValueError as exc:
                raise CliError(f"{exc}{_where(param)}") from None
        if seconds <= 0:
            raise CliError(f"invalid duration {value!r}: must be greater than zero{_where(param)}")
        if seconds > INT32_MAX:
            raise CliError(f"invalid duration {value!r}: too long{_where(param)}")
        return seconds


def parse_timestamp(value: str) -> int:
    """RFC 3339 (``2030-01-02T03:04:05Z``) or unix seconds, to unix seconds."""
    text = value.strip()
    if text.isdigit():
        return int(text)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"invalid time {value!r}: expected RFC 3339 (e.g. '2030-01-02T03:04:05Z') "
            "or unix seconds"
        ) from None
    if moment.tzinfo is None:
        raise ValueError(
            f"invalid time {value!r}: RFC 3339 needs a time zone (e.g. 'Z' or '+02:00')"
        )
    return int(moment.astimezone(UTC).timestamp())


class TimestampType(_IntParam):
    """A point in time: RFC 3339 or unix seconds, converted to unix seconds."""

    name = "time"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        try:
            return parse_timestamp(str(value))
        except ValueError as exc:
            raise CliError(f"{exc}{_where(param)}") from None


SPIFFE_ID = SpiffeIdType()
TRUST_DOMAIN = TrustDomainType()
SELECTOR = SelectorType()
DURATION = DurationType()
TIMESTAMP = TimestampType()


def admin_options(f: F) -> F:
    """Add ``--socket`` (env ``CREDO_SERVER_SOCKET``) and ``--output text|json``."""
    f = click.option(
        "--output",
        "output",
        type=click.Choice(OUTPUT_FORMATS),
        default="text",
        show_default=True,
        help="Output format.",
    )(f)
    f = click.option(
        "--socket",
        "socket_path",
        envvar=SOCKET_ENV,
        default=DEFAULT_SOCKET,
        show_default=True,
        metavar="PATH",
        help=f"Path to the server's admin socket (env {SOCKET_ENV}).",
    )(f)
    return f
