"""Helpers shared by the datastore tests (imported by path: this directory is not a package)."""

from __future__ import annotations


class FakeClock:
    """A clock tests move by hand; starts at 1,700,000,000 (unix seconds)."""

    def __init__(self) -> None:
        self.now = 1_700_000_000

    def __call__(self) -> float:
        return float(self.now)

    def advance(self, seconds: int) -> None:
        self.now += seconds
