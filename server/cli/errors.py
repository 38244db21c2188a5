"""Errors of the ``credo-server`` command line.

::

    click.ClickException
    └── CliError        one line on stderr ("Error: <message>"), exit code 1

Everything a command can fail with on purpose (a gRPC status, a ``CredoError``, an
``OSError``, a ``ValueError``) is turned into a :class:`CliError` by the top-level group
(:mod:`server.cli.main`), so the user sees one line and never a traceback.
"""

from __future__ import annotations

import click

__all__ = ["CliError"]


class CliError(click.ClickException):
    """A failure to report as one line on stderr with exit code 1."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        # One line, whatever the cause put in the message.
        super().__init__(" ".join(str(message).split()))
