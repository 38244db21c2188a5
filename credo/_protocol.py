"""Wire facts of Credo's own agent API that both the server and the agent must spell alike.

When the signing server refuses an agent's call it says why in machine-readable form, in
the call's trailing metadata under :data:`REFUSAL_METADATA_KEY`, with one of the
:class:`Refusal` values; the status message stays prose for people. The agent decides
"banned" or "evicted" from this value, never from the words of the message.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["REFUSAL_METADATA_KEY", "Refusal"]

REFUSAL_METADATA_KEY = "credo-refusal"
"""Trailing-metadata key carrying a :class:`Refusal` value (gRPC keys are lower case)."""


class Refusal(StrEnum):
    """Why the server refused an agent's call (the value under :data:`REFUSAL_METADATA_KEY`)."""

    BANNED = "banned"
    """The agent is banned: it must not attest or call again."""
    EVICTED = "evicted"
    """The agent's attested node was deleted: it must attest again."""
    SVID_EXPIRED = "svid_expired"
    """The agent SVID presented has expired."""
    SVID_NOT_CURRENT = "svid_not_current"
    """The agent SVID presented is not the one the server issued last."""
    UNTRUSTED_AUTHORITY = "untrusted_authority"
    """The agent SVID was signed by an authority the server no longer trusts."""
    NOT_AUTHORIZED = "not_authorized"
    """The caller may not do this (not an agent, or the entry is not authorized for it)."""
    RATE_LIMITED = "rate_limited"
    """Too many calls; try again later."""
    ATTESTATION_REFUSED = "attestation_refused"
    """The node attestation data was refused (unknown or used join token, ...)."""
