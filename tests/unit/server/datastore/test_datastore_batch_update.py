"""Batch update of registration entries: one transaction, all items or none."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from credo.selector import Selector
from server.datastore import (
    AlreadyExists,
    Event,
    EventKind,
    InvalidRequest,
    NotFound,
    RegistrationEntry,
    SqlDataStore,
)

TD = "spiffe://example.org"
AGENT = f"{TD}/credo/agent/join_token/abc"


def entry(name: str, uid: str, **kw: object) -> RegistrationEntry:
    return RegistrationEntry(
        spiffe_id=f"{TD}/{name}",
        parent_id=AGENT,
        selectors=(Selector("unix", f"uid:{uid}"),),
        **kw,  # type: ignore[arg-type]
    )


def as_changed(stored: RegistrationEntry, name: str, uid: str, **kw: object) -> RegistrationEntry:
    return entry(name, uid, id=stored.id, **kw)


def recorder(store: SqlDataStore) -> list[list[Event]]:
    heard: list[list[Event]] = []
    store.add_listener(heard.append)
    return heard


def assert_unchanged(store: SqlDataStore, before: list[RegistrationEntry], last_event: int) -> None:
    assert store.fetch_registration_entries([e.id for e in before]) == {e.id: e for e in before}
    assert store.fetch_latest_event_id() == last_event


def test_batch_update_bumps_revisions_and_writes_events(store: SqlDataStore) -> None:
    """A batch update replaces every field, bumps each revision once and writes one event each."""
    a = store.create_registration_entry(entry("a", "1", dns_names=("a.example",)))
    b = store.create_registration_entry(entry("b", "2", federates_with=("x.org",)))
    after = store.fetch_latest_event_id()
    heard = recorder(store)
    got = store.update_registration_entries(
        [
            as_changed(b, "b2", "20", dns_names=("b.example",), hint="b"),
            as_changed(a, "a2", "10", x509_svid_ttl=60),
        ]
    )
    assert [(e.id, e.revision_number) for e in got] == [(b.id, 1), (a.id, 1)]
    assert [e.created_at for e in got] == [b.created_at, a.created_at]
    stored = store.fetch_registration_entries([a.id, b.id])
    assert stored == {e.id: e for e in got}
    assert stored[b.id].dns_names == ("b.example",) and stored[b.id].federates_with == ()
    assert stored[a.id].dns_names == () and stored[a.id].x509_svid_ttl == 60
    events = store.list_events(after)
    assert [(ev.kind, ev.subject) for ev in events] == [
        (EventKind.ENTRY_UPDATED, b.id),
        (EventKind.ENTRY_UPDATED, a.id),
    ]
    assert heard == [events]
    assert store.update_registration_entries([got[1]])[0].revision_number == 2


def test_batch_update_may_take_an_identity_an_earlier_item_released(
    store: SqlDataStore,
) -> None:
    """Items apply in order, so a later item may take the identity an earlier one moved off."""
    a = store.create_registration_entry(entry("a", "1"))
    b = store.create_registration_entry(entry("b", "2"))
    got = store.update_registration_entries([as_changed(a, "c", "3"), as_changed(b, "a", "1")])
    assert [e.spiffe_id for e in got] == [f"{TD}/c", f"{TD}/a"]


def test_conflict_on_second_item_changes_nothing(store: SqlDataStore) -> None:
    """A second item duplicating another entry is AlreadyExists at 1; the first is untouched."""
    a = store.create_registration_entry(entry("a", "1"))
    b = store.create_registration_entry(entry("b", "2"))
    c = store.create_registration_entry(entry("c", "3"))
    last = store.fetch_latest_event_id()
    heard = recorder(store)
    with pytest.raises(AlreadyExists) as info:
        store.update_registration_entries(
            [as_changed(a, "a2", "10", hint="changed"), as_changed(b, "c", "3")]
        )
    assert info.value.index == 1
    assert str(info.value).startswith("item 1: ")
    assert_unchanged(store, [a, b, c], last)
    first = store.fetch_registration_entry(a.id)
    assert first is not None and first.revision_number == 0 and first.hint == ""
    assert first.spiffe_id == f"{TD}/a"
    assert heard == []


def test_two_items_taking_the_same_identity_is_already_exists(store: SqlDataStore) -> None:
    """Two items updated to the same identity are AlreadyExists at the second; nothing changes."""
    a = store.create_registration_entry(entry("a", "1"))
    b = store.create_registration_entry(entry("b", "2"))
    last = store.fetch_latest_event_id()
    with pytest.raises(AlreadyExists, match="duplicates item 0") as info:
        store.update_registration_entries([as_changed(a, "x", "9"), as_changed(b, "x", "9")])
    assert info.value.index == 1
    assert_unchanged(store, [a, b], last)


def test_unknown_id_is_not_found_and_changes_nothing(store: SqlDataStore) -> None:
    """An unknown id at index 1 is NotFound with that index; the first item is untouched."""
    a = store.create_registration_entry(entry("a", "1"))
    last = store.fetch_latest_event_id()
    heard = recorder(store)
    with pytest.raises(NotFound, match="registration entry 'ghost' not found") as info:
        store.update_registration_entries([as_changed(a, "a2", "10"), entry("g", "7", id="ghost")])
    assert info.value.index == 1
    assert_unchanged(store, [a], last)
    assert heard == []


@pytest.mark.parametrize(
    ("second", "message"),
    [
        (lambda a: as_changed(a, "a3", "11"), "appears twice"),
        (lambda a: entry("x", "5", id="other", x509_svid_ttl=-1), "TTLs"),
    ],
    ids=["repeated-id", "invalid-item"],
)
def test_invalid_item_is_invalid_request_and_changes_nothing(
    store: SqlDataStore,
    second: Callable[[RegistrationEntry], RegistrationEntry],
    message: str,
) -> None:
    """A repeated id or a malformed item is InvalidRequest at its index and changes nothing."""
    a = store.create_registration_entry(entry("a", "1"))
    last = store.fetch_latest_event_id()
    with pytest.raises(InvalidRequest, match=message) as info:
        store.update_registration_entries([as_changed(a, "a2", "10"), second(a)])
    assert info.value.index == 1
    assert_unchanged(store, [a], last)


def test_injected_failure_changes_nothing(store: SqlDataStore) -> None:
    """A datastore failure before the write leaves every entry as it was."""
    a = store.create_registration_entry(entry("a", "1"))
    last = store.fetch_latest_event_id()
    store.set_next_error(RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        store.update_registration_entries([as_changed(a, "a2", "10")])
    assert_unchanged(store, [a], last)


def test_empty_batch_update_is_a_no_op(store: SqlDataStore) -> None:
    """An empty batch returns nothing and writes no event."""
    last = store.fetch_latest_event_id()
    assert store.update_registration_entries([]) == []
    assert store.fetch_latest_event_id() == last


def test_single_update_errors_carry_no_index(store: SqlDataStore) -> None:
    """The single-entry update shares the batch path but its errors carry no index."""
    a = store.create_registration_entry(entry("a", "1"))
    store.create_registration_entry(entry("b", "2"))
    with pytest.raises(AlreadyExists) as dup:
        store.update_registration_entry(as_changed(a, "b", "2"))
    with pytest.raises(NotFound) as missing:
        store.update_registration_entry(entry("g", "7", id="ghost"))
    assert dup.value.index is None and missing.value.index is None
    assert not str(dup.value).startswith("item")
