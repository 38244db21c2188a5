"""What agent and server agree on beyond the protobuf messages: why the server refused a call.

When the signing server refuses a node agent's call because of who the agent is or what
it may do, the call ends with a gRPC error status whose trailing metadata carries
:data:`REFUSAL_KEY` (``credo-refusal``) set to one :class:`Refusal` code. The status
message stays prose for people; agents act on the code:

======================  =====================================================================
code                    meaning, and what an agent does
======================  =====================================================================
``banned``              an operator banned this agent: stop; only an operator can undo it
``evicted``             the server has no record of this agent (never attested, or deleted
                        by an operator): attest again with new attestation data
``svid_expired``        the agent SVID the call presented has expired: attest again
``svid_not_current``    the agent SVID is not the one the server last issued (a newer one
                        was used since): use the newest
``untrusted_authority`` the CA that signed the agent SVID is no longer trusted: attest again
``no_agent_svid``       the call needs the agent SVID as TLS client certificate (or it was
                        unreadable): attest first
``not_an_agent``        the client certificate is not an agent SVID of this trust domain
``not_authorized``      the agent is not authorized for the registration entry it named
``rate_limited``        too many calls: retry later, with backoff
``attestation_refused`` the attestation data proves nothing (unknown, used or expired join
                        token, unknown attestor type, or an agent that may not re-attest)
======================  =====================================================================

Keepalive (:data:`AGENT_CHANNEL_KEEPALIVE`, :data:`AGENT_SERVER_KEEPALIVE`): the agent pings
an idle connection every 30 s (its sync stream is quiet between changes); the server accepts
pings every 20 s or slower, also while no call is open, so the agent's pings never count as
abuse (a server that allowed only the gRPC default of one ping per 5 minutes answered them
with ``GOAWAY too_many_pings`` and cut the sync stream every few minutes). The server pings
an idle agent every 60 s to find dead connections. Both lists live here so that they cannot
drift apart.

Calls that fail for other reasons (a malformed request, the server shutting down, the
datastore unavailable) carry no ``credo-refusal``: the status code alone says what to do.
Per-item failures inside ``BatchNewX509SVID`` are statuses in the response, not refusals.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from enum import StrEnum
from typing import Final

__all__ = [
    "AGENT_CHANNEL_KEEPALIVE",
    "AGENT_SERVER_KEEPALIVE",
    "REFUSAL_KEY",
    "Refusal",
    "entries_digest",
    "refusal_in",
]

_AGENT_PING_MS: Final = 30_000
"""How often the agent pings an idle connection to the server."""

AGENT_CHANNEL_KEEPALIVE: Final[tuple[tuple[str, int], ...]] = (
    ("grpc.keepalive_time_ms", _AGENT_PING_MS),
    ("grpc.keepalive_timeout_ms", 10_000),
    # Ping even when no data flows (a sync stream is idle between changes).
    ("grpc.http2.max_pings_without_data", 0),
)
"""The agent's channel options for keepalive (see the module doc)."""

AGENT_SERVER_KEEPALIVE: Final[tuple[tuple[str, int], ...]] = (
    # Accept the agent's pings: anything at least this far apart (below its interval).
    ("grpc.http2.min_ping_interval_without_data_ms", _AGENT_PING_MS * 2 // 3),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_ping_strikes", 2),
    # The server's own pings, to find agents that went away without closing.
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
)
"""The agent endpoint's server options for keepalive (see the module doc)."""

REFUSAL_KEY: Final = "credo-refusal"
"""The trailing metadata key of a refused agent call (gRPC metadata keys are lower case)."""


class Refusal(StrEnum):
    """Why the server refused an agent's call; the value goes on the wire."""

    BANNED = "banned"
    EVICTED = "evicted"
    SVID_EXPIRED = "svid_expired"
    SVID_NOT_CURRENT = "svid_not_current"
    UNTRUSTED_AUTHORITY = "untrusted_authority"
    NO_AGENT_SVID = "no_agent_svid"
    NOT_AN_AGENT = "not_an_agent"
    NOT_AUTHORIZED = "not_authorized"
    RATE_LIMITED = "rate_limited"
    ATTESTATION_REFUSED = "attestation_refused"


def refusal_in(metadata: Iterable[tuple[str, str | bytes]] | None) -> Refusal | None:
    """The :class:`Refusal` in a call's trailing metadata; None if absent or not a known code."""
    for key, value in metadata or ():
        if key != REFUSAL_KEY:
            continue
        text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
        try:
            return Refusal(text)
        except ValueError:
            return None
    return None


def entries_digest(revisions: Iterable[tuple[str, int]]) -> bytes:
    """The digest a sync heartbeat carries of a set of entries, from ``(id, revision)``
    pairs: SHA-256 over the lines ``"<id> <revision>\\n"`` sorted by id. Server and agent
    compute it the same way; equal digests mean the agent holds what the server sends."""
    digest = hashlib.sha256()
    for entry_id, revision in sorted(revisions):
        digest.update(f"{entry_id} {revision}\n".encode())
    return digest.digest()
