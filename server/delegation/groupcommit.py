"""Group commit: concurrent callers' writes, batched into one datastore transaction.

Each caller (a worker thread running one token exchange) hands in its item and blocks
until the item is written. Whoever arrives while no batch is being written becomes the
writer: it takes every item queued so far, writes them with one call (one transaction,
one commit), hands each caller its own result, and lets the next writer take what queued
up meanwhile. Alone, a caller writes its item at once; under load, one commit serves many
exchanges instead of each waiting its turn for the database's write lock.

A batch that raises raises in every caller of that batch: none of its items was written.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

__all__ = ["GroupCommit"]

_T = TypeVar("_T")
_R = TypeVar("_R")


class _Slot(Generic[_T, _R]):
    __slots__ = ("done", "error", "item", "result")

    def __init__(self, item: _T) -> None:
        self.item = item
        self.done = False
        self.result: _R | None = None
        self.error: BaseException | None = None


class GroupCommit(Generic[_T, _R]):
    """``submit(item)`` -> ``write(batch)[i]`` for that item, batched with concurrent
    submissions; ``write`` returns one result per item, in order."""

    def __init__(self, write: Callable[[Sequence[_T]], Sequence[_R]], max_batch: int = 256):
        self._write = write
        self._max_batch = max_batch
        self._cond = threading.Condition()
        self._queue: list[_Slot[_T, _R]] = []
        self._writing = False

    def submit(self, item: _T) -> _R:
        slot: _Slot[_T, _R] = _Slot(item)
        with self._cond:
            self._queue.append(slot)
        while True:
            with self._cond:
                while self._writing and not slot.done:
                    self._cond.wait()
                if slot.done:
                    break
                self._writing = True
                batch = self._queue[: self._max_batch]
                del self._queue[: self._max_batch]
            self._write_batch(batch)
        if slot.error is not None:
            raise slot.error
        return slot.result  # type: ignore[return-value]

    def _write_batch(self, batch: list[_Slot[_T, _R]]) -> None:
        try:
            results = self._write([s.item for s in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"group commit: {len(results)} results for {len(batch)} items")
            for s, result in zip(batch, results, strict=True):
                s.result = result
        except BaseException as exc:
            for s in batch:
                s.error = exc
        finally:
            with self._cond:
                for s in batch:
                    s.done = True
                self._writing = False
                self._cond.notify_all()
