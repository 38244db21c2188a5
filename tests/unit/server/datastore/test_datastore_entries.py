"""Registration entries: CRUD, duplicates, batches, filters, pagination, pruning."""

from __future__ import annotations

import gc
import threading

import pytest
from ds_helpers import FakeClock

from credo.selector import Selector
from server.datastore import (
    AlreadyExists,
    BySelectors,
    EventKind,
    InvalidRequest,
    ListRegistrationEntriesRequest,
    MatchBehavior,
    NotFound,
    RegistrationEntry,
    SqlDataStore,
)

TD = "spiffe://example.org"
AGENT = f"{TD}/credo/agent/join_token/abc"


def sels(*texts: str) -> tuple[Selector, ...]:
    return tuple(Selector.parse(t) for t in texts)


def entry(name: str, *selectors: str, parent: str = AGENT, **kw: object) -> RegistrationEntry:
    return RegistrationEntry(
        spiffe_id=f"{TD}/{name}",
        parent_id=parent,
        selectors=sels(*(selectors or ("unix:uid:1000",))),
        **kw,  # type: ignore[arg-type]
    )


def list_ids(store: SqlDataStore, **kw: object) -> list[str]:
    req = ListRegistrationEntriesRequest(**kw)  # type: ignore[arg-type]
    return [e.spiffe_id.rsplit("/", 1)[1] for e in store.list_registration_entries(req).entries]


def test_create_assigns_id_and_server_fields(store: SqlDataStore, clock: FakeClock) -> None:
    """Create assigns a uuid id, created_at from the clock and revision 0, normalising fields."""
    given = entry(
        "web",
        "unix:uid:1000",
        "k8s:ns:prod",
        dns_names=("b.example", "a.example", "b.example"),
        federates_with=("z.org", "a.org"),
        revision_number=7,
        x509_svid_ttl=600,
        hint="web",
        admin=True,
    )
    created = store.create_registration_entry(given)
    assert len(created.id) == 36
    assert created.created_at == clock.now
    assert created.revision_number == 0
    assert created.selectors == sels("k8s:ns:prod", "unix:uid:1000")
    assert created.dns_names == ("b.example", "a.example")
    assert created.federates_with == ("a.org", "z.org")
    assert store.fetch_registration_entry(created.id) == created


def test_create_keeps_a_given_id(store: SqlDataStore) -> None:
    """An id given by the caller is kept."""
    created = store.create_registration_entry(entry("web", id="my-id"))
    assert created.id == "my-id"
    assert store.fetch_registration_entry("my-id") == created


def test_fetch_missing_returns_none(store: SqlDataStore) -> None:
    """Fetching an unknown id returns None, and the batch fetch leaves it out."""
    kept = store.create_registration_entry(entry("web"))
    assert store.fetch_registration_entry("nope") is None
    assert store.fetch_registration_entries(["nope", kept.id]) == {kept.id: kept}


def test_duplicate_is_refused_whatever_the_selector_order(store: SqlDataStore) -> None:
    """Same SPIFFE ID, parent and selector set is AlreadyExists, in any selector order."""
    store.create_registration_entry(entry("web", "unix:uid:1", "unix:gid:2"))
    with pytest.raises(AlreadyExists, match="already exists") as info:
        store.create_registration_entry(entry("web", "unix:gid:2", "unix:uid:1"))
    assert info.value.index is None
    assert store.count_registration_entries() == 1


def test_same_id_is_refused(store: SqlDataStore) -> None:
    """Reusing an entry id is AlreadyExists and names the id."""
    store.create_registration_entry(entry("web", id="e1"))
    with pytest.raises(AlreadyExists, match="'e1' already exists"):
        store.create_registration_entry(entry("db", id="e1"))


def test_entries_differing_in_one_part_are_not_duplicates(store: SqlDataStore) -> None:
    """Changing the SPIFFE ID, parent or selector set makes a distinct entry."""
    store.create_registration_entry(entry("web", "unix:uid:1"))
    store.create_registration_entry(entry("web2", "unix:uid:1"))
    store.create_registration_entry(entry("web", "unix:uid:1", parent=f"{TD}/other"))
    store.create_registration_entry(entry("web", "unix:uid:1", "unix:gid:1"))
    assert store.count_registration_entries() == 4


