"""``credo-server x509 mint|revoke|crl``: mint an X.509-SVID for any SPIFFE ID (with a key
made here), revoke one by serial, show or write the authorities' CRLs.

The private key is generated locally (ec-p256) and never leaves this process except to
stdout or ``--write DIR`` (``key.pem`` mode 0600, written atomically).
"""

from __future__ import annotations

from pathlib import Path

import click
from cryptography import x509 as cx509
from cryptography.hazmat.primitives import hashes, serialization

from credo._files import write_atomically
from credo._proto.credo.server.v1 import admin_pb2
from credo.keys import KeyType, generate_private_key, private_key_to_pkcs8_pem
from server.cli.client import AdminClient
from server.cli.output import emit, message_to_dict, render_bundle, render_revocation
from server.cli.params import DURATION, SPIFFE_ID, admin_options

__all__ = ["write_file_atomic", "x509"]


def write_file_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` with ``mode``: temp file, fsync, rename."""
    write_atomically(path, data, mode)


@click.group()
def x509() -> None:
    """X.509-SVIDs minted directly by the server."""


@x509.command()
@admin_options
@click.option("--spiffe-id", type=SPIFFE_ID, required=True, help="SPIFFE ID of the SVID.")
@click.option("--ttl", type=DURATION, help="Lifetime, e.g. 1h [default: the server's].")
@click.option("--dns", "dns_names", multiple=True, help="DNS name SAN (repeatable).")
@click.option(
    "--write",
    "write_dir",
    metavar="DIR",
    help="Write svid.pem, key.pem and bundle.pem to DIR instead of printing them.",
)
def mint(
    socket_path: str,
    output: str,
    spiffe_id: str,
    ttl: int | None,
    dns_names: tuple[str, ...],
    write_dir: str | None,
) -> None:
    """Mint an X.509-SVID (with a key generated here)."""
    key = generate_private_key(KeyType.EC_P256)
    csr = (
        cx509.CertificateSigningRequestBuilder()
        .subject_name(cx509.Name([]))
        .add_extension(
            cx509.SubjectAlternativeName([cx509.UniformResourceIdentifier(spiffe_id)]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    with AdminClient(socket_path) as client:
        reply = client.call(
            client.svids.MintX509SVID,
            admin_pb2.MintX509SVIDRequest(
                csr=csr.public_bytes(serialization.Encoding.DER),
                spiffe_id=spiffe_id,
                ttl=ttl or 0,
                dns_names=list(dns_names),
            ),
            noun="SPIFFE ID",
        )
        trust = client.call(
            client.bundles.GetBundle, admin_pb2.GetBundleAdminRequest(), noun="bundle"
        )
    svid_pem = b"".join(
        cx509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
        for der in reply.svid.cert_chain
    ).decode("ascii")
    key_pem = private_key_to_pkcs8_pem(key).decode("ascii")
    bundle_pem = render_bundle(trust, "pem")
    expires_at = int(reply.svid.expires_at)
    if write_dir is None:
        emit(
            output,
            {
                "spiffe_id": reply.svid.spiffe_id,
                "expires_at": expires_at,
                "x509_svid": svid_pem,
                "private_key": key_pem,
                "bundle": bundle_pem,
            },
            f"X509-SVID:\n{svid_pem}\nPrivate key:\n{key_pem}\nRoot CAs:\n{bundle_pem}",
        )
        return
    directory = Path(write_dir)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {
        "svid_path": directory / "svid.pem",
        "key_path": directory / "key.pem",
        "bundle_path": directory / "bundle.pem",
    }
    write_file_atomic(paths["key_path"], key_pem.encode(), 0o600)
    write_file_atomic(paths["svid_path"], svid_pem.encode(), 0o644)
    write_file_atomic(paths["bundle_path"], bundle_pem.encode(), 0o644)
    emit(
        output,
        {"spiffe_id": reply.svid.spiffe_id, "expires_at": expires_at}
        | {name: str(p) for name, p in paths.items()},
        "\n".join(
            [
                f"X509-SVID written to {paths['svid_path']}",
                f"Private key written to {paths['key_path']}",
                f"Root CAs written to {paths['bundle_path']}",
            ]
        ),
    )


@x509.command()
@admin_options
@click.option(
    "--serial", required=True, help="Serial number in hex, as logged or as openssl prints it."
)
@click.option("--reason", default="", help="Why (kept with the revocation).")
def revoke(socket_path: str, output: str, serial: str, reason: str) -> None:
    """Revoke one X.509-SVID the server issued: it goes into its authority's CRL, which
    agents put in front of workloads at once; the agent replaces the SVID unless its entry
    is revoked. Revoking it again changes nothing."""
    with AdminClient(socket_path) as client:
        reply = client.call(
            client.svids.RevokeX509SVID,
            admin_pb2.RevokeX509SVIDRequest(serial=serial, reason=reason),
            noun="X.509-SVID",
        )
    emit(output, message_to_dict(reply), render_revocation(reply, f"X.509-SVID {serial}"))


@x509.command()
@admin_options
@click.option(
    "--write",
    "write_dir",
    metavar="DIR",
    help="Write <authority-id>.crl (DER) for each authority to DIR instead of printing PEM.",
)
def crl(socket_path: str, output: str, write_dir: str | None) -> None:
    """The current CRL of every X.509 authority (PEM on stdout, or DER files)."""
    with AdminClient(socket_path) as client:
        reply = client.call(client.svids.ListCRLs, admin_pb2.ListCRLsRequest(), noun="CRL")
    pems = {
        c.authority_id: cx509.load_der_x509_crl(c.der)
        .public_bytes(serialization.Encoding.PEM)
        .decode("ascii")
        for c in reply.crls
    }
    if write_dir is None:
        emit(
            output,
            {
                "crls": [
                    {
                        "authority_id": c.authority_id,
                        "number": int(c.number),
                        "next_update": int(c.next_update),
                        "crl": pems[c.authority_id],
                    }
                    for c in reply.crls
                ]
            },
            "".join(pems.values()) or "No CRLs yet",
        )
        return
    directory = Path(write_dir)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for c in reply.crls:
        path = directory / f"{c.authority_id}.crl"
        write_file_atomic(path, c.der, 0o644)
        written.append(str(path))
    emit(output, {"paths": written}, "\n".join(f"CRL written to {p}" for p in written))
