"""Authority owners (schema version 2), the v1 -> v2 migration, and the locked ``update_bundle``."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from ds_helpers import FakeClock
from sqlalchemy import create_engine, inspect, text

from server.datastore import SCHEMA_VERSION, Authority, AuthorityKind, SqlDataStore
from server.datastore import schema as schema_mod
from server.datastore.schema import MIGRATIONS
from server.datastore.sql import _normalize_url


def _engine_url(db_url: str) -> str:
    return str(_normalize_url(db_url).render_as_string(hide_password=False))


def _authority(aid: str, owner: str = "", kind: AuthorityKind = "x509") -> Authority:
    return Authority(aid, kind, "active", not_after=2_000_000_000, public_data=b"der", owner=owner)


def _make_v1_database(db_url: str) -> None:
    """A database as Credo with only migration step 1 left it, holding some data."""
    engine = create_engine(_engine_url(db_url))
    try:
        with engine.begin() as conn:
            schema_mod.schema_version.create(conn)
            schema_mod.MIGRATIONS[0](conn)
            conn.execute(text("INSERT INTO schema_version (version) VALUES (1)"))
            conn.execute(
                text(
                    "INSERT INTO authorities (authority_id, kind, status, tainted, not_after,"
                    " public_data, created_at) VALUES ('legacy-ca', 'x509', 'active', :f,"
                    " 2000000000, :d, 1700000000)"
                ),
                {"f": False, "d": b"cert-der"},
            )
            conn.execute(
                text(
                    "INSERT INTO bundles (trust_domain, data, updated_at)"
                    " VALUES ('example.org', :d, 1700000000)"
                ),
                {"d": b"old-bundle"},
            )
    finally:
        engine.dispose()


def _columns(db_url: str, table: str) -> set[str]:
    engine = create_engine(_engine_url(db_url))
    try:
        with engine.connect() as conn:
            return {c["name"] for c in inspect(conn).get_columns(table)}
    finally:
        engine.dispose()


def test_the_owner_column_is_step_two() -> None:
    """The owner column is migration step 2 (later steps follow it)."""

    assert SCHEMA_VERSION >= 2
    assert MIGRATIONS[1].__name__ == "_step_2_authority_owner"


def test_migrating_a_v1_database_keeps_data_and_adds_owner(db_url: str, clock: FakeClock) -> None:
    """A version-1 database opens at the current version, rows kept, owner "" on old rows."""
    _make_v1_database(db_url)
    assert "owner" not in _columns(db_url, "authorities")
    with SqlDataStore.open(db_url, clock=clock) as store:
        assert "owner" in _columns(db_url, "authorities")
        (legacy,) = store.list_authorities()
        assert legacy == Authority(
            "legacy-ca",
            "x509",
            "active",
            not_after=2_000_000_000,
            public_data=b"cert-der",
            created_at=1_700_000_000,
            owner="",
        )
        assert store.fetch_bundle("example.org") == b"old-bundle"
        store.create_authority(_authority("new-ca", owner="server-a"))
        assert [a.authority_id for a in store.list_authorities(owner="")] == ["legacy-ca"]
    with SqlDataStore.open(db_url, clock=clock) as again:  # idempotent: still the current version
        assert len(again.list_authorities()) == 2


def test_fresh_database_has_owner_column(db_url: str, clock: FakeClock) -> None:
    """A new database is created at version 2, with authorities.owner."""
    with SqlDataStore.open(db_url, clock=clock):
        assert "owner" in _columns(db_url, "authorities")


def test_list_authorities_filters_by_owner_and_update_keeps_it(store: SqlDataStore) -> None:
    """list_authorities(kind, owner) filters on both; update_authority can change the owner."""
    store.create_authority(_authority("a-x", "a"))
    store.create_authority(_authority("a-j", "a", kind="jwt"))
    store.create_authority(_authority("b-x", "b"))
    store.create_authority(_authority("legacy", ""))
    assert [r.authority_id for r in store.list_authorities(owner="a")] == ["a-x", "a-j"]
    assert [r.authority_id for r in store.list_authorities("x509", owner="b")] == ["b-x"]
    assert [r.authority_id for r in store.list_authorities("x509")] == ["a-x", "b-x", "legacy"]
    legacy = store.fetch_authority("legacy")
    assert legacy is not None and legacy.owner == ""
    store.update_authority(Authority("legacy", "x509", "old", 2_000_000_000, b"der", owner="b"))
    assert [r.authority_id for r in store.list_authorities("x509", owner="b")] == ["b-x", "legacy"]


def test_update_bundle_reads_current_and_authorities(store: SqlDataStore) -> None:
    """update_bundle passes the stored bundle and every row; None leaves it; bytes replace it."""
    store.create_authority(_authority("a-x", "a"))
    store.create_authority(_authority("b-x", "b"))
    seen: list[tuple[bytes | None, list[str]]] = []

    def build(current: bytes | None, rows: list[Authority]) -> bytes | None:
        seen.append((current, [r.authority_id for r in rows]))
        return b"v1" if current is None else None

    latest = store.fetch_latest_event_id()
    assert store.update_bundle("example.org", build) == b"v1"
    assert store.update_bundle("example.org", build) == b"v1"
    assert seen == [(None, ["a-x", "b-x"]), (b"v1", ["a-x", "b-x"])]
    assert store.fetch_bundle("example.org") == b"v1"
    # Only the write emitted a bundle_updated event.
    assert [e.kind.value for e in store.list_events(latest)] == ["bundle_updated"]


def test_concurrent_update_bundle_never_reuses_a_sequence(
    db_url: str, clock: FakeClock, tmp_path: Path
) -> None:
    """Two stores (as two servers) bumping a counter concurrently never lose an increment."""
    stores = [SqlDataStore.open(db_url, clock=clock) for _ in range(2)]
    handed_out: list[int] = []
    guard = threading.Lock()
    rounds = 25

    def bump(current: bytes | None, _rows: list[Authority]) -> bytes:
        value = int(current or b"0") + 1
        with guard:
            handed_out.append(value)
        return str(value).encode()

    def worker(store: SqlDataStore) -> None:
        for _ in range(rounds):
            store.update_bundle("example.org", bump)

    threads = [threading.Thread(target=worker, args=(s,)) for s in stores for _ in range(2)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        total = rounds * len(threads)
        assert stores[0].fetch_bundle("example.org") == str(total).encode()
        assert sorted(handed_out) == list(range(1, total + 1))
    finally:
        for s in stores:
            s.close()


@pytest.mark.parametrize("bad", [""])
def test_update_bundle_requires_trust_domain(store: SqlDataStore, bad: str) -> None:
    """An empty trust domain is refused before anything is read."""
    from server.datastore import InvalidRequest

    with pytest.raises(InvalidRequest):
        store.update_bundle(bad, lambda current, rows: b"x")
