"""Group commit: concurrent submissions share one write, each caller gets its own result."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest

from server.delegation.groupcommit import GroupCommit


def test_callers_queued_during_a_write_share_the_next_one() -> None:
    """While the first write is under way, eight more callers queue; one write serves them
    all, and each gets the result for its own item."""
    batches: list[list[int]] = []
    first_started = threading.Event()
    release = threading.Event()

    def write(items: Sequence[int]) -> list[int]:
        batches.append(list(items))
        if len(batches) == 1:
            first_started.set()
            release.wait(timeout=30)
        return [i * 10 for i in items]

    commit: GroupCommit[int, int] = GroupCommit(write)
    results: dict[int, int] = {}

    def caller(i: int) -> None:
        results[i] = commit.submit(i)

    first = threading.Thread(target=caller, args=(0,))
    first.start()
    assert first_started.wait(timeout=30)
    others = [threading.Thread(target=caller, args=(i,)) for i in range(1, 9)]
    for t in others:
        t.start()
    while True:  # every other caller is queued behind the first write
        with commit._cond:
            if len(commit._queue) == 8:
                break
        threading.Event().wait(0.001)
    release.set()
    for t in [first, *others]:
        t.join(timeout=30)
    assert results == {i: i * 10 for i in range(9)}
    assert batches[0] == [0]
    assert sorted(batches[1]) == list(range(1, 9)) and len(batches) == 2


def test_a_failed_write_raises_in_each_of_its_callers_and_the_next_one_works() -> None:
    calls = 0

    def write(items: Sequence[str]) -> list[str]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("database is gone")
        return [s.upper() for s in items]

    commit: GroupCommit[str, str] = GroupCommit(write)
    with pytest.raises(RuntimeError, match="database is gone"):
        commit.submit("a")
    assert commit.submit("b") == "B"


def test_a_writer_whose_item_did_not_fit_the_batch_writes_again() -> None:
    """max_batch 2, five queued: batches of at most two, every item written once."""
    batches: list[list[int]] = []
    gate = threading.Event()

    def write(items: Sequence[int]) -> list[int]:
        batches.append(list(items))
        if len(batches) == 1:
            gate.wait(timeout=30)
        return list(items)

    commit: GroupCommit[int, int] = GroupCommit(write, max_batch=2)
    threads = [threading.Thread(target=commit.submit, args=(0,))]
    threads[0].start()
    while not batches:
        threading.Event().wait(0.001)
    threads += [threading.Thread(target=commit.submit, args=(i,)) for i in range(1, 5)]
    for t in threads[1:]:
        t.start()
    while True:
        with commit._cond:
            if len(commit._queue) == 4:
                break
        threading.Event().wait(0.001)
    gate.set()
    for t in threads:
        t.join(timeout=30)
    assert all(len(b) <= 2 for b in batches)
    assert sorted(i for b in batches for i in b) == list(range(5))
