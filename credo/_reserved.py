"""Names Credo keeps for its own signing server and agents, so that no workload SVID can carry them.

SPIFFE ID paths. Everything under ``/credo`` belongs to Credo itself:

* ``spiffe://<td>/credo/server`` is the signing server's own SVID (:func:`server_spiffe_id`);
* ``spiffe://<td>/credo/agent/<attestor>/...`` are node agents (:func:`agent_spiffe_id`,
  :func:`is_agent_id`), e.g. ``/credo/agent/join_token/<token>``.

No registration entry, join-token alias or minted SVID may name a path under ``/credo``
(:func:`is_reserved_path`): were that allowed, a workload could pose as an agent or as the
server.

DNS names. Agents dial the server by address but check its certificate against
:data:`SERVER_TLS_NAME` (gRPC's ``ssl_target_name_override``). Were that name one a
registration entry could also ask for (``localhost``, say), a workload holding such an
SVID could pose as the server to agents on the network path. The server therefore
refuses every DNS name under :data:`RESERVED_DNS_SUFFIX` in entries and minted SVIDs.
``.invalid`` is reserved by RFC 2606, so the name can never resolve or be issued
publicly.
"""

from __future__ import annotations

from typing import Final

from credo.spiffe_id import SpiffeId, TrustDomain

__all__ = [
    "AGENT_PATH_PREFIX",
    "RESERVED_DNS_SUFFIX",
    "RESERVED_PATH_PREFIX",
    "SERVER_PATH",
    "SERVER_TLS_NAME",
    "agent_spiffe_id",
    "is_agent_id",
    "is_reserved_dns_name",
    "is_reserved_path",
    "server_spiffe_id",
]

_CREDO: Final = "credo"
_AGENT: Final = "agent"
_SERVER: Final = "server"

RESERVED_PATH_PREFIX: Final = f"/{_CREDO}/"
"""SPIFFE ID paths under this prefix (and ``/credo`` itself) are Credo's own."""
AGENT_PATH_PREFIX: Final = f"/{_CREDO}/{_AGENT}/"
"""The path prefix of every node agent's SPIFFE ID."""
SERVER_PATH: Final = f"/{_CREDO}/{_SERVER}"
"""The path of the signing server's own SPIFFE ID."""

RESERVED_DNS_SUFFIX: Final = "credo.invalid"
SERVER_TLS_NAME: Final = f"server.{RESERVED_DNS_SUFFIX}"


def server_spiffe_id(trust_domain: TrustDomain | str) -> SpiffeId:
    """The signing server's own SPIFFE ID, ``spiffe://<td>/credo/server``."""
    return SpiffeId.from_segments(trust_domain, _CREDO, _SERVER)


def agent_spiffe_id(trust_domain: TrustDomain | str, attestor: str, *segments: str) -> SpiffeId:
    """A node agent's SPIFFE ID, ``spiffe://<td>/credo/agent/<attestor>/<segments...>``.

    Raises :class:`~credo.errors.InvalidSpiffeId` if a segment is not a valid path segment.
    """
    return SpiffeId.from_segments(trust_domain, _CREDO, _AGENT, attestor, *segments)


def is_agent_id(spiffe_id: SpiffeId, trust_domain: TrustDomain) -> bool:
    """True when ``spiffe_id`` is a node agent's ID in ``trust_domain``."""
    return spiffe_id.is_member_of(trust_domain) and spiffe_id.path.startswith(AGENT_PATH_PREFIX)


def is_reserved_path(path: str) -> bool:
    """True for ``/credo`` and every SPIFFE ID path under it."""
    return (path + "/").startswith(RESERVED_PATH_PREFIX)


def is_reserved_dns_name(name: str) -> bool:
    """True for ``credo.invalid`` and every name (wildcards included) under it."""
    lowered = name.lower().rstrip(".")
    return lowered == RESERVED_DNS_SUFFIX or lowered.endswith("." + RESERVED_DNS_SUFFIX)
