"""``credo-server wit mint``: a WIT-SVID for any SPIFFE ID (printed: the admin asked for it).

Without ``--public-key`` the server makes the key pair and the private key is printed with
the token (as a JWK, the Workload API's ``wit_svid_key`` format); with it, the WIT binds that
key and only the token is printed.
"""

from __future__ import annotations

from pathlib import Path

import click
from cryptography.hazmat.primitives import serialization

from credo._proto.credo.server.v1 import admin_pb2
from server.cli.client import AdminClient
from server.cli.output import emit
from server.cli.params import DURATION, SPIFFE_ID, admin_options

__all__ = ["wit"]


def _public_key_der(path: str) -> bytes:
    """The DER SubjectPublicKeyInfo in a PEM or DER public key file."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise click.BadParameter(f"cannot read {path}: {err.strerror}") from None
    try:
        key = (
            serialization.load_pem_public_key(data)
            if b"-----BEGIN" in data
            else serialization.load_der_public_key(data)
        )
    except ValueError:
        raise click.BadParameter(f"{path} is not a PEM or DER public key") from None
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@click.group()
def wit() -> None:
    """WIT-SVIDs (Workload Identity Tokens) minted directly by the server."""


@wit.command()
@admin_options
@click.option("--spiffe-id", type=SPIFFE_ID, required=True, help="SPIFFE ID (the sub claim).")
@click.option("--ttl", type=DURATION, help="Lifetime, e.g. 1h [default: the server's].")
@click.option(
    "--public-key",
    "public_key_file",
    type=click.Path(dir_okay=False),
    help="Public key (PEM or DER) to bind in cnf.jwk [default: the server makes a key pair].",
)
def mint(
    socket_path: str,
    output: str,
    spiffe_id: str,
    ttl: int | None,
    public_key_file: str | None,
) -> None:
    """Mint a WIT-SVID and print it (and its private key, when the server made it)."""
    public_key = _public_key_der(public_key_file) if public_key_file else b""
    with AdminClient(socket_path) as client:
        reply = client.call(
            client.svids.MintWITSVID,
            admin_pb2.MintWITSVIDRequest(spiffe_id=spiffe_id, ttl=ttl or 0, public_key=public_key),
            noun="SPIFFE ID",
        )
    svid = reply.svid
    doc = {
        "spiffe_id": svid.spiffe_id,
        "token": svid.token,
        "expires_at": int(svid.expires_at),
        "issued_at": int(svid.issued_at),
    }
    text = svid.token
    if reply.private_key:
        doc["private_key"] = reply.private_key
        text = f"{svid.token}\n{reply.private_key}"
    emit(output, doc, text)