def test_invalid_entry_is_refused(store: SqlDataStore) -> None:
    """An entry without a SPIFFE ID or with a negative TTL is InvalidRequest."""
    with pytest.raises(InvalidRequest, match="SPIFFE ID is empty"):
        store.create_registration_entry(RegistrationEntry("", AGENT, sels("unix:uid:1")))
    with pytest.raises(InvalidRequest, match="TTL"):
        store.create_registration_entry(entry("web", x509_svid_ttl=-1))


def test_batch_create_is_all_or_nothing(store: SqlDataStore) -> None:
    """A batch whose second item duplicates a stored entry creates nothing and says index 1."""
    store.create_registration_entry(entry("existing"))
    before = store.fetch_latest_event_id()
    with pytest.raises(AlreadyExists) as info:
        store.create_registration_entries([entry("new"), entry("existing"), entry("other")])
    assert info.value.index == 1
    assert str(info.value).startswith("item 1: ")
    assert store.count_registration_entries() == 1
    assert store.fetch_latest_event_id() == before


def test_batch_duplicate_within_itself_is_refused(store: SqlDataStore) -> None:
    """Two equal entries in one batch fail at the second one, creating nothing."""
    with pytest.raises(AlreadyExists) as info:
        store.create_registration_entries([entry("a"), entry("b"), entry("a")])
    assert info.value.index == 2
    assert store.count_registration_entries() == 0


def test_batch_invalid_item_reports_its_index(store: SqlDataStore) -> None:
    """An invalid item in a batch is InvalidRequest with its index."""
    bad = RegistrationEntry(f"{TD}/x", "", sels("unix:uid:1"))
    with pytest.raises(InvalidRequest) as info:
        store.create_registration_entries([entry("a"), bad])
    assert info.value.index == 1
    assert store.count_registration_entries() == 0


def test_batch_create_returns_entries_in_order(store: SqlDataStore) -> None:
    """A successful batch returns the stored entries in the order given."""
    made = store.create_registration_entries([entry(f"w{i}", f"unix:uid:{i}") for i in range(50)])
    assert [e.spiffe_id for e in made] == [f"{TD}/w{i}" for i in range(50)]
    assert store.fetch_registration_entries(e.id for e in made) == {e.id: e for e in made}
    assert store.create_registration_entries([]) == []


def test_update_replaces_fields_and_bumps_revision(store: SqlDataStore, clock: FakeClock) -> None:
    """Update replaces every field, keeps created_at and adds one to the revision each time."""
    created = store.create_registration_entry(entry("web", dns_names=("a.example",)))
    clock.advance(100)
    changed = RegistrationEntry(
        id=created.id,
        spiffe_id=f"{TD}/web-v2",
        parent_id=f"{TD}/other-agent",
        selectors=sels("k8s:sa:web"),
        x509_svid_ttl=300,
        jwt_svid_ttl=60,
        dns_names=("b.example",),
        admin=True,
        downstream=True,
        hint="v2",
        expires_at=clock.now + 3600,
        federates_with=("partner.org",),
    )
    first = store.update_registration_entry(changed)
    assert first.revision_number == 1
    assert first.created_at == created.created_at
    assert store.fetch_registration_entry(created.id) == first
    assert store.update_registration_entry(changed).revision_number == 2
    assert store.fetch_registration_entry(created.id).revision_number == 2  # type: ignore[union-attr]


def test_update_missing_entry_is_not_found(store: SqlDataStore) -> None:
    """Updating an unknown id raises NotFound naming the id."""
    with pytest.raises(NotFound, match="registration entry 'ghost' not found"):
        store.update_registration_entry(entry("web", id="ghost"))


def test_update_into_a_duplicate_is_refused_and_changes_nothing(store: SqlDataStore) -> None:
    """An update duplicating another entry is AlreadyExists and leaves the entry unchanged."""
    store.create_registration_entry(entry("a", "unix:uid:1"))
    b = store.create_registration_entry(entry("b", "unix:uid:2", dns_names=("b.example",)))
    with pytest.raises(AlreadyExists):
        store.update_registration_entry(
            RegistrationEntry(
                id=b.id, spiffe_id=f"{TD}/a", parent_id=AGENT, selectors=sels("unix:uid:1")
            )
        )
    assert store.fetch_registration_entry(b.id) == b


def test_delete_returns_entry_and_removes_it(store: SqlDataStore) -> None:
    """Delete returns the entry as it was; it is then gone and can be created again."""
    created = store.create_registration_entry(entry("web", dns_names=("a.example",)))
    assert store.delete_registration_entry(created.id) == created
    assert store.fetch_registration_entry(created.id) is None
    again = store.create_registration_entry(entry("web", dns_names=("a.example",)))
    assert again.selectors == created.selectors and again.dns_names == created.dns_names
    with pytest.raises(NotFound) as info:
        store.delete_registration_entry(created.id)
    assert str(info.value) == f"registration entry '{created.id}' not found"


