"""Entry owners and purposes (schema version 4): stored, filtered, and added to old databases."""

from __future__ import annotations

from dataclasses import replace

from ds_helpers import FakeClock
from sqlalchemy import create_engine, text

from credo.selector import Selector
from server.datastore import ListRegistrationEntriesRequest, RegistrationEntry, SqlDataStore
from server.datastore import schema as schema_mod
from server.datastore.sql import _normalize_url

TD = "spiffe://example.org"


def _entry(name: str, owner: str = "", purpose: str = "") -> RegistrationEntry:
    return RegistrationEntry(
        spiffe_id=f"{TD}/{name}",
        parent_id=f"{TD}/agent",
        selectors=(Selector("unix", f"uid:{len(name)}"),),
        owner=owner,
        purpose=purpose,
    )


def test_owner_and_purpose_round_trip_and_filter(store: SqlDataStore) -> None:
    """An entry keeps its owner and purpose; ``by_owner`` lists only that owner's entries."""
    alice = store.create_registration_entry(
        _entry("reviewer", "alice@example.com", "reviews pull requests")
    )
    store.create_registration_entry(_entry("builder", "bob@example.com"))
    store.create_registration_entry(_entry("nobody"))
    assert store.fetch_registration_entry(alice.id) == alice
    assert alice.owner == "alice@example.com" and alice.purpose == "reviews pull requests"
    found = store.list_registration_entries(
        ListRegistrationEntriesRequest(by_owner="alice@example.com")
    ).entries
    assert [e.id for e in found] == [alice.id]
    changed = store.update_registration_entry(replace(alice, owner="team-review"))
    assert store.fetch_registration_entry(alice.id) == changed
    assert not store.list_registration_entries(
        ListRegistrationEntriesRequest(by_owner="alice@example.com")
    ).entries


def test_migrating_a_v3_database_gives_entries_no_owner(db_url: str, clock: FakeClock) -> None:
    """Entries written before version 4 load with owner and purpose ``""``."""
    engine = create_engine(str(_normalize_url(db_url).render_as_string(hide_password=False)))
    try:
        with engine.begin() as conn:
            schema_mod.schema_version.create(conn)
            for step in schema_mod.MIGRATIONS[:3]:  # up to the step before entry owners
                step(conn)
            conn.execute(text("INSERT INTO schema_version (version) VALUES (3)"))
            conn.execute(
                text(
                    "INSERT INTO registration_entries (entry_id, spiffe_id, parent_id,"
                    " x509_svid_ttl, jwt_svid_ttl, admin, downstream, node_alias, hint,"
                    " expires_at, revision_number, created_at, unique_key, selectors_key,"
                    " selector_count) VALUES ('old', 'spiffe://example.org/old',"
                    " 'spiffe://example.org/agent', 0, 0, :f, :f, :f, '', 0, 0, 1, 'u', 's', 0)"
                ),
                {"f": False},
            )
    finally:
        engine.dispose()
    with SqlDataStore.open(db_url, clock=clock) as store:
        old = store.fetch_registration_entry("old")
        assert old is not None and old.owner == "" and old.purpose == ""
        assert store.list_registration_entries(
            ListRegistrationEntriesRequest(by_owner="")
        ).entries == [old]
