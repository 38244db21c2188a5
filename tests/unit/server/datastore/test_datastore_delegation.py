"""Delegation policies (schema version 5): CRUD, revisions, and budgets counted exactly."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest
from ds_helpers import FakeClock

from server.datastore import (
    AlreadyExists,
    Budget,
    DelegationPolicy,
    InvalidRequest,
    NotFound,
    SqlDataStore,
)

AGENT = "spiffe://example.org/agents/reviewer"


def _policy(**changes: object) -> DelegationPolicy:
    base = DelegationPolicy(
        agent_id=AGENT,
        subject_issuer="corp",
        scopes=("repo:read", "repo:write"),
        audiences=("https://git.example.com",),
        subject_claims=(("groups", "eng"),),
        budgets=(Budget("repo:write", 3, 3600),),
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def test_policy_round_trip_update_and_delete(store: SqlDataStore, clock: FakeClock) -> None:
    """A policy is stored as given, versioned on update, and gone after delete."""
    created = store.create_delegation_policy(_policy())
    assert created.id and created.revision_number == 0 and created.created_at == clock.now
    assert store.fetch_delegation_policy(created.id) == created
    with pytest.raises(AlreadyExists):
        store.create_delegation_policy(_policy(id=created.id))
    updated = store.update_delegation_policy(replace(created, max_depth=3, scopes=("repo:read",)))
    assert updated.revision_number == 1
    assert store.fetch_delegation_policy(created.id) == updated
    assert store.list_delegation_policies(by_agent_ids=[AGENT]) == [updated]
    assert store.list_delegation_policies(by_agent_ids=["spiffe://example.org/x"]) == []
    assert store.delete_delegation_policy(created.id) == updated
    assert store.fetch_delegation_policy(created.id) is None
    with pytest.raises(NotFound):
        store.delete_delegation_policy(created.id)
    with pytest.raises(NotFound):
        store.update_delegation_policy(updated)


def test_invalid_policies_are_refused(store: SqlDataStore) -> None:
    """A policy without scopes or audiences, or with a zero TTL, is not stored."""
    for bad in (_policy(scopes=()), _policy(audiences=()), _policy(max_ttl=0)):
        with pytest.raises(InvalidRequest):
            store.create_delegation_policy(bad)
    assert store.list_delegation_policies() == []


def test_budgets_are_all_or_nothing_and_reset(store: SqlDataStore, clock: FakeClock) -> None:
    """Units run out at the limit, a refusal is counted, and the next window starts afresh."""
    clock.now = 1_700_000_000 - 1_700_000_000 % 3600  # the start of a window
    policy = store.create_delegation_policy(
        _policy(budgets=(Budget("repo:write", 2, 3600), Budget("*", 3, 3600)))
    )
    both = list(policy.budgets)
    star = [b for b in both if b.scope == "*"]
    assert store.consume_budgets(policy.id, AGENT, both, clock.now) is None
    assert store.consume_budgets(policy.id, AGENT, both, clock.now) is None
    exhausted = store.consume_budgets(policy.id, AGENT, both, clock.now)
    assert exhausted is not None and exhausted.scope == "repo:write"
    # The refused exchange took nothing from "*": one unit is still there.
    assert store.consume_budgets(policy.id, AGENT, star, clock.now) is None
    assert store.consume_budgets(policy.id, AGENT, star, clock.now) == Budget("*", 3, 3600)
    use = {u.scope: u for u in store.list_budget_use(policy.id, clock.now)}
    assert (use["repo:write"].used, use["repo:write"].refused) == (2, 1)
    assert (use["*"].used, use["*"].refused) == (3, 1)
    # Another agent identity has its own counters.
    other = "spiffe://example.org/agents/other"
    assert store.consume_budgets(policy.id, other, both, clock.now) is None
    clock.advance(3600)
    assert store.consume_budgets(policy.id, AGENT, both, clock.now) is None


def test_budget_counts_are_exact_under_concurrency(db_url: str, clock: FakeClock) -> None:
    """Two stores (two servers) and many threads racing for 10 units: exactly 10 win."""
    stores = [SqlDataStore.open(db_url, clock=clock) for _ in range(2)]
    try:
        policy = stores[0].create_delegation_policy(_policy(budgets=(Budget("*", 10, 3600),)))
        wins: list[bool] = []
        lock = threading.Lock()
        start = threading.Barrier(16)

        def worker(i: int) -> None:
            start.wait()
            for _ in range(3):
                ok = stores[i % 2].consume_budgets(policy.id, AGENT, policy.budgets, clock.now)
                with lock:
                    wins.append(ok is None)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert wins.count(True) == 10
        (use,) = stores[1].list_budget_use(policy.id, clock.now)
        assert (use.used, use.refused) == (10, 38)
    finally:
        for s in stores:
            s.close()
