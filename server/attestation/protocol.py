"""What a server node attestor is: the :class:`NodeAttestor` protocol and its result.

A :class:`NodeAttestor` turns the attestation payload an agent sends into the agent's
SPIFFE ID and node selectors, or raises :class:`~server.attestation.errors.AttestationError`.
The server looks the attestor up by the payload's ``type`` (``join_token``, later
``k8s_psat``); :mod:`server.attestation.catalog` lists the plugins there are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from credo.selector import Selector
from credo.spiffe_id import SpiffeId

__all__ = ["AttestationResult", "NodeAttestor"]


@dataclass(frozen=True)
class AttestationResult:
    """Who the agent is, what is known about its node, and any node-alias to create.

    ``can_reattest``: whether the same agent may attest again with fresh attestation data
    of this plugin (a projected service-account token can be presented again; a join token
    cannot). When False, attestation data that names an agent the server already knows is
    refused.

    ``alias_id``: a SPIFFE ID the agent should also be known by (a join token created
    with ``--spiffe-id``); the server records it as an entry parented to the agent.
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
