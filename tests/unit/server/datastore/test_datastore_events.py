"""The change feed: an event per mutation, monotonic ids, pruning, and commit listeners."""

from __future__ import annotations

import threading

import pytest
from ds_helpers import FakeClock

from credo.selector import Selector
from server.datastore import (
    AlreadyExists,
    AttestedNode,
    Event,
    EventKind,
    InvalidRequest,
    RegistrationEntry,
    SqlDataStore,
)

TD = "spiffe://example.org"
AGENT = f"{TD}/credo/agent/join_token/abc"


def entry(name: str) -> RegistrationEntry:
    return RegistrationEntry(f"{TD}/{name}", AGENT, (Selector("unix", f"uid:{name}"),))


def test_every_mutation_writes_one_event(store: SqlDataStore) -> None:
    """Entry, node and bundle changes each write one event naming their subject, ids increasing."""
    e = store.create_registration_entry(entry("a"))
    batch = store.create_registration_entries([entry("b"), entry("c")])
    store.update_registration_entry(e)
    store.delete_registration_entry(e.id)
    n = store.create_attested_node(AttestedNode(f"{TD}/agent", "join_token"))
    store.update_attested_node(n)
    store.set_node_selectors(n.spiffe_id, [Selector("a", "b")])
    store.delete_attested_node(n.spiffe_id)
    store.set_bundle("example.org", b"x")
    store.delete_bundle("example.org")
    got = store.list_events(0)
    assert [(ev.kind, ev.subject) for ev in got] == [
        (EventKind.ENTRY_CREATED, e.id),
        (EventKind.ENTRY_CREATED, batch[0].id),
        (EventKind.ENTRY_CREATED, batch[1].id),
        (EventKind.ENTRY_UPDATED, e.id),
        (EventKind.ENTRY_DELETED, e.id),
        (EventKind.NODE_CREATED, n.spiffe_id),
        (EventKind.NODE_UPDATED, n.spiffe_id),
        (EventKind.NODE_UPDATED, n.spiffe_id),
        (EventKind.NODE_DELETED, n.spiffe_id),
        (EventKind.BUNDLE_UPDATED, "example.org"),
        (EventKind.BUNDLE_DELETED, "example.org"),
    ]
    ids = [ev.id for ev in got]
    assert ids == sorted(set(ids))
    assert store.fetch_latest_event_id() == ids[-1]
    assert store.fetch_oldest_event_id() == ids[0]


def test_failed_change_writes_no_event(store: SqlDataStore) -> None:
    """A write that fails leaves no event behind."""
    store.create_registration_entry(entry("a"))
    latest = store.fetch_latest_event_id()
    with pytest.raises(AlreadyExists):
        store.create_registration_entry(entry("a"))
    assert store.fetch_latest_event_id() == latest


def test_list_events_after_id_and_limit(store: SqlDataStore) -> None:
    """list_events returns events after the given id, at most limit of them, in order."""
    store.create_registration_entries([entry(str(i)) for i in range(10)])
    all_events = store.list_events(0)
    assert len(all_events) == 10
    assert store.list_events(all_events[3].id, limit=2) == all_events[4:6]
    assert store.list_events(all_events[-1].id) == []
    with pytest.raises(InvalidRequest):
        store.list_events(0, limit=0)


def test_empty_feed_ids_are_zero(store: SqlDataStore) -> None:
    """With no events, the latest and oldest event ids are 0."""
    assert store.fetch_latest_event_id() == 0
    assert store.fetch_oldest_event_id() == 0


def test_prune_events_keeps_the_newest(store: SqlDataStore, clock: FakeClock) -> None:
    """prune_events deletes old events, raising the oldest id, but always keeps the newest."""
    store.create_registration_entries([entry("a"), entry("b")])
    clock.advance(100)
    store.create_registration_entry(entry("c"))
    latest = store.fetch_latest_event_id()
    assert store.prune_events(clock.now) == 2
    assert store.fetch_oldest_event_id() == latest
    assert store.prune_events(clock.now + 1000) == 0
    assert store.fetch_latest_event_id() == latest
    store.create_registration_entry(entry("d"))
    assert store.fetch_latest_event_id() > latest


def test_listener_runs_after_commit(store: SqlDataStore) -> None:
    """A listener gets the new events after commit, when other connections see the change."""
    seen: list[tuple[list[Event], bool]] = []

    def listener(events: list[Event]) -> None:
        visible = all(store.fetch_registration_entry(ev.subject) for ev in events)
        seen.append((events, visible))

    remove = store.add_listener(listener)
    made = store.create_registration_entries([entry("a"), entry("b")])
    assert len(seen) == 1
    events, visible = seen[0]
    assert visible
    assert [ev.subject for ev in events] == [e.id for e in made]
    assert events == store.list_events(0)
    remove()
    store.create_registration_entry(entry("c"))
    assert len(seen) == 1


def test_listener_not_called_on_rollback(store: SqlDataStore) -> None:
    """A failed write, or one that writes no event, does not call listeners."""
    calls: list[list[Event]] = []
    store.create_registration_entry(entry("a"))
    store.add_listener(calls.append)
    with pytest.raises(AlreadyExists):
        store.create_registration_entries([entry("b"), entry("a")])
    store.prune_registration_entries(0)
    assert calls == []


def test_broken_listener_does_not_fail_the_write(
    store: SqlDataStore, caplog: pytest.LogCaptureFixture
) -> None:
    """A listener that raises is logged; the write stands and later listeners still run."""
    calls: list[list[Event]] = []

    def broken(events: list[Event]) -> None:
        raise RuntimeError("boom")

    store.add_listener(broken)
    store.add_listener(calls.append)
    made = store.create_registration_entry(entry("a"))
    assert store.fetch_registration_entry(made.id) == made
    assert len(calls) == 1
    assert "datastore listener failed" in caplog.text


def test_concurrent_writers_get_distinct_increasing_ids(store: SqlDataStore) -> None:
    """Writers on several threads all succeed and their events get distinct ids."""
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(10):
                store.create_registration_entry(entry(f"t{t}-{i}"))
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    ids = [ev.id for ev in store.list_events(0)]
    assert len(ids) == len(set(ids)) == 40 == store.count_registration_entries()
