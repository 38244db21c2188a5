"""The command-line error wrapper shared by ``credo-server`` and ``credo-agent``.

A command fails on purpose by raising :class:`CliError`, or by letting a
:class:`~credo.errors.CredoError`, an :class:`OSError` or a :class:`ValueError` escape;
:class:`CliGroup` (the top-level click group of both CLIs) turns each into one
``Error: ...`` line on stderr and exit code 1, never a traceback. A CLI with more kinds of
expected failure (the server's admin RPC errors) subclasses the group and catches those
around ``super().invoke``.
"""

from __future__ import annotations

import errno
from typing import Any

import click

from credo.errors import CredoError

__all__ = ["CliError", "CliGroup", "describe_os_error"]


class CliError(click.ClickException):
    """A failure to report as one line on stderr with exit code 1."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        # One line, whatever the cause put in the message.
        super().__init__(" ".join(str(message).split()))


def describe_os_error(exc: OSError) -> str:
    """``"<reason>: <file>"`` (or just the reason) for an OS error."""
    reason = exc.strerror or str(exc)
    if exc.filename is not None:
        return f"{reason}: {exc.filename}"
    return reason


class CliGroup(click.Group):
    """A click group that reports expected failures as one line, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CredoError as exc:
            raise CliError(str(exc)) from None
        except OSError as exc:
            if exc.errno == errno.EPIPE:
                raise
            raise CliError(describe_os_error(exc)) from None
        except ValueError as exc:
            raise CliError(str(exc)) from None
