"""Attested nodes: CRUD, selectors, filters, pagination, pruning."""

from __future__ import annotations

from pathlib import Path

import pytest
from ds_helpers import FakeClock

from credo.selector import Selector
from server.datastore import (
    AlreadyExists,
    AttestedNode,
    ListAttestedNodesRequest,
    NotFound,
    SqlDataStore,
)

TD = "spiffe://example.org"


def node(name: str, **kw: object) -> AttestedNode:
    fields: dict[str, object] = {
        "attestation_type": "join_token",
        "cert_serial": "0a1b",
        "cert_not_after": 1_700_003_600,
        "selectors": (Selector("join_token", name),),
    }
    fields.update(kw)
    return AttestedNode(f"{TD}/credo/agent/join_token/{name}", **fields)  # type: ignore[arg-type]


def test_create_and_fetch(store: SqlDataStore, clock: FakeClock) -> None:
    """A created node is fetched back with created_at and updated_at from the clock."""
    created = store.create_attested_node(
        node("n1", selectors=(Selector("b", "2"), Selector("a", "1"), Selector("b", "2")))
    )
    assert created.created_at == created.updated_at == clock.now
    assert created.selectors == (Selector("a", "1"), Selector("b", "2"))
    assert store.fetch_attested_node(created.spiffe_id) == created
    assert store.fetch_attested_node(f"{TD}/missing") is None


def test_duplicate_node_is_refused(store: SqlDataStore) -> None:
    """Creating a node whose SPIFFE ID is recorded is AlreadyExists."""
    store.create_attested_node(node("n1"))
    with pytest.raises(AlreadyExists, match=r"attested node .* already exists"):
        store.create_attested_node(node("n1", cert_serial="ff"))


def test_update_replaces_fields_and_keeps_created_at(store: SqlDataStore, clock: FakeClock) -> None:
    """Update replaces serials, ban flag and selectors, keeps created_at and moves updated_at."""
    created = store.create_attested_node(node("n1"))
    clock.advance(60)
    changed = node(
        "n1",
        cert_serial="02",
        new_cert_serial="03",
        new_cert_not_after=1_700_007_200,
        banned=True,
        selectors=(Selector("k8s", "node:x"),),
    )
    updated = store.update_attested_node(changed)
    assert updated.created_at == created.created_at
    assert updated.updated_at == clock.now
    assert store.fetch_attested_node(created.spiffe_id) == updated
    with pytest.raises(NotFound, match=r"attested node .* not found"):
        store.update_attested_node(node("ghost"))


def test_set_node_selectors(store: SqlDataStore) -> None:
    """set_node_selectors replaces the node's selectors; an unknown node is NotFound."""
    created = store.create_attested_node(node("n1"))
    new = (Selector("k8s", "pod:b"), Selector("k8s", "pod:a"))
    result = store.set_node_selectors(created.spiffe_id, new)
    assert result.selectors == tuple(sorted(new))
    assert store.fetch_attested_node(created.spiffe_id) == result
    with pytest.raises(NotFound):
        store.set_node_selectors(f"{TD}/ghost", new)


def test_delete_returns_node(store: SqlDataStore) -> None:
    """Delete returns the node as it was; deleting again is NotFound."""
    created = store.create_attested_node(node("n1"))
    assert store.delete_attested_node(created.spiffe_id) == created
    assert store.fetch_attested_node(created.spiffe_id) is None
    assert store.count_attested_nodes() == 0
    with pytest.raises(NotFound):
        store.delete_attested_node(created.spiffe_id)


def test_list_filters(store: SqlDataStore) -> None:
    """Attestation type, banned and expires-before filters narrow the list."""
    store.create_attested_node(node("a", cert_not_after=100))
    store.create_attested_node(node("b", cert_not_after=300, banned=True))
    store.create_attested_node(node("c", attestation_type="k8s_psat", cert_not_after=200))

    def names(**kw: object) -> list[str]:
        resp = store.list_attested_nodes(ListAttestedNodesRequest(**kw))  # type: ignore[arg-type]
        return [n.spiffe_id.rsplit("/", 1)[1] for n in resp.nodes]

    assert names() == ["a", "b", "c"]
    assert names(by_attestation_type="k8s_psat") == ["c"]
    assert names(by_banned=True) == ["b"]
    assert names(by_banned=False) == ["a", "c"]
    assert names(by_expires_before=250) == ["a", "c"]
    assert names(by_expires_before=250, by_attestation_type="join_token") == ["a"]


def test_list_pagination_covers_every_node_once(store: SqlDataStore) -> None:
    """Paging through nodes with next_page_token returns each node exactly once."""
    for i in range(11):
        store.create_attested_node(node(f"n{i:02d}"))
    seen: list[AttestedNode] = []
    token = ""
    while True:
        resp = store.list_attested_nodes(ListAttestedNodesRequest(page_size=4, page_token=token))
        seen.extend(resp.nodes)
        token = resp.next_page_token
        if not token:
            break
    assert [n.spiffe_id for n in seen] == sorted(n.spiffe_id for n in seen)
    assert len({n.spiffe_id for n in seen}) == 11 == store.count_attested_nodes()
    assert all(len(n.selectors) == 1 for n in seen)


def test_prune_keeps_banned_and_unexpired_nodes(store: SqlDataStore) -> None:
    """Prune deletes expired nodes but keeps banned ones and those still valid."""
    store.create_attested_node(node("old", cert_not_after=100))
    store.create_attested_node(node("banned", cert_not_after=100, banned=True))
    store.create_attested_node(node("fresh", cert_not_after=1000))
    assert store.prune_attested_nodes(500) == 1
    assert store.fetch_attested_node(f"{TD}/credo/agent/join_token/old") is None
    assert store.count_attested_nodes() == 2


def test_stale_node_update_does_not_lift_a_ban(tmp_path: Path) -> None:
    """RenewAgent and the renewed-serial switch write back a node read before a concurrent
    ban (read, ban, write): the ban must survive; only eviction clears it."""
    from dataclasses import replace

    from server.datastore.models import AttestedNode
    from server.datastore.sql import SqlDataStore

    ds = SqlDataStore.open(f"sqlite:///{tmp_path / 'ds.sqlite'}")
    try:
        agent = "spiffe://example.org/credo/agent/join_token/t"
        ds.create_attested_node(AttestedNode(agent, "join_token", (), "a1", 1))
        stale = ds.fetch_attested_node(agent)
        assert stale is not None and not stale.banned
        fresh = ds.fetch_attested_node(agent)
        assert fresh is not None
        ds.update_attested_node(replace(fresh, banned=True))  # admin BanAgent
        ds.update_attested_node(replace(stale, new_cert_serial="b2", new_cert_not_after=2))
        node = ds.fetch_attested_node(agent)
        assert node is not None and node.banned
    finally:
        ds.close()
