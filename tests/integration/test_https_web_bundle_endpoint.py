"""The bundle endpoint with a web PKI certificate (from a local test CA): an agent
bootstraps from it (``trust_bundle_url``), and another server federates with it
(``https_web``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.processes import (
    AgentProcess,
    create_entry,
    join_token,
    short_temp_dir,
    start_server,
    wait_for,
)
from tests.helpers.webpki import WebCa


@pytest.mark.slow
def test_agent_bootstrap_and_federation_over_https_web(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """B serves its bundle with a web certificate; an agent started with only
    --trust-bundle-url (no copied bundle.pem) attests to B, also after B's CA rotated; A
    federates with B through the https_web profile."""
    ca = WebCa()
    roots = tmp_path / "web-roots.pem"
    roots.write_bytes(ca.root_pem)
    monkeypatch.setenv("SSL_CERT_FILE", str(roots))  # the "system" web PKI of every process
    cert, key = ca.write(tmp_path, ["localhost"])
    config = tmp_path / "b.toml"
    config.write_text(
        f'[server.http]\nbind_address = "127.0.0.1:0"\n'
        f'tls_cert_file = "{cert}"\ntls_key_file = "{key}"\n'
    )
    with (
        start_server(tmp_path / "b", trust_domain="b.test", config=config) as server_b,
        start_server(
            tmp_path / "a", trust_domain="a.test", http_bind_address="127.0.0.1:0"
        ) as server_a,
    ):
        url = f"{server_b.http_url}/bundle"
        # A CA rotation first: a bundle.pem copied before it would now be stale.
        new_ca = server_b.cli_json("localauthority", "x509", "prepare")["authority_id"]
        server_b.cli_json("localauthority", "x509", "activate", "--authority-id", new_ca)
        agent = AgentProcess(
            short_temp_dir(),
            server_b.address,
            None,
            join_token(server_b),
            trust_domain="b.test",
            flags={"trust_bundle_url": url, "trust_bundle_format": "spiffe"},
        )
        with agent.start():
            create_entry(server_b, agent.spiffe_id, "spiffe://b.test/ai/agent")
            assert wait_for(agent.fetch_ids, 30, "the SVID") == ["spiffe://b.test/ai/agent"]
            assert "fetched the bootstrap trust bundle" in agent.logs

        server_a.cli_json(
            "federation",
            "create",
            "--trust-domain",
            "b.test",
            "--bundle-endpoint-url",
            url,
            "--bundle-endpoint-profile",
            "https_web",
        )

        def fetched() -> bool:
            shown = server_a.cli_json("federation", "show", "--trust-domain", "b.test")
            return bool(shown["bundle_sequence"] >= 1 and not shown["last_error"])

        wait_for(fetched, 30, "A to fetch B's bundle over https_web")
        federated = server_a.cli("bundle", "list", "--format", "spiffe", output="json")
        assert json.loads(federated.stdout)["bundles"][0]["trust_domain"] == "b.test"


def test_a_bad_trust_bundle_url_stops_the_agent_with_one_line(tmp_path: Path) -> None:
    """A trust_bundle_url whose certificate does not verify stops the agent with a line
    naming the URL, before anything is sent to a server."""
    with start_server(tmp_path, http_bind_address="127.0.0.1:0") as server:
        agent = AgentProcess(
            short_temp_dir(),
            server.address,
            None,
            join_token(server),
            flags={"trust_bundle_url": f"{server.http_url}/bundle"},
        )
        agent.start(wait=False)
        assert agent.proc is not None
        assert agent.proc.wait(60) != 0
        assert f"{server.http_url}/bundle" in agent.logs
        assert "certificate does not verify" in agent.logs
        assert "Traceback" not in agent.logs
