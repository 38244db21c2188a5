"""The audit trail in the datastore: records written with their change, chained, filtered."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest
from sqlalchemy import create_engine, text

from credo.selector import Selector
from server import audit
from server.audit import Actor, ChainBroken, InvalidAuditRecord, verify_chain
from server.datastore import (
    AlreadyExists,
    AttestedNode,
    JoinToken,
    ListAuditRecordsRequest,
    RegistrationEntry,
    SqlDataStore,
)

ADMIN = Actor("admin", "uid=1000 pid=42")


def _entry(path: str = "/web") -> RegistrationEntry:
    return RegistrationEntry(
        spiffe_id=f"spiffe://example.org{path}",
        parent_id="spiffe://example.org/credo/agent/join_token/x",
        selectors=(Selector("unix", "uid:1000"),),
    )


def _engine(db_url: str):  # type: ignore[no-untyped-def]
    url = db_url.replace("postgresql://", "postgresql+psycopg://", 1)
    return create_engine(url)


def test_each_change_writes_one_record_by_the_current_actor(store: SqlDataStore) -> None:
    """Entry create/update/delete, node ban/evict and a join token each leave one record."""
    with audit.acting_as(ADMIN, request_id="req-1"):
        created = store.create_registration_entry(_entry())
        store.update_registration_entry(replace(created, hint="h"))
        store.create_join_token(JoinToken("secret-join-token", 2_000_000_000, ""))
        node = store.create_attested_node(
            AttestedNode("spiffe://example.org/credo/agent/x", "join_token", cert_serial="ab")
        )
        store.update_attested_node(replace(node, banned=True))
        store.delete_attested_node(node.spiffe_id)
        store.delete_registration_entry(created.id)
    records = store.list_audit_records()
    assert [r.action for r in records] == [
        "entry.create",
        "entry.update",
        "join_token.create",
        "agent.attest",
        "agent.ban",
        "agent.evict",
        "entry.delete",
    ]
    assert {r.actor for r in records} == {ADMIN}
    assert {r.request_id for r in records} == {"req-1"}
    assert [r.seq for r in records] == list(range(1, 8))
    assert records[0].subject == "spiffe://example.org/web"
    assert records[0].target == created.id
    assert all("secret-join-token" not in r.target + r.details for r in records)
    assert verify_chain(records).last_seq == 7


def test_a_failed_change_writes_no_record(store: SqlDataStore) -> None:
    """A rolled-back change (a duplicate entry) leaves the trail as it was."""
    store.create_registration_entry(_entry())
    with pytest.raises(AlreadyExists):
        store.create_registration_entries([_entry("/other"), _entry()])
    assert [r.action for r in store.list_audit_records()] == ["entry.create"]


def test_outside_a_call_the_actor_is_the_server(store: SqlDataStore) -> None:
    """A change with no call context (CA rotation, housekeeping) is by the server."""
    audit.set_server_actor("server-1")
    try:
        store.create_registration_entry(_entry())
    finally:
        audit.set_server_actor("")
    assert store.list_audit_records()[0].actor == Actor("server", "server-1")


def test_filters(store: SqlDataStore, clock) -> None:  # type: ignore[no-untyped-def]
    """By SPIFFE ID (subject or actor), action (exact or prefix) and time window."""
    store.create_registration_entry(_entry("/a"))
    clock.advance(10)
    with audit.acting_as(Actor("agent", "spiffe://example.org/a")):
        store.append_audit_records(
            [audit.pending("x509_svid.issue", subject="spiffe://example.org/b")]
        )
    clock.advance(10)
    store.create_registration_entry(_entry("/b"))
    by_a = store.list_audit_records(ListAuditRecordsRequest(by_spiffe_id="spiffe://example.org/a"))
    assert [r.seq for r in by_a] == [1, 2]
    entries = store.list_audit_records(ListAuditRecordsRequest(by_action="entry."))
    assert [r.seq for r in entries] == [1, 3]
    t2 = store.list_audit_records()[1].time_ms
    window = store.list_audit_records(ListAuditRecordsRequest(since_ms=t2, until_ms=t2 + 1))
    assert [r.seq for r in window] == [2]
    assert store.fetch_audit_head() is not None
    assert store.fetch_audit_head().seq == 3  # type: ignore[union-attr]


def test_a_record_holding_a_jwt_is_refused(store: SqlDataStore) -> None:
    """A value shaped like a JWT never reaches the trail."""
    jwt = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"
    with pytest.raises(InvalidAuditRecord):
        store.append_audit_records([audit.pending("jwt_svid.issue", details={"token": jwt})])
    assert store.list_audit_records() == []


@pytest.mark.parametrize(
    ("tamper", "bad_seq", "words"),
    [
        (
            "UPDATE audit_records SET subject = 'spiffe://example.org/evil' WHERE seq = 2",
            2,
            "modified",
        ),
        ("DELETE FROM audit_records WHERE seq = 2", 2, "missing"),
        (
            "UPDATE audit_records SET seq = -1 WHERE seq = 2; "
            "UPDATE audit_records SET seq = 2 WHERE seq = 3; "
            "UPDATE audit_records SET seq = 3 WHERE seq = -1",
            2,
            "modified",
        ),
    ],
    ids=["modified", "deleted", "reordered"],
)
def test_tampering_in_the_database_breaks_the_chain_at_that_record(
    store: SqlDataStore, db_url: str, tamper: str, bad_seq: int, words: str
) -> None:
    """Editing, deleting or swapping one row makes verification fail at that row."""
    for path in ("/a", "/b", "/c", "/d"):
        store.create_registration_entry(_entry(path))
    verify_chain(store.list_audit_records())
    engine = _engine(db_url)
    try:
        with engine.begin() as conn:
            for statement in tamper.split("; "):
                conn.execute(text(statement))
    finally:
        engine.dispose()
    with pytest.raises(ChainBroken, match=words) as info:
        verify_chain(store.list_audit_records())
    assert info.value.seq == bad_seq


def test_concurrent_writers_on_two_stores_make_one_chain(db_url: str, clock) -> None:  # type: ignore[no-untyped-def]
    """Two stores (two servers) appending at once: one gap-free chain that verifies."""
    a = SqlDataStore.open(db_url, clock=clock)
    b = SqlDataStore.open(db_url, clock=clock)
    try:

        def write(store: SqlDataStore, name: str) -> None:
            for i in range(100):
                store.append_audit_records(
                    [
                        audit.pending("x509_svid.issue", target=f"{name}-{i}"),
                        audit.pending("x", target=name),
                    ]
                )

        threads = [
            threading.Thread(target=write, args=(s, f"{n}{k}"))
            for n, s in (("a", a), ("b", b))
            for k in range(2)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        records = a.list_audit_records()
        assert len(records) == 800
        assert verify_chain(records).last_seq == 800
    finally:
        a.close()
        b.close()


def test_pruning_keeps_the_rest_verifiable_and_a_silent_cut_is_caught(
    store: SqlDataStore, db_url: str
) -> None:
    """After prune_audit_records the trail verifies from its first kept record; deleting
    the oldest records directly, without a prune record, is reported."""
    from server.audit import verify_trail

    for path in ("/a", "/b", "/c", "/d", "/e"):
        store.create_registration_entry(_entry(path))
    assert store.prune_audit_records(3) == 2
    records = store.list_audit_records()
    assert [r.seq for r in records] == [3, 4, 5, 6]
    assert records[-1].action == "audit.prune"
    assert verify_trail(records).last_seq == 6
    with pytest.raises(ChainBroken, match=r"records 1-3 are missing and no audit\.prune"):
        verify_trail(records[1:])  # record 3 cut as well: the prune record does not name 4
    engine = _engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM audit_records WHERE seq = 6"))
            conn.execute(text("DELETE FROM audit_records WHERE seq = 3"))
    finally:
        engine.dispose()
    with pytest.raises(ChainBroken, match=r"missing and no audit\.prune"):
        verify_trail(store.list_audit_records())
