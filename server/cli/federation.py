"""``credo-server federation create|show|list|update|delete``: federated trust domains.

As SPIRE's ``spire-server federation``: each relationship names a trust domain, where its
SPIFFE bundle endpoint is (``--bundle-endpoint-url``), how that endpoint authenticates
(``--bundle-endpoint-profile https_spiffe|https_web``; ``https_spiffe`` also needs
``--endpoint-spiffe-id``) and, for an ``https_spiffe`` endpoint of that same trust domain,
its first bundle (``--trust-domain-bundle FILE``, SPIFFE JSON or PEM): the server verifies
the endpoint with it, then keeps the bundle fresh by itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from credo._proto.credo.server.v1 import admin_pb2
from server.cli.client import AdminClient
from server.cli.errors import CliError
from server.cli.output import emit, format_time, message_to_dict
from server.cli.params import TRUST_DOMAIN, admin_options
from server.federation.relationships import PROFILES

__all__ = ["federation"]


def _relationship_options(f: Any) -> Any:
    for option in reversed(
        [
            click.option(
                "--trust-domain",
                "trust_domain",
                type=TRUST_DOMAIN,
                required=True,
                help="The federated trust domain, e.g. partner.example.",
            ),
            click.option(
                "--bundle-endpoint-url",
                required=True,
                metavar="URL",
                help="Its SPIFFE bundle endpoint (https://...).",
            ),
            click.option(
                "--bundle-endpoint-profile",
                type=click.Choice(PROFILES),
                default="https_spiffe",
                show_default=True,
                help="How the endpoint authenticates: its X509-SVID, or a web PKI certificate.",
            ),
            click.option(
                "--endpoint-spiffe-id",
                default="",
                metavar="ID",
                help="https_spiffe: the endpoint's SPIFFE ID "
                "(e.g. spiffe://partner.example/credo/server).",
            ),
            click.option(
                "--trust-domain-bundle",
                "bundle_file",
                default=None,
                metavar="FILE",
                help="The trust domain's first bundle, to verify an https_spiffe endpoint "
                "before the first fetch.",
            ),
            click.option(
                "--trust-domain-bundle-format",
                type=click.Choice(("spiffe", "pem")),
                default="spiffe",
                show_default=True,
                help="Format of --trust-domain-bundle.",
            ),
        ]
    ):
        f = option(f)
    return f


def _request(
    trust_domain: str,
    bundle_endpoint_url: str,
    bundle_endpoint_profile: str,
    endpoint_spiffe_id: str,
    bundle_file: str | None,
    trust_domain_bundle_format: str,
) -> admin_pb2.FederationRelationship:
    data = b""
    if bundle_file is not None:
        try:
            data = Path(bundle_file).read_bytes()
        except OSError as err:
            raise CliError(
                f"cannot read --trust-domain-bundle {bundle_file}: {err.strerror or err}"
            ) from None
    return admin_pb2.FederationRelationship(
        trust_domain=trust_domain,
        bundle_endpoint_url=bundle_endpoint_url,
        bundle_endpoint_profile=bundle_endpoint_profile,
        endpoint_spiffe_id=endpoint_spiffe_id,
        trust_domain_bundle=data,
        trust_domain_bundle_format=trust_domain_bundle_format,
    )


def _render(rel: admin_pb2.FederationRelationship) -> str:
    rows = [
        ("Trust domain", rel.trust_domain),
        ("Bundle endpoint URL", rel.bundle_endpoint_url),
        ("Bundle endpoint profile", rel.bundle_endpoint_profile),
    ]
    if rel.endpoint_spiffe_id:
        rows.append(("Endpoint SPIFFE ID", rel.endpoint_spiffe_id))
    rows.append(
        ("Bundle sequence", str(rel.bundle_sequence) if rel.bundle_sequence >= 0 else "none yet")
    )
    rows.append(("Last refresh", format_time(rel.last_refresh_at)))
    if rel.last_error:
        rows.append(("Last error", rel.last_error))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}} : {v}" for k, v in rows) + "\n"


def _dict(rel: admin_pb2.FederationRelationship) -> dict[str, Any]:
    out = message_to_dict(rel)
    out.pop("trust_domain_bundle", None)
    out.pop("trust_domain_bundle_format", None)
    return out


@click.group()
def federation() -> None:
    """Manage federation relationships with other trust domains."""


@federation.command()
@admin_options
@_relationship_options
def create(socket_path: str, output: str, **fields: Any) -> None:
    """Federate with a trust domain: fetch its bundle from its bundle endpoint."""
    with AdminClient(socket_path) as client:
        reply = client.call(
            client.federation.CreateFederationRelationship,
            _request(**fields),
            noun="federation relationship",
        )
    emit(output, _dict(reply), _render(reply))


@federation.command()
@admin_options
@_relationship_options
def update(socket_path: str, output: str, **fields: Any) -> None:
    """Change a federation relationship (every field is replaced)."""
    with AdminClient(socket_path) as client:
        reply = client.call(
            client.federation.UpdateFederationRelationship,
            _request(**fields),
            noun="federation relationship",
        )
    emit(output, _dict(reply), _render(reply))


_td_option = click.option(
    "--trust-domain", "trust_domain", type=TRUST_DOMAIN, required=True, help="The trust domain."
)


@federation.command()
@admin_options
@_td_option
def show(socket_path: str, output: str, trust_domain: str) -> None:
    """Show one relationship and how its last refresh went."""
    with AdminClient(socket_path) as client:
        reply = client.call(
            client.federation.GetFederationRelationship,
            admin_pb2.GetFederationRelationshipRequest(trust_domain=trust_domain),
            noun="federation relationship",
        )
    emit(output, _dict(reply), _render(reply))


@federation.command(name="list")
@admin_options
def list_relationships(socket_path: str, output: str) -> None:
    """List the federation relationships."""
    with AdminClient(socket_path) as client:
        reply = client.call(
            client.federation.ListFederationRelationships,
            admin_pb2.ListFederationRelationshipsRequest(),
            noun="federation relationship",
        )
    text = "\n".join(_render(r) for r in reply.relationships) or "No federation relationships\n"
    emit(output, {"relationships": [_dict(r) for r in reply.relationships]}, text)


@federation.command()
@admin_options
@_td_option
def delete(socket_path: str, output: str, trust_domain: str) -> None:
    """Stop federating: delete the relationship and the trust domain's bundle."""
    with AdminClient(socket_path) as client:
        reply = client.call(
            client.federation.DeleteFederationRelationship,
            admin_pb2.GetFederationRelationshipRequest(trust_domain=trust_domain),
            noun="federation relationship",
        )
    emit(output, _dict(reply), f"Deleted the federation relationship with {reply.trust_domain}\n")
