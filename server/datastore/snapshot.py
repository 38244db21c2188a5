"""The last read of a table, reused while nothing says the table changed.

The server re-reads some small tables every few seconds only to notice a change (the CA
journal for rotation, the federation relationships). On an idle server those reads are
most of its statements. A :class:`Snapshot` skips them while a *generation* stands still:
a value the caller derives from what would move on a change (the server uses its change
feed's position, which moves on every other server's write that publishes an event, with
its datastore's count of committed writes). It still reads again after ``max_age``
seconds, for changes that publish no event.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["Snapshot"]

_T = TypeVar("_T")


class Snapshot(Generic[_T]):
    """``read()`` remembered with the generation it was made at, for ``max_age`` seconds."""

    def __init__(
        self,
        read: Callable[[], _T],
        max_age: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._read = read
        self._max_age = max_age
        self._clock = clock
        self._lock = threading.Lock()
        self._held: tuple[object, float, _T] | None = None

    def get(self, generation: Callable[[], object] | None) -> _T:
        """The rows: the last read while ``generation()`` is what it was then and the read
        is younger than ``max_age``, else a new read. ``None``: always a new read."""
        if generation is None:
            return self._read()
        seen = generation()  # before the read: a write made during it moves it again
        now = self._clock()
        with self._lock:
            held = self._held
        if held is not None and held[0] == seen and now - held[1] < self._max_age:
            return held[2]
        rows = self._read()
        with self._lock:
            self._held = (seen, now, rows)
        return rows
