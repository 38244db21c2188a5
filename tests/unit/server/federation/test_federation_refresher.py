"""The refresh loop: fetch on create, at the refresh hint, back off on failure, keep the
last good bundle. Real SQLite datastore; the fetcher is scripted (fetching itself is
tested in test_federation_fetch.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import generate_latest

from credo import Bundle, TrustDomain, generate_private_key
from server.datastore import FederationRelationship, SqlDataStore
from server.federation.errors import BundleFetchFailed
from server.federation.refresher import BundleRefresher, refresh_interval
from server.telemetry import Metrics

TD = TrustDomain.parse("partner.test")
REL = FederationRelationship("partner.test", "https://p.test/bundle", "https_web")


def bundle(seq: int, hint: int | None = 1) -> Bundle:
    return Bundle(TD, (), {f"k{seq}": generate_private_key().public_key()}, seq, hint)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def run_ticks(refresher: BundleRefresher, clock: Clock, steps: list[float]) -> None:
    """Advance the clock by each step and run one reload tick (and the refresh it starts)."""

    async def body() -> None:
        for step in steps:
            clock.now += step
            await refresher._tick()
            await asyncio.sleep(0)
            for _ in range(6000):  # up to 30 s on a loaded machine; usually one or two
                if all(s.task is None for s in refresher._states.values()):
                    break
                await asyncio.sleep(0.005)

    asyncio.run(body())


def make(
    tmp_path: Path,
    script: list[Callable[[], Bundle]],
    on_refresh: Callable[[str, bool], None] | None = None,
) -> tuple[SqlDataStore, BundleRefresher, Clock, list[Any]]:
    store = SqlDataStore.open(f"sqlite:///{tmp_path / 'ds.sqlite3'}")
    calls: list[Any] = []

    def fetcher(td: TrustDomain, url: str, profile: str, **kw: Any) -> Bundle:
        calls.append((td, url, profile))
        return script[min(len(calls), len(script)) - 1]()

    clock = Clock()
    return (
        store,
        BundleRefresher(
            store, TrustDomain.parse("me.test"), fetcher=fetcher, clock=clock, on_refresh=on_refresh
        ),
        clock,
        calls,
    )


def test_refresh_hint_is_bounded() -> None:
    """The hint is followed within [1 s, 1 h]; without one, 5 minutes."""
    assert refresh_interval(bundle(1, 2)) == 2
    assert refresh_interval(bundle(1, 0)) == 300
    assert refresh_interval(bundle(1, None)) == 300
    assert refresh_interval(bundle(1, 10**9)) == 3600


def test_a_new_relationship_is_fetched_at_once_then_at_its_hint(tmp_path: Path) -> None:
    """Created -> fetched on the next tick and stored; not again before the hint."""
    first, second = bundle(1, 30), bundle(2, 30)
    store, refresher, clock, calls = make(tmp_path, [lambda: first, lambda: second])
    store.create_federation_relationship(REL)
    run_ticks(refresher, clock, [0, 10, 10])
    assert len(calls) == 1
    assert Bundle.parse(TD, store.fetch_bundle("partner.test") or b"") == first
    run_ticks(refresher, clock, [15])
    assert len(calls) == 2
    assert Bundle.parse(TD, store.fetch_bundle("partner.test") or b"") == second
    assert store.fetch_federation_relationship("partner.test").last_error == ""  # type: ignore[union-attr]


def test_a_failure_keeps_the_last_good_bundle_and_backs_off(tmp_path: Path) -> None:
    """A failing endpoint leaves the stored bundle as it was, records the error, and is
    retried after 1 s, 2 s, 4 s ...; a success resets the backoff."""
    good = bundle(1, 1)

    def fail() -> Bundle:
        raise BundleFetchFailed("https://p.test/bundle: not a SPIFFE bundle: garbage")

    metrics = Metrics()
    store, refresher, clock, calls = make(
        tmp_path, [lambda: good, fail, fail, fail, lambda: good], metrics.on_federation_refresh
    )
    store.create_federation_relationship(REL)
    run_ticks(refresher, clock, [0])
    stored = store.fetch_bundle("partner.test")
    run_ticks(refresher, clock, [1])  # fails: retry in 1 s
    assert store.fetch_bundle("partner.test") == stored
    rel = store.fetch_federation_relationship("partner.test")
    assert rel is not None and "garbage" in rel.last_error
    run_ticks(refresher, clock, [1])  # fails again: retry in 2 s
    assert len(calls) == 3
    run_ticks(refresher, clock, [1])
    assert len(calls) == 3  # still backing off
    run_ticks(refresher, clock, [1])
    assert len(calls) == 4  # third failure: next in 4 s
    run_ticks(refresher, clock, [4])
    assert len(calls) == 5
    assert store.fetch_bundle("partner.test") == stored
    assert store.fetch_federation_relationship("partner.test").last_error == ""  # type: ignore[union-attr]
    exposed = generate_latest(metrics.registry).decode()
    assert (
        'credo_federation_bundle_refreshes_total{result="failure",trust_domain="partner.test"} 3.0'
        in exposed
    )
    assert (
        'credo_federation_bundle_refreshes_total{result="success",trust_domain="partner.test"} 2.0'
        in exposed
    )


def test_a_deleted_relationship_is_not_refreshed(tmp_path: Path) -> None:
    """After delete, nothing fetches the trust domain and its bundle stays gone."""
    store, refresher, clock, calls = make(tmp_path, [lambda: bundle(1, 1)])
    store.create_federation_relationship(REL)
    run_ticks(refresher, clock, [0])
    store.delete_federation_relationship("partner.test")
    run_ticks(refresher, clock, [5, 5])
    assert len(calls) == 1
    assert store.fetch_bundle("partner.test") is None


def test_relationships_are_read_again_only_when_the_generation_moves(tmp_path: Path) -> None:
    """With a generation (the server's: feed position and committed writes), a reload
    whose generation stands still reads nothing, until the fallback interval passes; a
    relationship written (the generation moves) is seen by the next reload."""
    store, refresher, clock, _calls = make(tmp_path, [lambda: bundle(1)])

    def generation() -> object:
        return store.writes_committed

    async def body() -> list[int]:
        sent = []
        for step in (0.0, 5.0, 5.0, 5.0, 30.0):
            clock.now += step
            before = store.statements_executed
            await refresher._tick(generation)
            sent.append(store.statements_executed - before)
        store.create_federation_relationship(REL)
        await refresher._tick(generation)
        return sent

    try:
        assert asyncio.run(body()) == [1, 0, 0, 0, 1]
        assert "partner.test" in refresher._states
    finally:
        store.close()
