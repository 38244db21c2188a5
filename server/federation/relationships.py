"""What a federation relationship may hold (checked before anything is stored)."""

from __future__ import annotations

from typing import Final
from urllib.parse import urlsplit

from credo.errors import InvalidSpiffeId
from credo.spiffe_id import SpiffeId, TrustDomain
from server.datastore.models import FederationRelationship
from server.federation.errors import InvalidRelationship

__all__ = ["PROFILES", "PROFILE_HTTPS_SPIFFE", "PROFILE_HTTPS_WEB", "check_relationship"]

PROFILE_HTTPS_SPIFFE: Final = "https_spiffe"
PROFILE_HTTPS_WEB: Final = "https_web"
PROFILES: Final = (PROFILE_HTTPS_SPIFFE, PROFILE_HTTPS_WEB)


def check_relationship(rel: FederationRelationship, own: TrustDomain) -> FederationRelationship:
    """``rel`` normalised (trust domain name), or :class:`InvalidRelationship`."""
    try:
        td = TrustDomain.parse(rel.trust_domain)
    except InvalidSpiffeId as err:
        raise InvalidRelationship("trust_domain", str(err)) from None
    if td == own:
        raise InvalidRelationship(
            "trust_domain", f"{td.name} is this server's own trust domain; federate with another"
        )
    url = rel.bundle_endpoint_url
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as err:
        raise InvalidRelationship(
            "bundle_endpoint_url", f"{url[:200]!r} is not a URL: {err}"
        ) from None
    if parts.scheme != "https" or not parts.hostname:
        raise InvalidRelationship(
            "bundle_endpoint_url",
            f"expected an https URL like https://bundle.{td.name}:8443/bundle, got {url[:200]!r}",
        )
    if parts.username is not None or parts.fragment or port == 0:
        raise InvalidRelationship(
            "bundle_endpoint_url", f"{url[:200]!r} must have no user info, fragment or port 0"
        )
    if rel.bundle_endpoint_profile not in PROFILES:
        raise InvalidRelationship(
            "bundle_endpoint_profile",
            f"{rel.bundle_endpoint_profile!r} is not one of {', '.join(PROFILES)}",
        )
    endpoint_id = rel.endpoint_spiffe_id
    if rel.bundle_endpoint_profile == PROFILE_HTTPS_SPIFFE:
        if not endpoint_id:
            raise InvalidRelationship(
                "endpoint_spiffe_id",
                f"https_spiffe needs the endpoint's SPIFFE ID, e.g. spiffe://{td.name}/credo/server",
            )
        try:
            endpoint_id = str(SpiffeId.parse(endpoint_id))
        except InvalidSpiffeId as err:
            raise InvalidRelationship("endpoint_spiffe_id", str(err)) from None
    elif endpoint_id:
        raise InvalidRelationship(
            "endpoint_spiffe_id", "only https_spiffe endpoints are identified by a SPIFFE ID"
        )
    return FederationRelationship(
        trust_domain=td.name,
        bundle_endpoint_url=url,
        bundle_endpoint_profile=rel.bundle_endpoint_profile,
        endpoint_spiffe_id=endpoint_id,
        created_at=rel.created_at,
        last_refresh_at=rel.last_refresh_at,
        last_error=rel.last_error,
    )
