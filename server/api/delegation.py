"""The admin ``Delegation`` service: delegation policies and their budgets.

Every field is checked here, at the edge; a refused request changes nothing. Messages name
the field (``scopes[1]: ...``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection
from typing import TypeVar

import grpc

from credo._proto.credo.server.v1 import admin_pb2, admin_pb2_grpc
from credo.spiffe_id import SpiffeId, TrustDomain
from server.api.convert import InvalidField
from server.api.errors import ApiError, handle_errors
from server.datastore.models import Budget, DelegationPolicy
from server.datastore.protocol import DataStore
from server.delegation.policy import (
    DEFAULT_MAX_DEPTH,
    DEFAULT_MAX_TTL,
    MAX_DEPTH,
    MAX_TTL,
    validate_agent_pattern,
    validate_scope,
)

__all__ = ["DelegationService", "policy_from_proto", "policy_to_proto"]

log = logging.getLogger(__name__)
_T = TypeVar("_T")
_MAX_ITEMS = 256


async def _call(fn: Callable[..., _T], *args: object, **kwargs: object) -> _T:
    return await asyncio.to_thread(fn, *args, **kwargs)


def _check_many(items: Collection[object], field: str) -> None:
    if len(items) > _MAX_ITEMS:
        raise InvalidField(field, f"too many items: {len(items)} > {_MAX_ITEMS}")


def policy_from_proto(
    pb: admin_pb2.DelegationPolicy,
    trust_domain: TrustDomain,
    issuers: Collection[str],
    *,
    require_id: bool = False,
) -> DelegationPolicy:
    """Validate a policy sent by an admin and return it as a record."""
    if require_id and not pb.id:
        raise InvalidField("id", "is required to update a policy")
    try:
        agent = validate_agent_pattern(pb.agent_id)
    except ValueError as exc:
        raise InvalidField("agent_id", str(exc)) from None
    base = agent.removesuffix("/*")
    if SpiffeId.parse(base).trust_domain != trust_domain:
        raise InvalidField("agent_id", f"must be in this server's trust domain {trust_domain}")
    if pb.subject_issuer not in issuers:
        known = ", ".join(sorted(issuers)) or "none configured"
        raise InvalidField(
            "subject_issuer",
            f"{pb.subject_issuer[:80]!r} is not a [server.delegation.issuers.<name>] table "
            f"of this server (known: {known})",
        )
    for field, items in (
        ("scopes", pb.scopes),
        ("audiences", pb.audiences),
        ("subject_claims", pb.subject_claims),
        ("budgets", pb.budgets),
    ):
        _check_many(items, field)
    if not pb.scopes:
        raise InvalidField("scopes", "at least one scope is required (--scope)")
    for i, scope in enumerate(pb.scopes):
        try:
            validate_scope(scope)
        except ValueError as exc:
            raise InvalidField(f"scopes[{i}]", str(exc)) from None
    if not pb.audiences:
        raise InvalidField("audiences", "at least one audience is required (--audience)")
    for i, audience in enumerate(pb.audiences):
        if not audience or len(audience) > 2048 or not audience.isprintable() or " " in audience:
            raise InvalidField(f"audiences[{i}]", "expected a URI or name without spaces")
    claims = []
    for i, claim in enumerate(pb.subject_claims):
        if not claim.name or not claim.value or len(claim.name) > 128 or len(claim.value) > 1024:
            raise InvalidField(f"subject_claims[{i}]", "expected a claim name and a value")
        claims.append((claim.name, claim.value))
    max_ttl = pb.max_ttl or DEFAULT_MAX_TTL
    if not 0 < max_ttl <= MAX_TTL:
        raise InvalidField("max_ttl", f"expected 1s to {MAX_TTL}s, got {pb.max_ttl}")
    max_depth = pb.max_depth or DEFAULT_MAX_DEPTH
    if not 0 < max_depth <= MAX_DEPTH:
        raise InvalidField("max_depth", f"expected 1 to {MAX_DEPTH}, got {pb.max_depth}")
    budgets = []
    seen: set[str] = set()
    for i, b in enumerate(pb.budgets):
        if b.scope != "*":
            try:
                validate_scope(b.scope)
            except ValueError as exc:
                raise InvalidField(f"budgets[{i}].scope", str(exc)) from None
            if b.scope not in pb.scopes:
                raise InvalidField(f"budgets[{i}].scope", f"{b.scope!r} is not a policy scope")
        if b.limit < 0 or b.period <= 0 or b.period > 366 * 86400:
            raise InvalidField(f"budgets[{i}]", "expected a limit >= 0 and a period of 1s to 1y")
        if b.scope in seen:
            raise InvalidField(f"budgets[{i}]", f"{b.scope!r} has a budget already")
        seen.add(b.scope)
        budgets.append(Budget(b.scope, int(b.limit), int(b.period)))
    return DelegationPolicy(
        id=pb.id,
        agent_id=agent,
        subject_issuer=pb.subject_issuer,
        subject_claims=tuple(claims),
        scopes=tuple(pb.scopes),
        audiences=tuple(pb.audiences),
        max_ttl=max_ttl,
        max_depth=max_depth,
        budgets=tuple(budgets),
    )


def policy_to_proto(policy: DelegationPolicy) -> admin_pb2.DelegationPolicy:
    return admin_pb2.DelegationPolicy(
        id=policy.id,
        agent_id=policy.agent_id,
        subject_issuer=policy.subject_issuer,
        subject_claims=[admin_pb2.SubjectClaim(name=k, value=v) for k, v in policy.subject_claims],
        scopes=list(policy.scopes),
        audiences=list(policy.audiences),
        max_ttl=policy.max_ttl,
        max_depth=policy.max_depth,
        budgets=[
            admin_pb2.Budget(scope=b.scope, limit=b.limit, period=b.period) for b in policy.budgets
        ],
        revision_number=policy.revision_number,
        created_at=policy.created_at,
    )


class DelegationService(admin_pb2_grpc.DelegationServicer):
    """Create, show, list, update and delete delegation policies; show budget use."""

    def __init__(
        self,
        trust_domain: TrustDomain,
        datastore: DataStore,
        issuers: Collection[str],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._td = trust_domain
        self._ds = datastore
        self._issuers = frozenset(issuers)
        self._clock = clock

    def _not_found(self, policy_id: str) -> ApiError:
        return ApiError(grpc.StatusCode.NOT_FOUND, f"delegation policy {policy_id!r} not found")

    @handle_errors
    async def CreatePolicy(
        self, request: admin_pb2.DelegationPolicy, context: grpc.aio.ServicerContext
    ) -> admin_pb2.DelegationPolicy:
        policy = policy_from_proto(request, self._td, self._issuers)
        stored = await _call(self._ds.create_delegation_policy, policy)
        log.info(
            "created delegation policy",
            extra={
                "policy_id": stored.id,
                "agent_id": stored.agent_id,
                "subject_issuer": stored.subject_issuer,
            },
        )
        return policy_to_proto(stored)

    @handle_errors
    async def GetPolicy(
        self, request: admin_pb2.GetPolicyRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.DelegationPolicy:
        if not request.id:
            raise InvalidField("id", "is required")
        found = await _call(self._ds.fetch_delegation_policy, request.id)
        if found is None:
            raise self._not_found(request.id)
        return policy_to_proto(found)

    @handle_errors
    async def ListPolicies(
        self, request: admin_pb2.ListPoliciesRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListPoliciesResponse:
        by = [request.by_agent_id] if request.by_agent_id else None
        found = await _call(self._ds.list_delegation_policies, by_agent_ids=by)
        return admin_pb2.ListPoliciesResponse(policies=[policy_to_proto(p) for p in found])

    @handle_errors
    async def UpdatePolicy(
        self, request: admin_pb2.DelegationPolicy, context: grpc.aio.ServicerContext
    ) -> admin_pb2.DelegationPolicy:
        policy = policy_from_proto(request, self._td, self._issuers, require_id=True)
        stored = await _call(self._ds.update_delegation_policy, policy)
        log.info(
            "updated delegation policy",
            extra={"policy_id": stored.id, "revision_number": stored.revision_number},
        )
        return policy_to_proto(stored)

    @handle_errors
    async def DeletePolicy(
        self, request: admin_pb2.GetPolicyRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.DelegationPolicy:
        if not request.id:
            raise InvalidField("id", "is required")
        gone = await _call(self._ds.delete_delegation_policy, request.id)
        log.info("deleted delegation policy", extra={"policy_id": gone.id})
        return policy_to_proto(gone)

    @handle_errors
    async def GetBudgetUse(
        self, request: admin_pb2.GetPolicyRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.GetBudgetUseResponse:
        if not request.id:
            raise InvalidField("id", "is required")
        now = int(self._clock())
        policy = await _call(self._ds.fetch_delegation_policy, request.id)
        if policy is None:
            raise self._not_found(request.id)
        use = await _call(self._ds.list_budget_use, request.id, now)
        limits = {b.scope: b for b in policy.budgets}
        out = []
        for u in use:
            budget = limits[u.scope]
            out.append(
                admin_pb2.BudgetUse(
                    agent_id=u.agent_id,
                    scope=u.scope,
                    limit=budget.limit,
                    used=u.used,
                    refused=u.refused,
                    window_start=u.window_start,
                    resets_at=u.window_start + budget.period,
                )
            )
        return admin_pb2.GetBudgetUseResponse(budgets=out)
