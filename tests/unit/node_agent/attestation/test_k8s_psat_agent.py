"""The agent's k8s_psat node attestor: the projected token, read fresh, as attestation data."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from node_agent.attestation.errors import NoAttestationData
from node_agent.attestation.k8s_psat import K8sPsatAttestor, K8sPsatConfig


def test_payload_carries_the_cluster_and_the_token_read_at_each_attestation(
    tmp_path: Path,
) -> None:
    """The payload is {"cluster", "token"} JSON with the token as on disk now: a token the
    kubelet rotated is the one sent next time; the plugin may attest again."""
    token = tmp_path / "credo-agent"
    token.write_text("first.token.value\n")
    attestor = K8sPsatAttestor(K8sPsatConfig("prod", token))
    assert (attestor.type, attestor.can_reattest) == ("k8s_psat", True)
    assert json.loads(asyncio.run(attestor.payload())) == {
        "cluster": "prod",
        "token": "first.token.value",
    }
    token.write_text("rotated.token.value")
    assert json.loads(asyncio.run(attestor.payload()))["token"] == "rotated.token.value"


@pytest.mark.parametrize("content", [None, "", "  \n"], ids=["missing", "empty", "blank"])
def test_no_token_means_no_attestation_data(tmp_path: Path, content: str | None) -> None:
    """Without a token file (or with an empty one) there is nothing to attest with, and the
    error says where the token was expected and how to get one there."""
    token = tmp_path / "credo-agent"
    if content is not None:
        token.write_text(content)
    with pytest.raises(NoAttestationData) as info:
        asyncio.run(K8sPsatAttestor(K8sPsatConfig("prod", token)).payload())
    assert str(token) in info.value.missing
    assert "mount a projected service account token" in info.value.hint
