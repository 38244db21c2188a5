"""Join tokens (including the consume race), bundles and the CA authority journal."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest
from ds_helpers import FakeClock

from server.datastore import (
    AlreadyExists,
    Authority,
    EventKind,
    InvalidRequest,
    JoinToken,
    NotFound,
    SqlDataStore,
)


def test_join_token_lifecycle(store: SqlDataStore, clock: FakeClock) -> None:
    """A join token is stored, fetched, counted, consumed once and then gone."""
    token = JoinToken("secret-1", clock.now + 600, "spiffe://example.org/alias")
    assert store.create_join_token(token) == token
    assert store.fetch_join_token("secret-1") == token
    assert store.count_join_tokens() == 1
    assert store.consume_join_token("secret-1") == token
    assert store.consume_join_token("secret-1") is None
    assert store.fetch_join_token("secret-1") is None


def test_join_token_errors_do_not_leak_the_token(store: SqlDataStore) -> None:
    """Duplicate and missing token errors never include the secret itself."""
    store.create_join_token(JoinToken("s3cr3t-value", 10))
    with pytest.raises(AlreadyExists) as dup:
        store.create_join_token(JoinToken("s3cr3t-value", 10))
    with pytest.raises(NotFound) as missing:
        store.delete_join_token("other-s3cr3t")
    assert "s3cr3t" not in str(dup.value) and "s3cr3t" not in str(missing.value)
    assert store.delete_join_token("s3cr3t-value").token == "s3cr3t-value"


def test_prune_join_tokens(store: SqlDataStore) -> None:
    """Prune deletes tokens expiring before the cutoff and returns how many."""
    for i, expires in enumerate([10, 20, 30]):
        store.create_join_token(JoinToken(f"t{i}", expires))
    assert store.prune_join_tokens(25) == 2
    assert store.count_join_tokens() == 1


def _race_consume(stores: list[SqlDataStore], token: str) -> list[JoinToken | None]:
    """Have one thread per store call consume_join_token(token) at the same moment."""
    barrier = threading.Barrier(len(stores))
    results: list[JoinToken | None] = []
    lock = threading.Lock()

    def consume(s: SqlDataStore) -> None:
        barrier.wait()
        got = s.consume_join_token(token)
        with lock:
            results.append(got)

    threads = [threading.Thread(target=consume, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_consume_join_token_race_has_exactly_one_winner(db_url: str, clock: FakeClock) -> None:
    """Threads on two stores (separate pools, as two processes) race to consume: one wins, 20x."""
    first = SqlDataStore.open(db_url, clock=clock)
    second = SqlDataStore.open(db_url, clock=clock)
    try:
        for round_ in range(20):
            first.create_join_token(JoinToken(f"race-{round_}", clock.now + 600))
            results = _race_consume([first, second, first, second], f"race-{round_}")
            assert len(results) == 4
            assert sum(r is not None for r in results) == 1, round_
    finally:
        first.close()
        second.close()


def test_bundles_set_replace_list_delete(store: SqlDataStore) -> None:
    """Bundles are created, replaced, listed and deleted by trust domain, each with an event."""
    assert store.fetch_bundle("example.org") is None
    store.set_bundle("example.org", b"v1")
    store.set_bundle("example.org", b"v2")
    store.set_bundle("partner.org", b"\x00\xff")
    assert store.fetch_bundle("example.org") == b"v2"
    assert store.list_bundles() == {"example.org": b"v2", "partner.org": b"\x00\xff"}
    store.delete_bundle("partner.org")
    assert store.list_bundles() == {"example.org": b"v2"}
    with pytest.raises(NotFound, match=r"bundle for trust domain 'partner\.org' not found"):
        store.delete_bundle("partner.org")
    kinds = [(e.kind, e.subject) for e in store.list_events(0)]
    assert kinds == [
        (EventKind.BUNDLE_UPDATED, "example.org"),
        (EventKind.BUNDLE_UPDATED, "example.org"),
        (EventKind.BUNDLE_UPDATED, "partner.org"),
        (EventKind.BUNDLE_DELETED, "partner.org"),
    ]


def authority(aid: str, kind: str = "x509", status: str = "active", **kw: object) -> Authority:
    return Authority(aid, kind, status, not_after=2_000_000_000, public_data=b"der", **kw)  # type: ignore[arg-type]


def test_authorities_listed_oldest_first_per_kind(store: SqlDataStore, clock: FakeClock) -> None:
    """list_authorities filters by kind and orders by created_at, then insertion order."""
    store.create_authority(authority("x-old", status="old"))
    clock.advance(10)
    store.create_authority(authority("x-b"))
    store.create_authority(authority("x-a", status="prepared"))
    store.create_authority(authority("jwt-1", kind="jwt"))
    assert [a.authority_id for a in store.list_authorities("x509")] == ["x-old", "x-b", "x-a"]
    assert [a.authority_id for a in store.list_authorities("jwt")] == ["jwt-1"]
    assert len(store.list_authorities()) == 4
    assert store.fetch_authority("x-b") == store.list_authorities("x509")[1]


def test_authority_update_and_delete(store: SqlDataStore, clock: FakeClock) -> None:
    """Update replaces status and taint, keeping created_at; delete returns it; else NotFound."""
    created = store.create_authority(authority("a1", status="prepared"))
    assert created.created_at == clock.now
    updated = store.update_authority(authority("a1", status="active", tainted=True))
    assert updated.created_at == created.created_at
    assert store.fetch_authority("a1") == updated
    assert store.delete_authority("a1") == updated
    assert store.fetch_authority("a1") is None
    with pytest.raises(NotFound, match="authority 'a1' not found"):
        store.update_authority(authority("a1"))
    with pytest.raises(NotFound):
        store.delete_authority("a1")


def test_authority_validation(store: SqlDataStore) -> None:
    """A duplicate authority id is AlreadyExists; an unknown kind or status is InvalidRequest."""
    store.create_authority(authority("a1"))
    with pytest.raises(AlreadyExists):
        store.create_authority(authority("a1"))
    with pytest.raises(InvalidRequest, match="kind"):
        store.create_authority(authority("a2", kind="rsa"))
    with pytest.raises(InvalidRequest, match="status"):
        store.create_authority(authority("a3", status="retired"))


_CONSUMER = """
import json, sys, time
from server.datastore import SqlDataStore
url, start_at, count = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
store = SqlDataStore.open(url)
time.sleep(max(0.0, start_at - time.time()))
won = [i for i in range(count) if store.consume_join_token(f"proc-{i}") is not None]
store.close()
print(json.dumps(won))
"""


def test_consume_join_token_race_between_processes(db_url: str, store: SqlDataStore) -> None:
    """Two processes consuming the same 30 tokens at once: every token goes to exactly one."""
    count = 30
    for i in range(count):
        store.create_join_token(JoinToken(f"proc-{i}", 2_000_000_000))
    start_at = str(time.time() + 1.5)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CONSUMER, db_url, start_at, str(count)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    won = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(won[0] + won[1]) == list(range(count))
    assert store.count_join_tokens() == 0
