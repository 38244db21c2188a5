"""``credo-server bundle show|list|set|delete``: this trust domain's bundle and federated ones.

``--format pem`` is the X.509 authorities as PEM; ``--format spiffe`` is the SPIFFE bundle
(JWKS JSON with ``use``, ``spiffe_sequence`` and ``spiffe_refresh_hint``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from credo._proto.credo.server.v1 import admin_pb2
from credo.bundle import Bundle, X509Bundle
from server.cli.client import AdminClient
from server.cli.errors import CliError
from server.cli.output import BUNDLE_FORMATS, emit, message_to_dict, render_bundle
from server.cli.params import TRUST_DOMAIN, admin_options

__all__ = ["bundle"]

_format_option = click.option(
    "--format",
    "bundle_format",
    type=click.Choice(BUNDLE_FORMATS),
    default="pem",
    show_default=True,
    help="pem: X.509 authorities; spiffe: SPIFFE bundle (JWKS).",
)
_trust_domain_option = click.option(
    "--trust-domain",
    "--id",
    "trust_domain",
    type=TRUST_DOMAIN,
    required=True,
    help="Trust domain of the federated bundle: example.org or spiffe://example.org.",
)


@click.group()
def bundle() -> None:
    """Show this trust domain's bundle; manage federated bundles."""


@bundle.command()
@admin_options
@_format_option
def show(socket_path: str, output: str, bundle_format: str) -> None:
    """Show this server's trust bundle."""
    with AdminClient(socket_path) as client:
        reply = client.call(
            client.bundles.GetBundle, admin_pb2.GetBundleAdminRequest(), noun="bundle"
        )
    text = "" if output == "json" else render_bundle(reply, bundle_format)
    emit(output, message_to_dict(reply), text)


@bundle.command(name="list")
@admin_options
@_format_option
def list_bundles(socket_path: str, output: str, bundle_format: str) -> None:
    """List federated bundles."""
    with AdminClient(socket_path) as client:
        reply = client.call(
            client.bundles.ListFederatedBundles,
            admin_pb2.ListFederatedBundlesRequest(),
            noun="bundle",
        )
    parts = []
    if output != "json":
        if not reply.bundles:
            parts.append("No federated bundles")
        for item in reply.bundles:
            rule = "*" * 40
            parts.append(f"{rule}\n* {item.trust_domain}\n{rule}")
            parts.append(render_bundle(item, bundle_format).rstrip("\n") + "\n")
    emit(output, {"bundles": [message_to_dict(b) for b in reply.bundles]}, "\n".join(parts))


@bundle.command(name="set")
@admin_options
@_trust_domain_option
@click.option(
    "--path",
    "path",
    default="-",
    show_default=True,
    metavar="FILE",
    help="File with the bundle; - reads stdin.",
)
@_format_option
@click.option(
    "--force",
    is_flag=True,
    help="Store a bundle with no authorities (all of the trust domain's keys revoked).",
)
def set_bundle(
    socket_path: str, output: str, trust_domain: str, path: str, bundle_format: str, force: bool
) -> None:
    """Create or replace a federated bundle."""
    if path == "-":
        data = sys.stdin.buffer.read()
    else:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise CliError(f"--path: cannot read {path}: {exc.strerror}") from None
    # Check locally so a wrong file or format fails with a precise message.
    if bundle_format == "pem":
        X509Bundle.parse_pem(trust_domain, data)
    else:
        parsed = Bundle.parse(trust_domain, data)
        if not parsed.x509_authorities and not parsed.jwt_authorities and not force:
            raise CliError(
                f"the bundle for {trust_domain} has no X.509 or JWT authorities, so nothing "
                "from that trust domain would verify any more; pass --force to store it anyway"
            )
    with AdminClient(socket_path) as client:
        reply = client.call(
            client.bundles.SetFederatedBundle,
            admin_pb2.SetFederatedBundleRequest(
                trust_domain=trust_domain, format=bundle_format, data=data, force=force
            ),
            noun="bundle",
        )
    emit(output, message_to_dict(reply), f"Bundle set for {trust_domain}")


@bundle.command()
@admin_options
@_trust_domain_option
def delete(socket_path: str, output: str, trust_domain: str) -> None:
    """Delete a federated bundle."""
    with AdminClient(socket_path) as client:
        client.call(
            client.bundles.DeleteFederatedBundle,
            admin_pb2.DeleteFederatedBundleRequest(trust_domain=trust_domain),
            noun="bundle",
        )
    emit(output, {"trust_domain": trust_domain}, f"Bundle deleted for {trust_domain}")
