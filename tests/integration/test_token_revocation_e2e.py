"""Revocation at the token endpoint, against a real ``credo-server`` over HTTPS.

Issue 12 "a revoked or expired SVID as client": a JWT-SVID whose ``jti`` is revoked, an
X509-SVID (mutual TLS) whose serial is revoked, and an SVID of a revoked entry are refused
with ``invalid_client``.
"""

from __future__ import annotations

import jwt
from cryptography import x509

from tests.helpers.processes import create_entry, wait_for
from tests.integration.test_token_exchange_e2e import (
    GIT,
    GRANT,
    ID_TOKEN,
    TD,
    Deployment,
    _form,
    deployment,
)

__all__ = ["deployment"]

CODER = f"spiffe://{TD}/agents/coder"


def _jti(token: str) -> str:
    return str(jwt.decode(token, options={"verify_signature": False})["jti"])


def _new_agent(d: Deployment, name: str, uid: str) -> tuple[str, str]:
    agent = f"spiffe://{TD}/agents/{name}"
    entry_id = create_entry(d.server, f"spiffe://{TD}/host", agent, f"unix:uid:{uid}")
    d.server.cli_json(
        "delegation", "create", "--agent-id", agent, "--subject-issuer", "corp",
        "--scope", "repo:read", "--audience", GIT,
    )  # fmt: skip
    return agent, entry_id


def test_revoked_jwt_svid_as_client_is_invalid_client(deployment: Deployment) -> None:
    d = deployment
    form = _form(d, CODER, scope="repo:read")
    assert d.post("/oauth2/token", form).status_code == 200
    d.server.cli_json("jwt", "revoke", "--jti", _jti(form["client_assertion"]), "--reason", "t")
    refused = d.post("/oauth2/token", form)
    assert refused.status_code == 401, refused.text
    assert refused.json()["error"] == "invalid_client"
    assert "revoked" in refused.json()["error_description"]
    # Another, unrevoked JWT-SVID of the same agent still works.
    assert d.post("/oauth2/token", _form(d, CODER, scope="repo:read")).status_code == 200


def test_revoked_x509_svid_over_mutual_tls_is_invalid_client(deployment: Deployment) -> None:
    d = deployment
    minted = d.server.cli_json("x509", "mint", "--spiffe-id", CODER)
    cert, key = d.ca_file.parent / "revoked.pem", d.ca_file.parent / "revoked.key"
    cert.write_text(minted["x509_svid"])
    key.write_text(minted["private_key"])
    key.chmod(0o600)
    form = {
        "grant_type": GRANT,
        "subject_token": d.person_token(),
        "subject_token_type": ID_TOKEN,
        "audience": GIT,
        "scope": "repo:read",
    }
    assert d.post("/oauth2/token", form, cert=(str(cert), str(key))).status_code == 200
    leaf = x509.load_pem_x509_certificate(minted["x509_svid"].encode())
    serial = format(leaf.serial_number, "x")
    d.server.cli_json("x509", "revoke", "--serial", serial, "--reason", "leaked")
    refused = d.post("/oauth2/token", form, cert=(str(cert), str(key)))
    assert refused.status_code == 401, refused.text
    assert refused.json()["error"] == "invalid_client"
    assert "client certificate has been revoked" in refused.json()["error_description"]


def test_svid_of_a_revoked_entry_is_invalid_client(deployment: Deployment) -> None:
    d = deployment
    agent, entry_id = _new_agent(d, "killed", "4545")
    assert d.post("/oauth2/token", _form(d, agent)).status_code == 200
    d.server.cli_json("entry", "revoke", "--id", entry_id, "--reason", "compromised")
    form = _form(d, agent)  # a fresh, unrevoked JWT-SVID: the identity itself is revoked

    def refused() -> bool:
        response = d.post("/oauth2/token", form)
        return response.status_code == 401 and response.json()["error"] == "invalid_client"

    wait_for(refused, 10, "the revoked entry's exchange to be refused")
