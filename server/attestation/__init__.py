"""Node attestation: proving which node an agent runs on, and naming it.

* :mod:`server.attestation.protocol`: the :class:`NodeAttestor` protocol and
  :class:`AttestationResult`;
* :mod:`server.attestation.catalog`: the plugins by name, each with its config dataclass
  (``[server.node_attestor.<name>]``);
* :mod:`server.attestation.errors`: :class:`AttestationError` and its tree;
* one module per plugin (:mod:`server.attestation.join_token`,
  :mod:`server.attestation.k8s_psat`).

What the server does with a result (bans, re-attestation, alias entries, the agent SVID)
lives in :mod:`server.agents.attestation`.
"""

from __future__ import annotations

from server.attestation.errors import (
    AttestationError,
    AttestationUnavailable,
    UnknownNodeAttestor,
)
from server.attestation.protocol import AttestationResult, NodeAttestor

__all__ = [
    "AttestationError",
    "AttestationResult",
    "AttestationUnavailable",
    "NodeAttestor",
    "UnknownNodeAttestor",
]
