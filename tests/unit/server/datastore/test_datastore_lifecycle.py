"""Opening, migrating, reopening and closing the store; URLs; error injection."""

from __future__ import annotations

from pathlib import Path

import pytest
from ds_helpers import FakeClock
from sqlalchemy import create_engine, text

from credo.errors import CredoError
from credo.selector import Selector
from server.datastore import (
    SCHEMA_VERSION,
    DataStore,
    DataStoreError,
    RegistrationEntry,
    SchemaTooNew,
    SqlDataStore,
    UnsupportedDatabase,
)
from server.datastore.sql import _normalize_url

ENTRY = RegistrationEntry(
    "spiffe://example.org/web", "spiffe://example.org/agent", (Selector("unix", "uid:1"),)
)


def _engine_url(db_url: str) -> str:
    return str(_normalize_url(db_url).render_as_string(hide_password=False))


def _versions(db_url: str) -> list[int]:
    engine = create_engine(_engine_url(db_url))
    try:
        with engine.connect() as conn:
            return [row[0] for row in conn.execute(text("SELECT version FROM schema_version"))]
    finally:
        engine.dispose()


def test_store_satisfies_the_protocol(store: SqlDataStore) -> None:
    """SqlDataStore can be used wherever a DataStore is expected."""
    ds: DataStore = store
    assert ds.count_registration_entries() == 0


def test_reopen_keeps_data(db_url: str, clock: FakeClock) -> None:
    """Data written before close is there after opening the same database again."""
    with SqlDataStore.open(db_url, clock=clock) as first:
        created = first.create_registration_entry(ENTRY)
        first.set_bundle("example.org", b"bundle")
    with SqlDataStore.open(db_url, clock=clock) as second:
        assert second.fetch_registration_entry(created.id) == created
        assert second.fetch_bundle("example.org") == b"bundle"


def test_migrations_are_idempotent(db_url: str) -> None:
    """Opening a database repeatedly migrates once and records the current version once."""
    for _ in range(3):
        SqlDataStore.open(db_url).close()
    assert _versions(db_url) == [SCHEMA_VERSION]


def test_newer_schema_is_refused(db_url: str) -> None:
    """A database migrated by a newer Credo is refused with SchemaTooNew."""
    SqlDataStore.open(db_url).close()
    engine = create_engine(_engine_url(db_url))
    with engine.begin() as conn:
        conn.execute(text("UPDATE schema_version SET version = :v"), {"v": SCHEMA_VERSION + 5})
    engine.dispose()
    with pytest.raises(SchemaTooNew, match=f"version {SCHEMA_VERSION + 5} is newer") as info:
        SqlDataStore.open(db_url)
    assert (info.value.found, info.value.supported) == (SCHEMA_VERSION + 5, SCHEMA_VERSION)


def test_sqlite_file_runs_in_wal_mode_with_foreign_keys(tmp_path: Path) -> None:
    """A SQLite file store uses WAL, synchronous=NORMAL and enforced foreign keys."""
    ds = SqlDataStore.open(f"sqlite:///{tmp_path / 'x.db'}")
    with ds, ds._engine.connect() as conn:  # white-box: pragmas are per connection
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_in_memory_sqlite_works() -> None:
    """sqlite:///:memory: gives a working, private store."""
    with SqlDataStore.open("sqlite:///:memory:") as ds:
        ds.create_registration_entry(ENTRY)
        assert ds.count_registration_entries() == 1


@pytest.mark.parametrize(
    ("url", "driver"),
    [
        ("postgresql://u@h:5432/db", "postgresql+psycopg"),
        ("postgres://u@h/db", "postgresql+psycopg"),
        ("postgresql+psycopg://u@h/db", "postgresql+psycopg"),
        ("sqlite:///credo.db", "sqlite"),
    ],
)
def test_urls_are_translated(url: str, driver: str) -> None:
    """PostgreSQL URLs are pointed at psycopg 3; SQLite URLs are used as given."""
    assert _normalize_url(url).drivername == driver


@pytest.mark.parametrize("url", ["mysql://u@h/db", "not a url", "postgresql+psycopg2://u@h/db"])
def test_unsupported_urls_are_refused(url: str) -> None:
    """Anything but SQLite or PostgreSQL is UnsupportedDatabase (a CredoError and ValueError)."""
    with pytest.raises(UnsupportedDatabase) as info:
        SqlDataStore.open(url)
    assert isinstance(info.value, CredoError) and isinstance(info.value, ValueError)


def test_injected_error_fails_the_next_call_only(store: SqlDataStore) -> None:
    """set_next_error makes exactly the next call raise it, without touching the database."""
    store.set_next_error(DataStoreError("injected"))
    with pytest.raises(DataStoreError, match="injected"):
        store.create_registration_entry(ENTRY)
    assert store.count_registration_entries() == 0
    assert store.fetch_latest_event_id() == 0
    store.create_registration_entry(ENTRY)
    assert store.count_registration_entries() == 1


def test_closed_store_refuses_calls(db_url: str) -> None:
    """After close, calls raise DataStoreError."""
    ds = SqlDataStore.open(db_url)
    ds.close()
    with pytest.raises(DataStoreError, match="closed"):
        ds.count_registration_entries()


def test_statements_executed_counts_each_statement_sent(store: SqlDataStore) -> None:
    """The statement counter grows by the statements a call sends, and not while idle."""
    before = store.statements_executed
    assert before > 0  # the migrations
    assert store.statements_executed == before
    store.count_registration_entries()
    one_call = store.statements_executed - before
    assert one_call >= 1
    store.count_registration_entries()
    assert store.statements_executed - before == 2 * one_call


def test_statements_executed_counts_what_the_driver_sends_too(store: SqlDataStore) -> None:
    """A read in a transaction is its BEGIN, its statement and its COMMIT (psycopg sends
    the BEGIN itself on PostgreSQL; SQLite's is ours); the change feed's poll, one
    statement on its own, is one."""
    store.list_events(0)  # the held connection (PostgreSQL) is made
    store.count_registration_entries()  # a pooled connection is made (not pinged: new)
    before = store.statements_executed
    store.count_registration_entries()
    in_transaction = store.statements_executed - before
    # A pooled PostgreSQL connection is pinged when checked out again: one more.
    assert in_transaction == (4 if store._is_pg else 3)
    before = store.statements_executed
    for _ in range(5):
        store.list_events(0)
    assert store.statements_executed - before == 5
