"""``credo-server delegation create|show|list|update|delete|budget show``: who may act for whom.

A delegation policy lets agent identities (``--agent-id``: a SPIFFE ID, or a prefix ending
in ``/*``) exchange a person's token (from ``--subject-issuer``, matching every
``--subject-claim``) for an access token with some of ``--scope``, for one of
``--audience``, for at most ``--max-ttl``, in chains at most ``--max-depth`` agents long,
within each ``--budget SCOPE=N/PERIOD``. ``update`` changes only the options given.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from credo._proto.credo.server.v1 import admin_pb2
from credo.durations import format_duration, parse_duration
from server.cli.client import AdminClient
from server.cli.errors import CliError
from server.cli.output import blocks, emit, format_time, message_to_dict
from server.cli.params import admin_options
from server.delegation.policy import parse_budget, parse_subject_claim, validate_agent_pattern

__all__ = ["delegation", "render_policy"]


if TYPE_CHECKING:  # click >= 8.5 types ParamType by (value, input); older clicks do not
    _Param = click.ParamType[Any, Any]
else:
    _Param = click.ParamType


class _Parsed(_Param):
    def __init__(self, name: str, parse: Any) -> None:
        self.name = name
        self._parse = parse

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return self._parse(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


BUDGET = _Parsed("SCOPE=N/PERIOD", parse_budget)
CLAIM = _Parsed("CLAIM=VALUE", parse_subject_claim)
AGENT = _Parsed("SPIFFE_ID", validate_agent_pattern)


def _duration(value: str) -> int:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("must be a positive duration, e.g. 5m")
    return seconds


DURATION = _Parsed("DURATION", _duration)


def render_policy(p: admin_pb2.DelegationPolicy) -> str:
    rows: list[tuple[str, str]] = [
        ("Policy ID", p.id),
        ("Agent ID", p.agent_id),
        ("Subject issuer", p.subject_issuer),
    ]
    rows += [("Subject claim", f"{c.name}={c.value}") for c in p.subject_claims]
    rows += [("Scope", s) for s in p.scopes]
    rows += [("Audience", a) for a in p.audiences]
    rows += [
        ("Max TTL", f"{format_duration(p.max_ttl)} ({p.max_ttl}s)"),
        ("Max depth", str(p.max_depth)),
    ]
    rows += [("Budget", f"{b.scope}={b.limit}/{format_duration(int(b.period))}") for b in p.budgets]
    rows += [("Revision", str(p.revision_number)), ("Created at", format_time(p.created_at))]
    return blocks(rows)


def _out(output: str, policies: list[admin_pb2.DelegationPolicy], header: str = "") -> None:
    text = "\n\n".join(render_policy(p) for p in policies)
    if header:
        text = header + ("\n\n" + text if text else "")
    emit(output, {"policies": [message_to_dict(p) for p in policies]}, text)


def _options(f: Any) -> Any:
    options = [
        click.option("--agent-id", type=AGENT, help="Agent SPIFFE ID, or a prefix ending in /*."),
        click.option(
            "--subject-issuer", help="Name of a [server.delegation.issuers.<name>] table."
        ),
        click.option(
            "--subject-claim",
            "subject_claims",
            type=CLAIM,
            multiple=True,
            help="Claim the person's token must carry, e.g. groups=eng (repeatable).",
        ),
        click.option("--scope", "scopes", multiple=True, help="Scope agents may get (repeatable)."),
        click.option(
            "--audience", "audiences", multiple=True, help="Audience tokens may name (repeatable)."
        ),
        click.option("--max-ttl", type=DURATION, help="Longest token lifetime [default: 5m]."),
        click.option(
            "--max-depth",
            type=click.IntRange(1, 16),
            help="Longest actor chain, this agent included [default: 1].",
        ),
        click.option(
            "--budget",
            "budgets",
            type=BUDGET,
            multiple=True,
            help="Tokens per agent identity and window, e.g. repo:write=10/1h; * for all "
            "(repeatable).",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _apply(policy: admin_pb2.DelegationPolicy, flags: dict[str, Any]) -> None:
    if flags.get("agent_id") is not None:
        policy.agent_id = flags["agent_id"]
    if flags.get("subject_issuer") is not None:
        policy.subject_issuer = flags["subject_issuer"]
    if flags.get("subject_claims"):
        del policy.subject_claims[:]
        policy.subject_claims.extend(
            admin_pb2.SubjectClaim(name=k, value=v) for k, v in flags["subject_claims"]
        )
    for name in ("scopes", "audiences"):
        if flags.get(name):
            target = getattr(policy, name)
            del target[:]
            target.extend(flags[name])
    if flags.get("max_ttl") is not None:
        policy.max_ttl = flags["max_ttl"]
    if flags.get("max_depth") is not None:
        policy.max_depth = flags["max_depth"]
    if flags.get("budgets"):
        del policy.budgets[:]
        policy.budgets.extend(
            admin_pb2.Budget(scope=b.scope, limit=b.limit, period=b.period)
            for b in flags["budgets"]
        )


@click.group()
def delegation() -> None:
    """Delegation policies: which agents may act for which people (token exchange)."""


@delegation.command()
@admin_options
@_options
def create(socket_path: str, output: str, **flags: Any) -> None:
    """Create a delegation policy."""
    for name, flag in (
        ("agent_id", "--agent-id"),
        ("subject_issuer", "--subject-issuer"),
        ("scopes", "--scope"),
        ("audiences", "--audience"),
    ):
        if not flags.get(name):
            raise CliError(f"{flag} is required")
    policy = admin_pb2.DelegationPolicy()
    _apply(policy, flags)
    with AdminClient(socket_path) as client:
        reply = client.call(client.delegation.CreatePolicy, policy, noun="delegation policy")
    _out(output, [reply])


@delegation.command()
@admin_options
@click.option("--id", "policy_id", required=True, help="ID of the policy.")
def show(socket_path: str, output: str, policy_id: str) -> None:
    """Show one delegation policy."""
    with AdminClient(socket_path) as client:
        reply = client.call(
            client.delegation.GetPolicy,
            admin_pb2.GetPolicyRequest(id=policy_id),
            noun="delegation policy",
        )
    _out(output, [reply])


@delegation.command(name="list")
@admin_options
@click.option("--agent-id", type=AGENT, help="Only policies for this agent ID (as stored).")
def list_(socket_path: str, output: str, agent_id: str | None) -> None:
    """List delegation policies."""
    with AdminClient(socket_path) as client:
        reply = client.call(
            client.delegation.ListPolicies,
            admin_pb2.ListPoliciesRequest(by_agent_id=agent_id or ""),
            noun="delegation policy",
        )
    n = len(reply.policies)
    _out(output, list(reply.policies), f"Found {n} delegation polic{'y' if n == 1 else 'ies'}")


@delegation.command()
@admin_options
@click.option("--id", "policy_id", required=True, help="ID of the policy to update.")
@_options
def update(socket_path: str, output: str, policy_id: str, **flags: Any) -> None:
    """Change the given fields of a delegation policy."""
    if not any(v not in (None, ()) for v in flags.values()):
        raise CliError("nothing to update: give at least one option, e.g. --scope")
    with AdminClient(socket_path) as client:
        current = client.call(
            client.delegation.GetPolicy,
            admin_pb2.GetPolicyRequest(id=policy_id),
            noun="delegation policy",
        )
        _apply(current, flags)
        reply = client.call(client.delegation.UpdatePolicy, current, noun="delegation policy")
    _out(output, [reply])


@delegation.command()
@admin_options
@click.option("--id", "policy_id", required=True, help="ID of the policy to delete.")
def delete(socket_path: str, output: str, policy_id: str) -> None:
    """Delete a delegation policy (and its budget counters)."""
    with AdminClient(socket_path) as client:
        reply = client.call(
            client.delegation.DeletePolicy,
            admin_pb2.GetPolicyRequest(id=policy_id),
            noun="delegation policy",
        )
    emit(output, {"policies": [message_to_dict(reply)]}, f"Deleted delegation policy {reply.id}")


@delegation.group()
def budget() -> None:
    """Budgets of a delegation policy."""


@budget.command(name="show")
@admin_options
@click.option("--id", "policy_id", required=True, help="ID of the policy.")
def budget_show(socket_path: str, output: str, policy_id: str) -> None:
    """Print each budget's use and what remains, per agent identity, in the current window."""
    with AdminClient(socket_path) as client:
        policy = client.call(
            client.delegation.GetPolicy,
            admin_pb2.GetPolicyRequest(id=policy_id),
            noun="delegation policy",
        )
        reply = client.call(
            client.delegation.GetBudgetUse,
            admin_pb2.GetPolicyRequest(id=policy_id),
            noun="delegation policy",
        )
    items = []
    lines = []
    for u in reply.budgets:
        remaining = max(0, int(u.limit) - int(u.used))
        items.append({**message_to_dict(u), "remaining": remaining})
        lines.append(
            f"{u.agent_id}  {u.scope}: used {u.used} of {u.limit}, remaining {remaining}, "
            f"refused {u.refused}, resets at {format_time(u.resets_at)}"
        )
    if not policy.budgets:
        text = f"Delegation policy {policy_id} has no budgets"
    elif not lines:
        text = "No tokens counted in the current window"
    else:
        text = "\n".join(lines)
    emit(output, {"budgets": items}, text)
