"""Errors of the ``credo-server`` command line.

::

    click.ClickException
    └── CliError        one line on stderr ("Error: <message>"), exit code 1

Everything a command can fail with on purpose (a gRPC status, a ``CredoError``, an
``OSError``, a ``ValueError``) is turned into a :class:`CliError` by the top-level group
(:mod:`server.cli.main`), so the user sees one line and never a traceback. The class and
the shared part of that wrapper live in :mod:`credo._cli`, used by ``credo-agent`` too.
"""

from __future__ import annotations

from credo._cli import CliError

__all__ = ["CliError"]
