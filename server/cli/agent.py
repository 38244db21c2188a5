"""``credo-server agent list|count|show|ban|evict``: attested nodes."""

from __future__ import annotations

import click

from credo._proto.credo.server.v1 import admin_pb2, types_pb2
from server.cli.client import AdminClient
from server.cli.output import emit, message_to_dict, render_agent
from server.cli.params import SPIFFE_ID, admin_options

__all__ = ["agent"]

PAGE_SIZE = 500


@click.group()
def agent() -> None:
    """List, show, ban and evict attested agents."""


@agent.command(name="list")
@admin_options
@click.option("--attestation-type", help="Only agents attested this way, e.g. join_token.")
@click.option(
    "--banned",
    type=click.Choice(["true", "false"]),
    help="Only banned (true) or only not banned (false) agents.",
)
def list_agents(
    socket_path: str, output: str, attestation_type: str | None, banned: str | None
) -> None:
    """List attested agents."""
    found: list[types_pb2.AttestedNode] = []
    with AdminClient(socket_path) as client:
        token = ""
        seen: set[str] = set()
        while True:
            reply = client.call(
                client.agents.ListAgents,
                admin_pb2.ListAgentsRequest(
                    by_attestation_type=attestation_type or "",
                    by_banned=banned or "",
                    page_size=PAGE_SIZE,
                    page_token=token,
                ),
                noun="agent",
            )
            found.extend(reply.agents)
            token = reply.next_page_token
            if not token or token in seen:
                break
            seen.add(token)
    n = len(found)
    header = f"Found {n} attested {'agent' if n == 1 else 'agents'}"
    text = "\n\n".join([header, *(render_agent(a) for a in found)])
    emit(output, {"agents": [message_to_dict(a) for a in found]}, text)


@agent.command()
@admin_options
def count(socket_path: str, output: str) -> None:
    """Count attested agents."""
    with AdminClient(socket_path) as client:
        reply = client.call(client.agents.CountAgents, admin_pb2.CountAgentsRequest(), noun="agent")
    n = int(reply.count)
    emit(output, {"count": n}, f"{n} attested {'agent' if n == 1 else 'agents'}")


@agent.command()
@admin_options
@click.option("--spiffe-id", type=SPIFFE_ID, required=True, help="The agent's SPIFFE ID.")
def show(socket_path: str, output: str, spiffe_id: str) -> None:
    """Show one attested agent."""
    with AdminClient(socket_path) as client:
        node = client.call(
            client.agents.GetAgent, admin_pb2.GetAgentRequest(spiffe_id=spiffe_id), noun="agent"
        )
    emit(output, message_to_dict(node), render_agent(node))


@agent.command()
@admin_options
@click.option("--spiffe-id", type=SPIFFE_ID, required=True, help="The agent's SPIFFE ID.")
@click.option("--reason", default="", help="Why (kept with the revocations).")
def ban(socket_path: str, output: str, spiffe_id: str, reason: str) -> None:
    """Refuse the agent from its next call on, until it is evicted, and revoke every
    unexpired X.509-SVID, JWT-SVID and WIT-SVID it obtained (its own included) and the
    delegated tokens issued to the identities it held them for. Banning a banned agent
    changes nothing."""
    with AdminClient(socket_path) as client:
        node = client.call(
            client.agents.BanAgent,
            admin_pb2.BanAgentRequest(spiffe_id=spiffe_id, reason=reason),
            noun="agent",
        )
    emit(output, message_to_dict(node), f"Agent banned: {spiffe_id}")


@agent.command()
@admin_options
@click.option("--spiffe-id", type=SPIFFE_ID, required=True, help="The agent's SPIFFE ID.")
def evict(socket_path: str, output: str, spiffe_id: str) -> None:
    """Forget the agent; it may attest again with a new join token."""
    with AdminClient(socket_path) as client:
        node = client.call(
            client.agents.DeleteAgent,
            admin_pb2.DeleteAgentRequest(spiffe_id=spiffe_id),
            noun="agent",
        )
    emit(output, message_to_dict(node), f"Agent evicted: {spiffe_id}")
