"""The ``k8s_psat`` node attestor: the pod's projected service account token.

Configured as ``[agent.node_attestor.k8s_psat]``, as in SPIRE::

    [agent.node_attestor.k8s_psat]
    cluster = "prod"                                    # required: the server's cluster name
    token_path = "/var/run/secrets/tokens/credo-agent"  # the default

The agent sends ``{"cluster": <cluster>, "token": <token>}`` (JSON); the server's
``k8s_psat`` attestor checks the token with a TokenReview and reads the agent's pod and
node. The token is read from disk at every attestation, because the kubelet rotates it.
The same node may attest again with a fresh token (``can_reattest``): the agent renews its
SVID that way, and attests again after losing its data directory. Its SPIFFE ID is
``spiffe://<td>/credo/agent/k8s_psat/<cluster>/<node uid>``.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from credo._reserved import agent_spiffe_id
from credo.errors import ConfigError, InvalidSpiffeId
from node_agent.attestation.errors import NoAttestationData

__all__ = ["DEFAULT_TOKEN_PATH", "K8S_PSAT", "K8sPsatAttestor", "K8sPsatConfig"]

K8S_PSAT: Final = "k8s_psat"
DEFAULT_TOKEN_PATH: Final = Path("/var/run/secrets/tokens/credo-agent")
MAX_TOKEN: Final = 64 * 1024


@dataclass(frozen=True)
class K8sPsatConfig:
    """The ``[agent.node_attestor.k8s_psat]`` table."""

    cluster: str = ""
    token_path: Path = DEFAULT_TOKEN_PATH

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad field."""
        if not self.cluster:
            raise ConfigError(
                "cluster: is required: the name of this cluster in the server's "
                "[server.node_attestor.k8s_psat.clusters.<name>] table"
            )
        try:
            agent_spiffe_id("example.org", K8S_PSAT, self.cluster, "node")
        except InvalidSpiffeId:
            raise ConfigError(
                f"cluster: {self.cluster!r} cannot be part of a SPIFFE ID; use letters, "
                "digits, '.', '-' and '_'"
            ) from None


class K8sPsatAttestor:
    """Attests with the projected service account token at ``token_path``, read afresh."""

    type: Final = K8S_PSAT
    can_reattest: Final = True

    def __init__(self, config: K8sPsatConfig) -> None:
        self.config = config

    async def payload(self) -> bytes:
        """``{"cluster": ..., "token": ...}``; :class:`NoAttestationData` without a token."""
        token = await asyncio.to_thread(self._read_token)
        return json.dumps({"cluster": self.config.cluster, "token": token}).encode()

    def _read_token(self) -> str:
        path = self.config.token_path
        hint = (
            "mount a projected service account token with the server's audience there "
            "(the Helm chart does), or set token_path in [agent.node_attestor.k8s_psat]"
        )
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_TOKEN + 1)
        except OSError as exc:
            raise NoAttestationData(
                f"no service account token at {path} ({exc.strerror})", hint
            ) from None
        if len(data) > MAX_TOKEN:
            raise NoAttestationData(f"the token at {path} is larger than {MAX_TOKEN} bytes", hint)
        token = data.decode("utf-8", "replace").strip()
        if not token:
            raise NoAttestationData(f"the service account token at {path} is empty", hint)
        return token
