"""Errors of the node agent's calls to the signing server (:mod:`node_agent.server_client`).

::

    CredoError
    ├── ServerClientError                  a call to the server failed; worth retrying later
    │   ├── ServerUnreachable              no server answered, or the one that did is not it
    │   │   └── ServerNotTrusted           its certificate does not chain to the trusted CAs
    │   ├── ServerRefused                  the server answered with an error (code, reason)
    │   └── BadServerResponse              the server's answer is unusable (a malformed SVID)
    └── AgentRemoved                       the server banned or evicted this agent: fatal
        ├── AgentBanned
        └── AgentEvicted

:class:`AgentRemoved` is deliberately not a :class:`ServerClientError`: retry loops catch
``ServerClientError`` and back off, and a ban must never be retried. When the client
raises it, the stored agent SVID has already been deleted.

Errors of the agent's other parts live beside them: ``node_agent/attestation/errors.py``
(node attestation), ``cache/errors.py``, ``workload/errors.py``.
"""

from __future__ import annotations

from credo._protocol import Refusal
from credo.errors import CredoError

__all__ = [
    "AgentBanned",
    "AgentEvicted",
    "AgentRemoved",
    "BadServerResponse",
    "ServerClientError",
    "ServerNotTrusted",
    "ServerRefused",
    "ServerUnreachable",
]


class ServerClientError(CredoError):
    """A call to the signing server failed; the caller may retry it later."""


class ServerUnreachable(ServerClientError):
    """No server answered, or the one that did failed identity verification."""


class ServerNotTrusted(ServerUnreachable):
    """The server's certificate does not chain to the X.509 authorities the agent trusts
    (a bootstrap bundle older than the server's current CA, or not this trust domain's)."""


class ServerRefused(ServerClientError):
    """The server answered the call with an error.

    ``code`` is the gRPC status name (``"PERMISSION_DENIED"``), ``message`` the server's
    words, ``reason`` the machine-readable :class:`~credo._protocol.Refusal` when the server
    sent one, and ``server`` the address that answered.
    """

    def __init__(
        self, code: str, message: str, reason: Refusal | None = None, *, server: str = ""
    ) -> None:
        self.code = code
        self.message = message
        self.reason = reason
        self.server = server
        super().__init__(f"{code}: {message}")

    @property
    def retryable(self) -> bool:
        """True when the same call may succeed later unchanged (rate limited)."""
        return self.reason is Refusal.RATE_LIMITED or self.code == "RESOURCE_EXHAUSTED"


class BadServerResponse(ServerClientError):
    """The server answered, but with something the agent cannot use."""


class AgentRemoved(CredoError):
    """The server banned or evicted this agent; its stored SVID has been deleted."""

    action = "removed"

    def __init__(self, agent_id: str) -> None:
        self.agent_id = agent_id
        super().__init__(
            f"agent {agent_id} was {self.action} by the server; its SVID was deleted. "
            "Attest again with a new join token"
        )


class AgentBanned(AgentRemoved):
    """The server says this agent is banned."""

    action = "banned"


class AgentEvicted(AgentRemoved):
    """The server no longer knows this agent (its attested node was deleted)."""

    action = "evicted"
