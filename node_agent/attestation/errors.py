"""Errors of the agent's node attestation.

::

    CredoError
    └── NodeAttestationError                 establishing the agent's identity failed
        ├── NoAttestationData                the node attestor has nothing to attest with
        ├── NoAgentCredentials               no stored agent SVID and nothing to attest with
        └── AttestationRejected              the server refused the attestation data

Failures of the calls themselves (:class:`~node_agent.errors.ServerUnreachable`) and a
ban (:class:`~node_agent.errors.AgentBanned`) are the server client's errors,
:mod:`node_agent.errors`.
"""

from __future__ import annotations

from credo.errors import CredoError

__all__ = [
    "AttestationRejected",
    "NoAgentCredentials",
    "NoAttestationData",
    "NodeAttestationError",
]


class NodeAttestationError(CredoError):
    """The agent could not establish or keep its identity with the server."""


class NoAttestationData(NodeAttestationError):
    """The node attestor has nothing to attest with; ``missing`` says what, ``hint`` how to
    get it."""

    def __init__(self, missing: str, hint: str) -> None:
        self.missing = missing
        self.hint = hint
        super().__init__(f"{missing}; {hint}")


class NoAgentCredentials(NodeAttestationError):
    """There is no usable stored agent SVID and nothing to attest with."""


class AttestationRejected(NodeAttestationError):
    """The server refused the node attestation (bad, used or expired join token, ...)."""
