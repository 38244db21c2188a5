"""The entry cache wakes a sync stream only for the events that concern its agent."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from credo.selector import Selector
from server.authorization import EntryCache, Subscription
from server.datastore import Event, RegistrationEntry, SqlDataStore

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


def test_the_idle_poll_costs_one_statement_and_sees_another_servers_change(
    store: SqlDataStore, tmp_path: Path
) -> None:
    """Nothing changing, each poll of the change feed sends the database one statement
    (no BEGIN and COMMIT around it: the server's idle statement rate is about one per
    poll interval); an entry another server writes to the database is seen by the next."""
    cache = EntryCache(store, poll_interval=0.01)
    cache.load()
    polls = 0
    list_events = store.list_events

    def counted(after_id: int, limit: int = 1000) -> list[Event]:
        nonlocal polls
        polls += 1
        return list_events(after_id, limit)

    store.list_events = counted  # type: ignore[method-assign]

    async def idle(wanted: int) -> int:
        stop = asyncio.Event()
        before = store.statements_executed
        runner = asyncio.create_task(cache.run(stop))
        while polls < wanted:
            await asyncio.sleep(0.01)
        stop.set()
        await runner
        return store.statements_executed - before

    sent = asyncio.run(idle(20))
    assert polls >= 20 and sent == polls

    with SqlDataStore.open(f"sqlite:///{tmp_path / 'credo.db'}") as other:
        created = other.create_registration_entry(_entry("elsewhere", ALICE))
    asyncio.run(cache.catch_up())
    assert cache.index.get(created.id) is not None
