"""Delegation policies (schema version 5): CRUD, revisions, and budgets counted exactly."""

from __future__ import annotations

import json
import secrets
import threading
from dataclasses import replace

import pytest
from ds_helpers import FakeClock

from credo.selector import Selector
from server import audit
from server.datastore import (
    AlreadyExists,
    Budget,
    DelegatedToken,
    DelegationPolicy,
    GrantOutcome,
    InvalidRequest,
    IssuedX509Svid,
    NotFound,
    RegistrationEntry,
    SqlDataStore,
    TokenGrant,
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


def _entry(store: SqlDataStore, spiffe_id: str = AGENT) -> RegistrationEntry:
    return store.create_registration_entry(
        RegistrationEntry(
            spiffe_id, "spiffe://example.org/host", (Selector("unix", f"uid:{len(spiffe_id)}"),)
        )
    )


def _grant(
    policy: DelegationPolicy, now: int, *budgets: Budget, agent: str = AGENT, jti: str = ""
) -> TokenGrant:
    jti = jti or secrets.token_urlsafe(8)
    return TokenGrant(
        token=DelegatedToken(jti, agent, "alice", (agent,), expires_at=now + 300, issued_at=now),
        audit=audit.pending("token.exchange", subject=agent, details={"jti": jti}),
        policy_id=policy.id,
        budgets=budgets or policy.budgets,
        now=now,
    )


def _take(
    store: SqlDataStore, policy: DelegationPolicy, now: int, *budgets: Budget
) -> Budget | None:
    """One grant alone: None when recorded, else the budget that refused it."""
    (outcome,) = store.record_token_grants([_grant(policy, now, *budgets)])
    assert outcome.recorded == (outcome.exhausted is None)
    return outcome.exhausted


def test_budgets_are_all_or_nothing_and_reset(store: SqlDataStore, clock: FakeClock) -> None:
    """Units run out at the limit, a refusal is counted, and the next window starts afresh."""
    clock.now = 1_700_000_000 - 1_700_000_000 % 3600  # the start of a window
    _entry(store)
    other = "spiffe://example.org/agents/other"
    _entry(store, other)
    policy = store.create_delegation_policy(
        _policy(budgets=(Budget("repo:write", 2, 3600), Budget("*", 3, 3600)))
    )
    both = policy.budgets
    star = tuple(b for b in both if b.scope == "*")
    assert _take(store, policy, clock.now, *both) is None
    assert _take(store, policy, clock.now, *both) is None
    exhausted = _take(store, policy, clock.now, *both)
    assert exhausted is not None and exhausted.scope == "repo:write"
    # The refused exchange took nothing from "*": one unit is still there.
    assert _take(store, policy, clock.now, *star) is None
    assert _take(store, policy, clock.now, *star) == Budget("*", 3, 3600)
    use = {u.scope: u for u in store.list_budget_use(policy.id, clock.now)}
    assert (use["repo:write"].used, use["repo:write"].refused) == (2, 1)
    assert (use["*"].used, use["*"].refused) == (3, 1)
    # Another agent identity has its own counters.
    (outcome,) = store.record_token_grants([_grant(policy, clock.now, *both, agent=other)])
    assert outcome.recorded
    clock.advance(3600)
    assert _take(store, policy, clock.now, *both) is None


def test_a_batch_of_grants_is_one_transaction_with_its_audit(
    store: SqlDataStore, clock: FakeClock
) -> None:
    """One call, many grants: each recorded or refused on its own; the recorded ones'
    tokens and audit records are there, the refused ones' are not, and a revoked
    client's grant takes no budget unit."""
    _entry(store)
    revoked = "spiffe://example.org/agents/revoked"
    store.revoke_registration_entry(_entry(store, revoked).id, "rogue")
    policy = store.create_delegation_policy(_policy(budgets=(Budget("*", 2, 3600),)))
    grants = [
        _grant(policy, clock.now, jti="one"),
        _grant(policy, clock.now, agent=revoked, jti="gone"),
        _grant(policy, clock.now, jti="two"),
        _grant(policy, clock.now, jti="three"),
    ]
    before = len(store.list_audit_records())
    outcomes = store.record_token_grants(grants)
    assert outcomes == [
        GrantOutcome(recorded=True),
        GrantOutcome(recorded=False),
        GrantOutcome(recorded=True),
        GrantOutcome(recorded=False, exhausted=Budget("*", 2, 3600)),
    ]
    jtis = ("one", "gone", "two", "three")
    recorded = [store.fetch_delegated_token(j) is not None for j in jtis]
    assert recorded == [True, False, True, False]
    added = store.list_audit_records()[before:]
    assert [(r.action, json.loads(r.details)["jti"]) for r in added] == [
        ("token.exchange", "one"),
        ("token.exchange", "two"),
    ]
    (use,) = store.list_budget_use(policy.id, clock.now)
    assert (use.agent_id, use.used, use.refused) == (AGENT, 2, 1)


def test_a_grant_whose_client_credential_is_revoked_writes_nothing(
    store: SqlDataStore, clock: FakeClock
) -> None:
    """The client's X509-SVID (by serial) is checked in the recording transaction: revoked,
    or issued for a revoked entry, the grant is refused with no token, audit record or
    budget unit (not even a refusal); an unrevoked or unrecorded serial is recorded."""
    entry = _entry(store)
    other = _entry(store, "spiffe://example.org/agents/other")
    svids = [
        IssuedX509Svid(serial, "ca1", AGENT, clock.now + 300, entry_id=entry_id, agent_id=AGENT)
        for serial, entry_id in (("0a", entry.id), ("0b", entry.id), ("0c", other.id))
    ]
    store.create_issued_x509_svids(svids)
    store.revoke_x509_svid("0b", "leaked")
    store.revoke_registration_entry(other.id, "rogue")
    policy = store.create_delegation_policy(_policy(budgets=(Budget("*", 10, 3600),)))
    grants = [
        replace(_grant(policy, clock.now, jti=serial), client_credential=("serial", serial))
        for serial in ("0a", "0b", "0c", "ff")
    ]
    before = len(store.list_audit_records())
    assert store.record_token_grants(grants) == [
        GrantOutcome(recorded=True),
        GrantOutcome(recorded=False, revoked_credential=True),
        GrantOutcome(recorded=False, revoked_credential=True),
        GrantOutcome(recorded=True),
    ]
    recorded = [store.fetch_delegated_token(j) is not None for j in ("0a", "0b", "0c", "ff")]
    assert recorded == [True, False, False, True]
    added = store.list_audit_records()[before:]
    assert [json.loads(r.details)["jti"] for r in added] == ["0a", "ff"]
    (use,) = store.list_budget_use(policy.id, clock.now)
    assert (use.used, use.refused) == (2, 0)


def test_budget_counts_are_exact_under_concurrency(db_url: str, clock: FakeClock) -> None:
    """Two stores (two servers) and many threads racing for 10 units: exactly 10 win."""
    stores = [SqlDataStore.open(db_url, clock=clock) for _ in range(2)]
    try:
        _entry(stores[0])
        policy = stores[0].create_delegation_policy(_policy(budgets=(Budget("*", 10, 3600),)))
        wins: list[bool] = []
        lock = threading.Lock()
        start = threading.Barrier(16)

        def worker(i: int) -> None:
            start.wait()
            for _ in range(3):
                outcomes = stores[i % 2].record_token_grants(
                    [_grant(policy, clock.now), _grant(policy, clock.now)]
                )
                with lock:
                    wins.extend(o.recorded for o in outcomes)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert wins.count(True) == 10
        (use,) = stores[1].list_budget_use(policy.id, clock.now)
        assert (use.used, use.refused) == (10, 86)
    finally:
        for s in stores:
            s.close()
