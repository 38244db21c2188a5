"""Federation relationships in the datastore, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest

from server.datastore import AlreadyExists, FederationRelationship, NotFound, SqlDataStore
from server.datastore.models import EventKind

REL = FederationRelationship(
    "partner.org",
    "https://bundle.partner.org:8443/bundle",
    "https_spiffe",
    "spiffe://partner.org/credo/server",
)


def test_create_fetch_list_update_delete(store: SqlDataStore) -> None:
    """A relationship round-trips; update keeps created_at; delete returns what was there."""
    created = store.create_federation_relationship(REL)
    assert created.created_at > 0
    assert store.fetch_federation_relationship("partner.org") == created
    assert store.list_federation_relationships() == [created]
    changed = store.update_federation_relationship(
        FederationRelationship(
            "partner.org", "https://web.partner.org/bundle", "https_web", last_error="timeout"
        )
    )
    assert changed.bundle_endpoint_profile == "https_web"
    assert changed.created_at == created.created_at
    assert changed.last_error == "timeout"
    assert store.delete_federation_relationship("partner.org") == changed
    assert store.fetch_federation_relationship("partner.org") is None


def test_a_second_relationship_with_the_same_trust_domain_is_refused(store: SqlDataStore) -> None:
    """One relationship per trust domain; the second create changes nothing."""
    store.create_federation_relationship(REL)
    with pytest.raises(AlreadyExists):
        store.create_federation_relationship(REL)
    assert len(store.list_federation_relationships()) == 1


def test_missing_relationships_are_not_found(store: SqlDataStore) -> None:
    """Updating or deleting a relationship that does not exist raises NotFound."""
    with pytest.raises(NotFound):
        store.update_federation_relationship(REL)
    with pytest.raises(NotFound):
        store.delete_federation_relationship("partner.org")


def test_deleting_a_relationship_deletes_the_federated_bundle(store: SqlDataStore) -> None:
    """With the relationship gone, its trust domain's bundle goes too (and agents hear
    bundle_deleted), so nothing trusts that domain any more."""
    store.create_federation_relationship(REL)
    store.set_bundle("partner.org", b'{"keys": []}')
    latest = store.fetch_latest_event_id()
    store.delete_federation_relationship("partner.org")
    assert store.fetch_bundle("partner.org") is None
    kinds = [(e.kind, e.subject) for e in store.list_events(latest)]
    assert (EventKind.BUNDLE_DELETED, "partner.org") in kinds
