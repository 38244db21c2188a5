"""Node attestation: proving which node an agent runs on, and naming it.

A :class:`NodeAttestor` turns the attestation payload an agent sends into the agent's
SPIFFE ID and node selectors, or raises :class:`AttestationError`. The agent API looks
the attestor up by the payload's ``type`` (``join_token``, later ``k8s_psat``).

::

    CredoError
    └── AttestationError              the payload does not prove anything (refuse the agent)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from credo.errors import CredoError
from credo.selector import Selector
from credo.spiffe_id import SpiffeId

__all__ = ["AttestationError", "AttestationResult", "NodeAttestor"]


class AttestationError(CredoError):
    """The attestation data was refused; the message says why, for the agent's operator."""


@dataclass(frozen=True)
class AttestationResult:
    """Who the agent is, what is known about its node, and any node-alias to create.

    ``alias_id``: a SPIFFE ID the agent should also be known by (a join token created
    with ``--spiffe-id``); the agent API records it as an entry parented to the agent.
    """

    agent_id: SpiffeId
    selectors: list[Selector] = field(default_factory=list)
    can_reattest: bool = False
    alias_id: SpiffeId | None = None


class NodeAttestor(Protocol):
    """Verifies one kind of attestation data."""

    @property
    def type(self) -> str:
        """The attestation data ``type`` this attestor handles, e.g. ``join_token``."""
        ...

    def attest(self, payload: bytes) -> AttestationResult:
        """Verify ``payload``; raise :class:`AttestationError` if it proves nothing."""
        ...
