"""The ``join_token`` node attestor: a single-use token from ``credo-server token generate``.

Configured as ``[agent.node_attestor.join_token]`` (no settings of its own, as in SPIRE);
the token itself is the agent's ``join_token`` setting, best given once with
``--join-token-file FILE``, ``--join-token -`` (stdin) or ``$CREDO_JOIN_TOKEN`` (a token
in the arguments is visible in ``ps``): it works only once, and afterwards the agent
resumes with its stored SVID. The agent ID becomes ``spiffe://<td>/credo/agent/join_token/<token>``.
"""

from __future__ import annotations

from dataclasses import dataclass

from node_agent.attestation.errors import NoAttestationData

__all__ = ["JoinTokenAttestor", "JoinTokenConfig"]


@dataclass(frozen=True)
class JoinTokenConfig:
    """The ``[agent.node_attestor.join_token]`` table: no settings (the token is a flag)."""


class JoinTokenAttestor:
    """Attests with the join token, once."""

    type = "join_token"
    can_reattest = False

    def __init__(self, config: JoinTokenConfig, token: str | None) -> None:
        self.config = config
        self._token = token

    async def payload(self) -> bytes:
        """The token's bytes; :class:`NoAttestationData` when no token was given."""
        if not self._token:
            raise NoAttestationData(
                "no join token",
                "generate one with 'credo-server token generate' and give it with "
                "--join-token-file FILE, --join-token - (stdin) or $CREDO_JOIN_TOKEN",
            )
        return self._token.encode()