def test_batch_delete_is_all_or_nothing(store: SqlDataStore) -> None:
    """Deleting several ids where one is missing deletes nothing and reports its index."""
    a = store.create_registration_entry(entry("a"))
    b = store.create_registration_entry(entry("b"))
    with pytest.raises(NotFound) as info:
        store.delete_registration_entries([a.id, "missing", b.id])
    assert info.value.index == 1
    assert store.count_registration_entries() == 2
    assert store.delete_registration_entries([b.id, a.id]) == [b, a]
    assert store.count_registration_entries() == 0


def test_prune_deletes_only_expired_entries(store: SqlDataStore, clock: FakeClock) -> None:
    """Prune deletes entries expiring before the cutoff and keeps never-expiring ones."""
    store.create_registration_entry(entry("never"))
    old = store.create_registration_entry(entry("old", expires_at=clock.now - 10))
    store.create_registration_entry(entry("later", expires_at=clock.now + 10))
    assert store.prune_registration_entries(clock.now) == 1
    assert store.fetch_registration_entry(old.id) is None
    assert store.count_registration_entries() == 2
    last = store.list_events(0)[-1]
    assert (last.kind, last.subject) == (EventKind.ENTRY_DELETED, old.id)


def test_list_filters_combine(store: SqlDataStore) -> None:
    """SPIFFE ID, parent, hint and downstream filters each narrow the list and combine with AND."""
    store.create_registration_entry(entry("a", "unix:uid:1", hint="x"))
    store.create_registration_entry(entry("b", "unix:uid:2", hint="x", downstream=True))
    store.create_registration_entry(entry("a", "unix:uid:3", parent=f"{TD}/p2"))
    assert list_ids(store) and len(list_ids(store)) == 3
    assert sorted(list_ids(store, by_spiffe_id=f"{TD}/a")) == ["a", "a"]
    assert list_ids(store, by_parent_id=f"{TD}/p2") == ["a"]
    assert sorted(list_ids(store, by_hint="x")) == ["a", "b"]
    assert list_ids(store, by_downstream=True) == ["b"]
    assert list_ids(store, by_hint="x", by_spiffe_id=f"{TD}/b") == ["b"]
    assert list_ids(store, by_spiffe_id=f"{TD}/none") == []


@pytest.mark.parametrize(
    ("match", "expected"),
    [
        (MatchBehavior.EXACT, ["ab"]),
        (MatchBehavior.SUBSET, ["a", "ab", "b"]),
        (MatchBehavior.SUPERSET, ["ab", "abc"]),
        (MatchBehavior.ANY, ["a", "ab", "abc", "b", "bd"]),
    ],
)
def test_selector_match_behaviours(
    store: SqlDataStore, match: MatchBehavior, expected: list[str]
) -> None:
    """Each MatchBehavior selects entries as SPIRE does for the given set {a, b}."""
    for name, selectors in {
        "a": ["t:a"],
        "b": ["t:b"],
        "ab": ["t:a", "t:b"],
        "abc": ["t:a", "t:b", "t:c"],
        "bd": ["t:b", "t:d"],
        "c": ["t:c"],
    }.items():
        store.create_registration_entry(entry(name, *selectors))
    by = BySelectors(sels("t:b", "t:a"), match)
    assert sorted(list_ids(store, by_selectors=by)) == expected


def test_selector_filter_needs_selectors(store: SqlDataStore) -> None:
    """An empty selector filter is InvalidRequest."""
    with pytest.raises(InvalidRequest, match="at least one selector"):
        list_ids(store, by_selectors=BySelectors((), MatchBehavior.ANY))


