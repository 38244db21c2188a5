"""Delegated access tokens: recorded, revoked by jti, by entry and by actor chain (cascade)."""

from __future__ import annotations

import pytest
from ds_helpers import FakeClock

from credo.selector import Selector
from server.datastore import (
    DelegatedToken,
    EventKind,
    NotFound,
    RegistrationEntry,
    SqlDataStore,
)

TD = "spiffe://example.org"
A, B, C = f"{TD}/agents/a", f"{TD}/agents/b", f"{TD}/agents/a_b"


def _token(jti: str, *actors: str, exp: int = 1_700_009_000) -> DelegatedToken:
    return DelegatedToken(
        jti=jti, client_id=actors[0], subject="alice", actors=actors, expires_at=exp
    )


def _entry(store: SqlDataStore, spiffe_id: str) -> RegistrationEntry:
    uid = f"uid:{len(spiffe_id)}"
    return store.create_registration_entry(
        RegistrationEntry(spiffe_id, f"{TD}/host", (Selector("unix", uid),))
    )


def test_recorded_and_revoked_once_and_listed(store: SqlDataStore, clock: FakeClock) -> None:
    _entry(store, A)
    assert store.create_delegated_token(_token("t1", A))
    got = store.fetch_delegated_token("t1")
    assert got is not None and got.actors == (A,) and got.issued_at == clock.now
    assert store.fetch_delegated_token("nope") is None
    before = store.fetch_latest_event_id()
    done = store.revoke_delegated_token("t1", "leaked")
    assert [t.jti for t in done.revoked_tokens] == ["t1"]
    kinds = [e.kind for e in store.list_events(before)]
    assert kinds == [EventKind.JWT_SVIDS_REVOKED]
    assert store.revoke_delegated_token("t1", "again").revoked_tokens == ()
    listed = store.list_revoked_jwt_svids(clock.now)
    assert [(j.jti, j.spiffe_id) for j in listed] == [("t1", A)]
    assert store.list_revoked_jwt_svids(1_700_009_000) == []
    with pytest.raises(NotFound):
        store.revoke_delegated_token("nope", "x")


def test_entry_revoke_takes_its_tokens_and_cascade_the_chain(store: SqlDataStore) -> None:
    entry = _entry(store, A)
    _entry(store, B)
    store.create_delegated_token(_token("own", A))
    store.create_delegated_token(_token("onward", B, A))
    store.create_delegated_token(_token("prefix", B, C))  # a_b is not a: no match
    done = store.revoke_registration_entry(entry.id, "rogue")
    assert [t.jti for t in done.revoked_tokens] == ["own"]
    cascaded = store.revoke_registration_entry(entry.id, "rogue", cascade=True)
    assert [t.jti for t in cascaded.revoked_tokens] == ["onward"]
    prefix = store.fetch_delegated_token("prefix")
    assert prefix is not None and prefix.revoked_at == 0
    # The identity is revoked: no token is recorded (so none is handed out) for it any more.
    assert store.create_delegated_token(_token("late", A)) is False
    assert store.fetch_delegated_token("late") is None


def test_no_token_is_recorded_for_an_identity_without_entries(store: SqlDataStore) -> None:
    assert store.create_delegated_token(_token("t", A)) is False
    assert store.fetch_delegated_token("t") is None


def test_prune_forgets_expired_tokens(store: SqlDataStore, clock: FakeClock) -> None:
    _entry(store, A)
    store.create_delegated_token(_token("old", A, exp=clock.now - 1))
    store.create_delegated_token(_token("new", A))
    assert store.prune_delegated_tokens(clock.now) == 1
    assert store.fetch_delegated_token("old") is None
