"""Shared helpers for the CA tests (imported by conftest and the test modules)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from credo.spiffe_id import TrustDomain
from server.ca.manager import AuthorityManager

TD = TrustDomain("example.org")
START = datetime(2030, 1, 1, tzinfo=UTC)


class FakeClock:
    """A settable clock shared by the manager, the CA and the datastore."""

    def __init__(self, now: datetime = START) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def unix(self) -> float:
        return self.now.timestamp()

    def advance(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


MakeManager = Callable[..., AuthorityManager]
