"""Errors of the agent's standing with the signing server.

::

    CredoError
    └── NodeAttestationError                 attesting to / talking with the server failed
        ├── NoAgentCredentials               no stored agent SVID and no join token
        ├── AttestationRejected              the server refused the attestation data
        ├── AgentBanned                      the server banned this agent (fatal)
        └── ServerUnreachable                no server answered, or one failed verification
"""

from __future__ import annotations

from credo.errors import CredoError

__all__ = [
    "AgentBanned",
    "AttestationRejected",
    "NoAgentCredentials",
    "NodeAttestationError",
    "ServerUnreachable",
]


class NodeAttestationError(CredoError):
    """The agent could not establish or keep its identity with the server."""


class NoAgentCredentials(NodeAttestationError):
    """There is no usable stored agent SVID and no join token to attest with."""


class AttestationRejected(NodeAttestationError):
    """The server refused the node attestation (bad, used or expired join token, ...)."""


class AgentBanned(NodeAttestationError):
    """The server says this agent is banned (or evicted); its stored SVID has been deleted."""

    def __init__(self, agent_id: str, action: str = "banned") -> None:
        self.agent_id = agent_id
        self.action = action
        super().__init__(
            f"agent {agent_id} was {action} by the server; its SVID was deleted. "
            "Attest again with a new join token"
        )


class ServerUnreachable(NodeAttestationError):
    """No server answered, or the one that did failed identity verification."""
