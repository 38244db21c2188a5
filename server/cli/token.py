"""``credo-server token generate``: a single-use join token for node attestation."""

from __future__ import annotations

import click

from credo._proto.credo.server.v1 import admin_pb2
from server.cli.client import AdminClient
from server.cli.output import emit, format_time
from server.cli.params import DURATION, SPIFFE_ID, admin_options

__all__ = ["token"]


@click.group()
def token() -> None:
    """Join tokens for agents (single use)."""


@token.command()
@admin_options
@click.option(
    "--ttl",
    type=DURATION,
    default=None,
    help="Token lifetime, e.g. 10m [default: the server's join_token_ttl, 600s]; at most the "
    "server's join_token_max_ttl (24h unless configured).",
)
@click.option(
    "--spiffe-id",
    type=SPIFFE_ID,
    help="Also create a node-alias entry with this ID for the agent that uses the token.",
)
def generate(socket_path: str, output: str, ttl: int | None, spiffe_id: str | None) -> None:
    """Generate a join token."""
    with AdminClient(socket_path) as client:
        reply = client.call(
            client.agents.CreateJoinToken,
            admin_pb2.CreateJoinTokenRequest(ttl=ttl or 0, spiffe_id=spiffe_id or ""),
            noun="join token",
        )
    data: dict[str, object] = {"token": reply.token, "expires_at": int(reply.expires_at)}
    if reply.spiffe_id:
        data["spiffe_id"] = reply.spiffe_id
    lines = [f"Token: {reply.token}", f"Expires at: {format_time(reply.expires_at)}"]
    if reply.spiffe_id:
        lines.append(f"SPIFFE ID: {reply.spiffe_id}")
    emit(output, data, "\n".join(lines))
