"""The node attestor interface: what the agent sends the server to prove which node it is.

A node attestor plugin (``join_token`` today, ``k8s_psat`` next) turns facts of the node
into attestation data: a ``type`` naming the plugin (the server's attestor of the same
name verifies it) and a ``payload``. Plugins are listed in
:mod:`node_agent.attestation.catalog` and configured as ``[agent.node_attestor.<name>]``.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["NodeAttestor"]


class NodeAttestor(Protocol):
    """Something that can produce this node's attestation data."""

    @property
    def type(self) -> str:
        """The attestation data type, the plugin's name (``"join_token"``)."""
        ...

    @property
    def can_reattest(self) -> bool:
        """True when the same node may attest again (a fresh service-account token); False
        when its data works once (a join token): then the agent SVID is renewed instead."""
        ...

    async def payload(self) -> bytes:
        """The attestation data to send now.

        Raises :class:`~node_agent.attestation.errors.NoAttestationData` when the plugin has
        nothing to attest with (no join token given).
        """
        ...
