"""The entry cache wakes a sync stream only for the events that concern its agent."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from credo.selector import Selector
from server.authorization import EntryCache, Subscription
from server.datastore import RegistrationEntry, SqlDataStore

TD = "spiffe://example.org"
ALICE = f"{TD}/credo/agent/join_token/alice"
BOB = f"{TD}/credo/agent/join_token/bob"
SERVER = f"{TD}/credo/server"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqlDataStore]:
    opened = SqlDataStore.open(f"sqlite:///{tmp_path / 'credo.db'}")
    try:
        yield opened
    finally:
        opened.close()


def _entry(spiffe_id: str, parent_id: str, *, node_alias: bool = False) -> RegistrationEntry:
    selector = Selector("k8s_psat", "cluster:c1") if node_alias else Selector("unix", "uid:1")
    return RegistrationEntry(f"{TD}/{spiffe_id}", parent_id, (selector,), node_alias=node_alias)


def _woken(cache: EntryCache, *subs: Subscription) -> list[bool]:
    """Apply the feed; which subscriptions have events waiting (then drain them)."""
    asyncio.run(cache.catch_up())
    woken = [bool(sub._events) for sub in subs]
    for sub in subs:
        sub._events.clear()
        sub._wake.clear()
    return woken


def test_an_entry_under_an_agent_wakes_only_that_agents_stream(store: SqlDataStore) -> None:
    """Creating, updating and deleting an entry under one agent wakes its stream only
    (and the unfiltered subscriptions); the other agent's stream sleeps on."""
    cache = EntryCache(store)
    cache.load()
    alice, bob, everything = cache.subscribe(ALICE), cache.subscribe(BOB), cache.subscribe()
    created = store.create_registration_entry(_entry("web", ALICE))
    assert _woken(cache, alice, bob, everything) == [True, False, True]
    store.delete_registration_entry(created.id)
    assert _woken(cache, alice, bob, everything) == [True, False, True]
    cache.unsubscribe(alice)
    store.create_registration_entry(_entry("db", ALICE))
    assert _woken(cache, alice, bob, everything) == [False, False, True]


@pytest.mark.parametrize(
    ("label", "entry"),
    [
        ("node-alias", _entry("cluster", SERVER, node_alias=True)),
        ("under-another-entry", _entry("child", f"{TD}/web")),
    ],
)
def test_changes_that_may_concern_any_agent_wake_every_stream(
    store: SqlDataStore, label: str, entry: RegistrationEntry
) -> None:
    """A node alias, or an entry whose parent is another entry, may be authorized for any
    agent: every stream is woken."""
    cache = EntryCache(store)
    cache.load()
    alice, bob = cache.subscribe(ALICE), cache.subscribe(BOB)
    store.create_registration_entry(entry)
    assert _woken(cache, alice, bob) == [True, True], label


def test_a_bundle_change_wakes_every_stream(store: SqlDataStore) -> None:
    """Bundle events are for every agent."""
    cache = EntryCache(store)
    cache.load()
    alice, bob = cache.subscribe(ALICE), cache.subscribe(BOB)
    store.set_bundle("example.org", b"{}")
    assert _woken(cache, alice, bob) == [True, True]
