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
import os
import sys
from pathlib import Path
from typing import Any

import click

from credo.errors import CredoError

__all__ = ["CliError", "CliGroup", "describe_os_error", "read_secret"]


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


def read_secret(value: str | None, path: str | None, *, flag: str, env: str) -> str | None:
    """A secret from ``--<flag> VALUE``, ``--<flag>-file PATH`` or ``$<env>``, in that order.

    ``-`` as the value or the path reads it from stdin. Secrets read from a file, stdin or
    the environment lose surrounding whitespace (the newline ``echo`` adds). None when none
    of them is given; :class:`CliError` when both flags are, or the source is empty.
    """
    if value is not None and path is not None:
        raise CliError(f"give --{flag} or --{flag}-file, not both")
    text: str
    if value == "-" or path == "-":
        text, source = sys.stdin.read(), "stdin"
    elif path is not None:
        try:
            text, source = Path(path).read_text(), path
        except OSError as exc:
            raise CliError(f"--{flag}-file: cannot read {path}: {exc.strerror or exc}") from None
    elif value is not None:
        return value
    else:
        text, source = os.environ.get(env, ""), f"${env}"
        if not text:
            return None
    secret = text.strip()
    if not secret:
        raise CliError(f"--{flag}: {source} is empty")
    return secret


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
