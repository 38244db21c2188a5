"""Errors of the bundle publisher plugins.

::

    CredoError
    └── PublishFailed      a plugin could not write the bundle where it keeps it; the
                           publishing loop logs it and tries again with backoff

Messages are lower case and name the destination, so an operator can act on one line.
"""

from __future__ import annotations

from credo.errors import CredoError

__all__ = ["PublishFailed"]


class PublishFailed(CredoError):
    """The bundle could not be published to ``destination``; the message says why."""

    def __init__(self, destination: str, reason: str) -> None:
        self.destination = destination
        self.reason = reason
        super().__init__(f"cannot publish the bundle to {destination}: {reason}")