@pytest.mark.parametrize("page_size", [1, 7, 25, 100])
def test_pagination_returns_every_entry_exactly_once(store: SqlDataStore, page_size: int) -> None:
    """Following next_page_token visits every entry exactly once and then ends."""
    made = store.create_registration_entries([entry(f"w{i}", f"unix:uid:{i}") for i in range(25)])
    seen: list[RegistrationEntry] = []
    token = ""
    pages = 0
    while True:
        resp = store.list_registration_entries(
            ListRegistrationEntriesRequest(page_size=page_size, page_token=token)
        )
        assert len(resp.entries) <= page_size
        seen.extend(resp.entries)
        pages += 1
        token = resp.next_page_token
        if not token:
            break
    assert sorted(seen, key=lambda e: e.id) == sorted(made, key=lambda e: e.id)
    assert len({e.id for e in seen}) == 25
    assert pages == -(-25 // page_size)


def test_pagination_with_a_filter(store: SqlDataStore) -> None:
    """Paging a filtered list returns exactly the matching entries, with their children."""
    store.create_registration_entries(
        [
            entry(f"w{i}", f"unix:uid:{i}", "k8s:ns:prod" if i % 2 else "k8s:ns:dev")
            for i in range(20)
        ]
    )
    by = BySelectors(sels("k8s:ns:prod"), MatchBehavior.SUPERSET)
    token, seen = "", []
    while True:
        resp = store.list_registration_entries(
            ListRegistrationEntriesRequest(by_selectors=by, page_size=3, page_token=token)
        )
        seen.extend(resp.entries)
        token = resp.next_page_token
        if not token:
            break
    assert len(seen) == 10
    assert all(Selector("k8s", "ns:prod") in e.selectors and len(e.selectors) == 2 for e in seen)


def test_bad_page_request_is_refused(store: SqlDataStore) -> None:
    """A garbled page token or a negative page size is InvalidRequest."""
    for token in ["%%%", "bm9kZXM6eA", "eA"]:  # garbage, a nodes token, no kind
        with pytest.raises(InvalidRequest, match="page token"):
            store.list_registration_entries(ListRegistrationEntriesRequest(page_token=token))
    with pytest.raises(InvalidRequest, match="page size"):
        store.list_registration_entries(ListRegistrationEntriesRequest(page_size=-1))


def _race_create(stores: list[SqlDataStore], candidate: RegistrationEntry) -> list[str]:
    """Create ``candidate`` from one thread per store at the same moment; return outcomes."""
    barrier = threading.Barrier(len(stores))
    outcomes: list[str] = []

    def create(s: SqlDataStore) -> None:
        barrier.wait()
        try:
            s.create_registration_entry(candidate)
            outcomes.append("ok")
        except AlreadyExists:
            outcomes.append("exists")

    threads = [threading.Thread(target=create, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(outcomes)


def test_concurrent_duplicate_creates_have_one_winner(db_url: str, clock: FakeClock) -> None:
    """Two stores racing to create the same entry: one succeeds, the other gets AlreadyExists."""
    stores = [SqlDataStore.open(db_url, clock=clock) for _ in range(2)]
    try:
        for round_ in range(10):
            assert _race_create(stores, entry(f"race{round_}")) == ["exists", "ok"], round_
        assert stores[0].count_registration_entries() == 10
    finally:
        for s in stores:
            s.close()


def test_bulk_list_matches_fetch_and_restores_gc(store: SqlDataStore) -> None:
    """Listing thousands of entries (the bulk path) returns them intact and leaves gc as it was."""
    made = store.create_registration_entries(
        [
            entry(
                f"bulk{i}",
                f"unix:uid:{i}",
                f"unix:gid:{i % 7}",
                dns_names=(f"b{i}.example", f"a{i}.example"),
                federates_with=("partner.org",) if i % 3 == 0 else (),
            )
            for i in range(6000)
        ]
    )
    assert gc.isenabled()
    listed = store.list_registration_entries().entries
    assert gc.isenabled()
    assert listed == sorted(made, key=lambda e: e.id)
    sample = listed[::997]
    assert store.fetch_registration_entries(e.id for e in sample) == {e.id: e for e in sample}


def test_full_listing_read_in_pages_keeps_every_child_row(
    store: SqlDataStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The unfiltered listing (the cache load) reads entries in id pages; each page's
    selectors, DNS names and federations come from its own id range, none lost or moved
    across a page boundary."""
    import server.datastore.sql as sql

    monkeypatch.setattr(sql, "_LOAD_PAGE", 3)
    created = store.create_registration_entries(
        [
            entry(
                f"w{i}",
                f"unix:uid:{i}",
                "unix:gid:7",
                parent=AGENT if i % 2 else f"{TD}/other",
                dns_names=(f"w{i}.example", "shared.example"),
                federates_with=("b.org", f"f{i}.org") if i % 3 else (),
            )
            for i in range(10)
        ]
    )
    listed = store.list_registration_entries().entries
    assert listed == sorted(created, key=lambda e: e.id)
    assert [e.id for e in listed] == sorted(e.id for e in created)
