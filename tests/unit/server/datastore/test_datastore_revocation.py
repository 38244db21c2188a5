"""Issued X.509-SVIDs, revocation (one serial, an entry, a banned node) and CRLs."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from ds_helpers import FakeClock

from credo.selector import Selector
from server import audit
from server.datastore import (
    AttestedNode,
    Crl,
    DelegatedToken,
    EventKind,
    IssuedJwtSvid,
    IssuedX509Svid,
    NotFound,
    RegistrationEntry,
    SqlDataStore,
)

TD = "spiffe://example.org"
AGENT = f"{TD}/credo/agent/join_token/t1"


def _entry(store: SqlDataStore, name: str = "web") -> RegistrationEntry:
    return store.create_registration_entry(
        RegistrationEntry(f"{TD}/{name}", AGENT, (Selector("unix", f"uid:{len(name)}"),))
    )


def _svid(
    serial: str, entry_id: str = "", *, expires_at: int = 1_700_003_600, **kw: str
) -> IssuedX509Svid:
    return IssuedX509Svid(
        serial=serial,
        authority_id=kw.get("authority_id", "ca1"),
        spiffe_id=f"{TD}/web",
        expires_at=expires_at,
        entry_id=entry_id,
        agent_id=kw.get("agent_id", AGENT),
    )


def _kinds(store: SqlDataStore, after: int) -> list[tuple[str, str]]:
    return [(e.kind.value, e.subject) for e in store.list_events(after)]


def test_issued_svids_are_recorded_and_found(store: SqlDataStore, clock: FakeClock) -> None:
    """A recorded SVID comes back by serial with the time it was recorded."""
    entry = _entry(store)
    assert store.create_issued_x509_svids([_svid("0a", entry.id)]) == frozenset()
    got = store.fetch_issued_x509_svid("0a")
    assert got is not None
    assert (got.entry_id, got.agent_id, got.authority_id) == (entry.id, AGENT, "ca1")
    assert got.issued_at == clock.now and got.revoked_at == 0
    assert store.fetch_issued_x509_svid("ff") is None


def test_revoke_serial_is_idempotent_and_emits_once(store: SqlDataStore, clock: FakeClock) -> None:
    """Revoking a serial marks it once; again changes nothing and writes no event."""
    store.create_issued_x509_svids([_svid("0a"), _svid("0b")])
    before = store.fetch_latest_event_id()
    clock.advance(5)
    first = store.revoke_x509_svid("0a", "key leaked")
    assert [s.serial for s in first.revoked] == ["0a"]
    assert first.revoked[0].revoked_at == clock.now
    assert _kinds(store, before) == [(EventKind.X509_SVIDS_REVOKED.value, "ca1")]
    clock.advance(5)
    again = store.revoke_x509_svid("0a", "other")
    assert again.revoked == ()
    got = store.fetch_issued_x509_svid("0a")
    assert got is not None and got.reason == "key leaked" and got.revoked_at == clock.now - 5
    assert store.fetch_latest_event_id() == before + 1
    assert [s.serial for s in store.list_issued_x509_svids(revoked=True)] == ["0a"]


def test_revoke_unknown_serial_is_not_found(store: SqlDataStore) -> None:
    """An unknown serial is refused and nothing is written."""
    before = store.fetch_latest_event_id()
    with pytest.raises(NotFound, match="serial"):
        store.revoke_x509_svid("abc", "x")
    assert store.fetch_latest_event_id() == before


def test_revoke_entry_revokes_unexpired_svids_and_blocks_new_ones(
    store: SqlDataStore, clock: FakeClock
) -> None:
    """Entry revocation revokes its unexpired SVIDs (not expired ones, not other entries')
    and refuses to record SVIDs signed for it afterwards."""
    entry, other = _entry(store), _entry(store, "db")
    store.create_issued_x509_svids(
        [
            _svid("01", entry.id),
            _svid("02", entry.id, authority_id="ca2"),
            _svid("03", entry.id, expires_at=clock.now - 1),
            _svid("04", other.id),
        ]
    )
    before = store.fetch_latest_event_id()
    result = store.revoke_registration_entry(entry.id, "compromised")
    assert result.entry_newly_revoked
    assert [s.serial for s in result.revoked] == ["01", "02"]
    assert set(_kinds(store, before)) == {
        (EventKind.ENTRY_REVOKED.value, entry.id),
        (EventKind.X509_SVIDS_REVOKED.value, "ca1"),
        (EventKind.X509_SVIDS_REVOKED.value, "ca2"),
    }
    assert store.list_revoked_entry_ids() == {entry.id}
    assert store.fetch_entry_revocation(entry.id) == (clock.now, "compromised")
    assert store.fetch_entry_revocation(other.id) is None
    refused = store.create_issued_x509_svids([_svid("05", entry.id), _svid("06", other.id)])
    assert refused == frozenset({entry.id})
    assert store.fetch_issued_x509_svid("05") is None
    assert store.fetch_issued_x509_svid("06") is not None
    again = store.revoke_registration_entry(entry.id, "again")
    assert again.revoked == () and not again.entry_newly_revoked


def test_revoke_unknown_entry_is_not_found(store: SqlDataStore) -> None:
    """An unknown entry id is refused and nothing is written."""
    with pytest.raises(NotFound):
        store.revoke_registration_entry("nope", "x")
    assert store.list_revoked_entry_ids() == set()


def test_deleting_a_revoked_entry_forgets_the_revocation(store: SqlDataStore) -> None:
    """The revocation goes with the entry (a new entry is a new identity record)."""
    entry = _entry(store)
    store.revoke_registration_entry(entry.id, "x")
    store.delete_registration_entry(entry.id)
    assert store.list_revoked_entry_ids() == set()


def test_ban_revokes_what_the_agent_obtained(store: SqlDataStore, clock: FakeClock) -> None:
    """Banning a node revokes every unexpired SVID it obtained, and only those."""
    store.create_attested_node(AttestedNode(AGENT, "join_token", cert_serial="aa"))
    other_agent = f"{TD}/credo/agent/join_token/t2"
    store.create_issued_x509_svids([_svid("aa"), _svid("01"), _svid("02", agent_id=other_agent)])
    node, result = store.ban_attested_node(AGENT, "stolen laptop")
    assert node.banned and node.cert_serial == "aa"
    assert [s.serial for s in result.revoked] == ["01", "aa"]
    assert store.ban_attested_node(AGENT, "again")[1].revoked == ()
    with pytest.raises(NotFound):
        store.ban_attested_node(f"{TD}/credo/agent/join_token/none", "x")


def test_prune_issued_drops_expired(store: SqlDataStore, clock: FakeClock) -> None:
    """Expired records are pruned; unexpired ones stay."""
    store.create_issued_x509_svids([_svid("01", expires_at=clock.now - 1), _svid("02")])
    assert store.prune_issued_x509_svids(clock.now) == 1
    assert [s.serial for s in store.list_issued_x509_svids()] == ["02"]


def test_crls_are_stored_replaced_and_pruned(store: SqlDataStore) -> None:
    """One CRL per authority; set replaces it and emits crl_updated; prune drops orphans."""
    before = store.fetch_latest_event_id()
    store.set_crl(Crl("ca1", 1, b"one", 10))
    store.set_crl(Crl("ca1", 2, b"two", 20))
    got = store.fetch_crl("ca1")
    assert got is not None and (got.number, got.data, got.next_update) == (2, b"two", 20)
    assert [c.authority_id for c in store.list_crls()] == ["ca1"]
    assert _kinds(store, before) == [(EventKind.CRL_UPDATED.value, "ca1")] * 2
    assert store.prune_crls() == 1  # no authority "ca1" in the journal
    assert store.list_crls() == []


def test_jwt_svids_are_revoked_by_jti_entry_and_ban(store: SqlDataStore, clock: FakeClock) -> None:
    """JWT-SVIDs are revoked by jti (idempotent, unknown jti refused), with their entry (and
    not recorded for a revoked entry), and with their agent; the list holds unexpired ones."""
    entry = _entry(store)
    store.create_attested_node(AttestedNode(AGENT, "join_token"))

    def jwt(jti: str, entry_id: str = "", expires_at: int = clock.now + 300) -> IssuedJwtSvid:
        return IssuedJwtSvid(jti, f"{TD}/web", expires_at, entry_id=entry_id, agent_id=AGENT)

    for record in (jwt("j1"), jwt("j2", entry.id), jwt("j3", entry.id, clock.now - 1)):
        assert store.create_issued_jwt_svid(record)
    before = store.fetch_latest_event_id()
    assert [j.jti for j in store.revoke_jwt_svid("j1", "leaked").revoked_jwts] == ["j1"]
    assert store.revoke_jwt_svid("j1", "again").revoked_jwts == ()
    assert _kinds(store, before) == [(EventKind.JWT_SVIDS_REVOKED.value, "")]
    with pytest.raises(NotFound, match="jti"):
        store.revoke_jwt_svid("nope", "x")
    result = store.revoke_registration_entry(entry.id, "x")
    assert [j.jti for j in result.revoked_jwts] == ["j2"]  # j3 has expired
    assert not store.create_issued_jwt_svid(jwt("j4", entry.id))
    assert store.fetch_issued_jwt_svid("j4") is None
    assert store.create_issued_jwt_svid(jwt("j5"))
    _, banned = store.ban_attested_node(AGENT, "x")
    assert [j.jti for j in banned.revoked_jwts] == ["j5"]
    assert [j.jti for j in store.list_revoked_jwt_svids(clock.now)] == ["j1", "j2", "j5"]
    assert store.prune_issued_jwt_svids(clock.now) == 1


def test_ban_revokes_the_delegated_tokens_of_identities_the_agent_held(
    store: SqlDataStore, clock: FakeClock
) -> None:
    """A ban revokes the unexpired delegated tokens issued to an identity the agent obtained
    an unexpired SVID (X.509 or JWT/WIT) for; tokens of other identities stay; the agent.ban
    record lists the revoked tokens."""
    web, db = _entry(store, "web"), _entry(store, "db")
    _entry(store, "other")
    store.create_attested_node(AttestedNode(AGENT, "join_token"))
    store.create_issued_x509_svids([_svid("a1", web.id, expires_at=clock.now + 300)])
    jwt = IssuedJwtSvid("w1", f"{TD}/db", clock.now + 300, entry_id=db.id, agent_id=AGENT)
    assert store.create_issued_jwt_svid(jwt)
    for jti, client in (("t-web", "web"), ("t-db", "db"), ("t-other", "other")):
        token = DelegatedToken(jti, f"{TD}/{client}", "alice", (f"{TD}/{client}",), clock.now + 60)
        assert store.create_delegated_token(token)
    _, banned = store.ban_attested_node(AGENT, "stolen")
    assert sorted(t.jti for t in banned.revoked_tokens) == ["t-db", "t-web"]
    assert store.fetch_delegated_token("t-other").revoked_at == 0  # type: ignore[union-attr]
    (record,) = [r for r in store.list_audit_records() if r.action == "agent.ban"]
    assert sorted(json.loads(record.details)["revoked_tokens"]) == ["t-db", "t-web"]
    _, again = store.ban_attested_node(AGENT, "stolen")
    assert again.revoked_tokens == ()


def test_issued_svids_and_their_audit_records_share_one_transaction(store: SqlDataStore) -> None:
    """``audit`` is told the revoked entries and its records are chained in the same
    transaction: a record that cannot be written leaves no SVID recorded either."""
    entry, revoked = _entry(store), _entry(store, "old")
    store.revoke_registration_entry(revoked.id, "compromised")
    told: list[frozenset[str]] = []

    def records(refused: frozenset[str]) -> list[audit.PendingRecord]:
        told.append(refused)
        return [audit.pending("x509_svid.issue", target="0a", details={"entry_id": entry.id})]

    head = store.fetch_audit_head()
    refused = store.create_issued_x509_svids(
        [_svid("0a", entry.id), _svid("0b", revoked.id)], audit=records
    )
    assert refused == frozenset({revoked.id}) and told == [refused]
    new_head = store.fetch_audit_head()
    assert new_head is not None and new_head.seq == (head.seq if head else 0) + 1
    assert (new_head.action, new_head.target) == ("x509_svid.issue", "0a")

    def secret(refused: frozenset[str]) -> list[audit.PendingRecord]:
        made = audit.pending("x509_svid.issue", target="0c")
        return [replace(made, reason="-----BEGIN PRIVATE KEY-----")]

    with pytest.raises(audit.InvalidAuditRecord):
        store.create_issued_x509_svids([_svid("0c", entry.id)], audit=secret)
    assert store.fetch_issued_x509_svid("0c") is None
    assert store.fetch_audit_head() == new_head


def test_credential_revoked_answers_for_serials_jtis_and_tokens(
    store: SqlDataStore, clock: FakeClock
) -> None:
    """Revoked itself, or issued for a revoked entry: revoked; unrecorded: not revoked."""
    entry, other = _entry(store), _entry(store, "db")
    store.create_issued_x509_svids([_svid("01", entry.id), _svid("02", other.id), _svid("03")])
    for jti, entry_id in (("j1", entry.id), ("j2", other.id), ("j3", "")):
        assert store.create_issued_jwt_svid(
            IssuedJwtSvid(jti, f"{TD}/web", clock.now + 300, entry_id=entry_id, agent_id=AGENT)
        )
    token = DelegatedToken("t1", f"{TD}/web", "alice", (f"{TD}/web",), expires_at=clock.now + 300)
    assert store.create_delegated_token(token)
    assert store.create_delegated_token(replace(token, jti="t2"))
    credentials = [
        ("serial", "01"), ("serial", "02"), ("serial", "03"), ("serial", "ff"),
        ("jti", "j1"), ("jti", "j2"), ("jti", "j3"), ("jti", "jx"),
        ("token", "t1"), ("token", "t2"), ("token", "tx"),
    ]  # fmt: skip

    def revoked() -> set[tuple[str, str]]:
        return {(k, i) for k, i in credentials if store.credential_revoked(k, i)}

    assert revoked() == set()
    store.revoke_registration_entry(other.id, "compromised")
    store.revoke_x509_svid("03", "leaked")
    store.revoke_jwt_svid("j3", "leaked")
    store.revoke_delegated_token("t2", "leaked")
    assert revoked() == {
        ("serial", "02"), ("serial", "03"), ("jti", "j2"), ("jti", "j3"), ("token", "t2")
    }  # fmt: skip
