"""``credo-server jwt mint|revoke``: mint a JWT-SVID for any SPIFFE ID (printed: the admin
asked for it), revoke a JWT-SVID, WIT-SVID or delegated token by its ``jti``."""

from __future__ import annotations

import click

from credo._proto.credo.server.v1 import admin_pb2
from server.cli.client import AdminClient
from server.cli.output import emit, message_to_dict, render_revocation
from server.cli.params import DURATION, SPIFFE_ID, admin_options

__all__ = ["jwt"]


@click.group()
def jwt() -> None:
    """JWT-SVIDs minted directly by the server."""


@jwt.command()
@admin_options
@click.option("--spiffe-id", type=SPIFFE_ID, required=True, help="SPIFFE ID (the sub claim).")
@click.option("--audience", "audience", multiple=True, required=True, help="Audience (repeatable).")
@click.option("--ttl", type=DURATION, help="Lifetime, e.g. 5m [default: the server's].")
def mint(
    socket_path: str, output: str, spiffe_id: str, audience: tuple[str, ...], ttl: int | None
) -> None:
    """Mint a JWT-SVID and print it."""
    with AdminClient(socket_path) as client:
        reply = client.call(
            client.svids.MintJWTSVID,
            admin_pb2.MintJWTSVIDRequest(
                spiffe_id=spiffe_id, audience=list(audience), ttl=ttl or 0
            ),
            noun="SPIFFE ID",
        )
    svid = reply.svid
    emit(
        output,
        {
            "spiffe_id": svid.spiffe_id,
            "token": svid.token,
            "expires_at": int(svid.expires_at),
            "issued_at": int(svid.issued_at),
        },
        svid.token,
    )


@jwt.command()
@admin_options
@click.option(
    "--jti",
    required=True,
    help="The JWT ID (jti claim) of a JWT-SVID, WIT-SVID or delegated access token.",
)
@click.option("--reason", default="", help="Why (kept with the revocation).")
def revoke(socket_path: str, output: str, jti: str, reason: str) -> None:
    """Revoke one JWT the server issued, by its jti: a JWT-SVID or WIT-SVID (every agent's
    ValidateJWTSVID refuses it, no agent hands it out again, a revoked WIT-SVID is replaced
    on its workload's stream) or a delegated access token (introspection answers inactive,
    the token endpoint refuses it as a chain link). All are in the signed revocation list at
    /jwt-revocations. Revoking it again changes nothing."""
    with AdminClient(socket_path) as client:
        reply = client.call(
            client.svids.RevokeJWTSVID,
            admin_pb2.RevokeJWTSVIDRequest(jti=jti, reason=reason),
            noun="JWT",
        )
    emit(output, message_to_dict(reply), render_revocation(reply, f"jti {jti}"))
