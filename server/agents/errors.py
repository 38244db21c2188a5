"""Errors raised when the server refuses a node agent, or stops serving it.

::

    CredoError
    ├── AgentRefused                  the server refuses this agent's call; ``reason`` is the
    │   │                             credo-refusal code (credo._protocol.Refusal) agents act on
    │   ├── NoAgentSvid               no_agent_svid: no (readable) agent SVID on the call
    │   ├── NotAnAgent                not_an_agent: the certificate is not an agent SVID here
    │   ├── AgentSvidExpired          svid_expired: the agent SVID has expired
    │   ├── UntrustedAuthority        untrusted_authority: its CA is no longer trusted
    │   ├── AgentEvicted              evicted: no attested node by that ID (never, or deleted)
    │   ├── AgentBanned               banned: an operator banned the agent
    │   ├── AgentSvidNotCurrent       svid_not_current: a newer agent SVID has been used
    │   ├── EntryNotAuthorized        not_authorized: the entry is not the agent's to sign
    │   ├── RateLimited               rate_limited: too many calls from that agent or address
    │   └── ReattestationRefused      attestation_refused: the agent is known and its
    │                                 attestor does not allow attesting again
    └── ServerStopping                the server is shutting down; the agent reconnects

(Attestation data that proves nothing is :class:`server.attestation.errors.AttestationError`,
code ``attestation_refused`` too.) Messages are lower case and are sent to the agent. The API
layer (:mod:`server.api.errors`) maps these to gRPC status codes and puts ``reason`` in the
call's trailing metadata; nothing here knows about gRPC.
"""

from __future__ import annotations

from typing import ClassVar

from credo._protocol import Refusal
from credo.errors import CredoError

__all__ = [
    "AgentBanned",
    "AgentEvicted",
    "AgentRefused",
    "AgentSvidExpired",
    "AgentSvidNotCurrent",
    "EntryNotAuthorized",
    "NoAgentSvid",
    "NotAnAgent",
    "RateLimited",
    "ReattestationRefused",
    "ServerStopping",
    "UntrustedAuthority",
]


class AgentRefused(CredoError):
    """The server refuses the calling agent; ``reason`` says why in machine-readable form."""

    reason: ClassVar[Refusal]


class NoAgentSvid(AgentRefused):
    """The call carries no agent SVID as client certificate (or one that cannot be read)."""

    reason = Refusal.NO_AGENT_SVID


class NotAnAgent(AgentRefused):
    """The client certificate names a SPIFFE ID that is not an agent of this trust domain."""

    reason = Refusal.NOT_AN_AGENT


class AgentSvidExpired(AgentRefused):
    """The agent SVID has expired."""

    reason = Refusal.SVID_EXPIRED


class UntrustedAuthority(AgentRefused):
    """The agent SVID was signed by an authority that has since been revoked or pruned."""

    reason = Refusal.UNTRUSTED_AUTHORITY


class AgentEvicted(AgentRefused):
    """No attested node has the agent's ID: it never attested, or an operator deleted it."""

    reason = Refusal.EVICTED


class AgentBanned(AgentRefused):
    """An operator banned the agent."""

    reason = Refusal.BANNED

    def __init__(self, message: str = "agent is banned") -> None:
        super().__init__(message)


class AgentSvidNotCurrent(AgentRefused):
    """The agent SVID is neither the current one nor the one its last renewal issued."""

    reason = Refusal.SVID_NOT_CURRENT

    def __init__(self, message: str = "agent SVID is not current") -> None:
        super().__init__(message)


class EntryNotAuthorized(AgentRefused):
    """The registration entry ``entry_id`` is not authorized for the calling agent."""

    reason = Refusal.NOT_AUTHORIZED

    def __init__(self, entry_id: str) -> None:
        self.entry_id = entry_id
        super().__init__(f"entry {entry_id!r} is not authorized for this agent")


class RateLimited(AgentRefused):
    """More calls from one agent (or source address) than its rate allows."""

    reason = Refusal.RATE_LIMITED


class ReattestationRefused(AgentRefused):
    """The attested node exists already and its attestor's result does not allow attesting
    again (``AttestationResult.can_reattest`` is False)."""

    reason = Refusal.ATTESTATION_REFUSED

    def __init__(self, agent_id: str, attestation_type: str) -> None:
        self.agent_id = agent_id
        self.attestation_type = attestation_type
        super().__init__(
            f"agent is already attested and {attestation_type} does not allow attesting "
            "again; an operator must delete the agent first"
        )


class ServerStopping(CredoError):
    """The server is shutting down; open streams end and the agent reconnects."""

    def __init__(self, message: str = "server is shutting down; reconnect") -> None:
        super().__init__(message)
