"""Revocation at the token endpoint, against a real ``credo-server`` over HTTPS.

Issue 12 "a revoked or expired SVID as client": a JWT-SVID whose ``jti`` is revoked, an
X509-SVID (mutual TLS) whose serial is revoked, and an SVID of a revoked entry are refused
with ``invalid_client``.
"""

from __future__ import annotations

import shutil
from typing import Any

import jwt
import pytest
import requests
from cryptography import x509

import credo
from credo.bundle import Bundle, JwtBundle
from credo.errors import AccessTokenRevoked
from credo.revocation import IntrospectionRevocation, JwtRevocationList, PolledRevocationList
from credo.workload_client import WorkloadApiClient
from tests.helpers.processes import (
    create_entry,
    one_line_error,
    short_temp_dir,
    start_agent,
    wait_for,
)
from tests.integration.test_token_exchange_e2e import (
    ACCESS_TOKEN,
    GIT,
    GRANT,
    ID_TOKEN,
    JWT_SPIFFE,
    RESOURCE,
    REVIEWER,
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


def _jwt_bundle(d: Deployment) -> JwtBundle:
    shown = d.server.cli("bundle", "show", "--format", "spiffe", output=None).stdout
    return Bundle.parse(TD, shown).jwt_bundle()


def _revocation_list(d: Deployment) -> JwtRevocationList:
    return JwtRevocationList.fetch(f"{d.issuer}/jwt-revocations", _jwt_bundle(d), context=d.trust)


def _exchange(d: Deployment, agent: str, subject: str | None = None, **extra: str) -> str:
    fields = _form(d, agent, **extra)
    if subject is not None:
        fields.update(subject_token=subject, subject_token_type=ACCESS_TOKEN)
    response = d.post("/oauth2/token", fields)
    assert response.status_code == 200, response.text
    return str(response.json()["access_token"])


def _caller(d: Deployment, agent: str) -> dict[str, str]:
    return {"client_assertion_type": JWT_SPIFFE, "client_assertion": d.svid(agent)}


def _active(d: Deployment, token: str) -> bool:
    seen = d.post("/oauth2/introspect", {**_caller(d, RESOURCE), "token": token})
    assert seen.status_code == 200, seen.text
    return bool(seen.json()["active"])


def test_rfc7009_revocation_endpoint(deployment: Deployment) -> None:
    """The agent a token was issued to revokes it: introspection, the signed revocation list
    and the token endpoint (as a chain link) then refuse it; strangers may not revoke it."""
    d = deployment
    token = _exchange(d, CODER, scope="repo:read")
    assert _active(d, token)
    meta = requests.get(
        f"{d.issuer}/.well-known/oauth-authorization-server", verify=str(d.ca_file), timeout=10
    ).json()
    assert meta["revocation_endpoint"] == f"{d.issuer}/oauth2/revoke"
    stranger = d.post("/oauth2/revoke", {**_caller(d, REVIEWER), "token": token})
    assert stranger.status_code == 400, stranger.text
    assert stranger.json()["error"] == "unauthorized_client"
    assert _active(d, token)
    anonymous = d.post("/oauth2/revoke", {"token": token})
    assert anonymous.status_code == 401 and anonymous.json()["error"] == "invalid_client"
    done = d.post(
        "/oauth2/revoke", {**_caller(d, CODER), "token": token, "token_type_hint": "access_token"}
    )
    assert done.status_code == 200, done.text
    assert not _active(d, token)
    # Again, and for tokens that are not ours: 200 per RFC 7009 2.2.
    assert d.post("/oauth2/revoke", {**_caller(d, CODER), "token": token}).status_code == 200
    assert d.post("/oauth2/revoke", {**_caller(d, CODER), "token": "x.y.z"}).status_code == 200
    assert _jti(token) in _revocation_list(d)
    chained = d.post(
        "/oauth2/token",
        {**_form(d, REVIEWER), "subject_token": token, "subject_token_type": ACCESS_TOKEN},
    )
    assert chained.status_code == 400, chained.text
    assert chained.json()["error"] == "invalid_grant"
    assert "revoked" in chained.json()["error_description"]


def test_entry_revoke_revokes_delegated_tokens_and_cascade_the_chain(
    deployment: Deployment,
) -> None:
    """``entry revoke`` revokes the tokens issued to the entry's identity; ``--cascade`` also
    those delegated onward (whose actor chain contains it); other tokens stay active."""
    d = deployment
    agent, entry_id = _new_agent(d, "delegator", "4646")
    d.server.cli_json(
        "delegation", "create", "--agent-id", agent, "--subject-issuer", "corp",
        "--scope", "repo:read", "--audience", GIT, "--max-depth", "2",
    )  # fmt: skip
    first = _exchange(d, agent, scope="repo:read")
    onward = _exchange(d, REVIEWER, first)
    unrelated = _exchange(d, CODER, scope="repo:read")
    out = d.server.cli_json("entry", "revoke", "--id", entry_id, "--reason", "gone rogue")
    assert [t["jti"] for t in out["revoked_tokens"]] == [_jti(first)]
    assert out["revoked_tokens"][0]["subject"] == "alice"
    assert not _active(d, first)
    assert _active(d, onward) and _active(d, unrelated)
    cascaded = d.server.cli_json("entry", "revoke", "--id", entry_id, "--cascade")
    assert [t["jti"] for t in cascaded["revoked_tokens"]] == [_jti(onward)]
    assert not _active(d, onward)
    assert _active(d, unrelated)


def test_verify_access_token_refuses_a_revoked_token_from_the_polled_list(
    deployment: Deployment,
) -> None:
    """A resource server with the server's signed list as revocation source: accepted before
    the revocation, AccessTokenRevoked once the list is re-fetched; the list is not fetched
    per request."""
    d = deployment
    token = _exchange(d, CODER, scope="repo:read")
    clock = [1000.0]
    source = PolledRevocationList(
        f"{d.issuer}/jwt-revocations",
        _jwt_bundle(d),
        interval=30.0,
        context=d.trust,
        clock=lambda: clock[0],
    )

    def verify() -> credo.AccessToken:
        return credo.verify_access_token(
            token, issuer=d.issuer, audience=GIT, ssl_context=d.trust, revoked=source
        )

    assert verify().jti == _jti(token)
    first = source.current()
    assert d.post("/oauth2/revoke", {**_caller(d, CODER), "token": token}).status_code == 200
    assert verify().subject == "alice"  # within the interval: the same list, no fetch
    assert source.current() is first
    clock[0] += 31
    with pytest.raises(AccessTokenRevoked):
        verify()


def test_verify_access_token_with_introspection_as_revocation_source(
    deployment: Deployment,
) -> None:
    """The resource server asks the server (RFC 7662) instead: refused once revoked."""
    d = deployment
    token = _exchange(d, CODER, scope="repo:read")
    source = IntrospectionRevocation(
        f"{d.issuer}/oauth2/introspect", lambda: d.svid(RESOURCE), context=d.trust
    )

    def verify() -> credo.AccessToken:
        return credo.verify_access_token(
            token, issuer=d.issuer, audience=GIT, ssl_context=d.trust, revoked=source
        )

    assert verify().subject == "alice"
    out = d.post("/oauth2/revoke", {**_caller(d, CODER), "token": token})
    assert out.status_code == 200, out.text
    with pytest.raises(AccessTokenRevoked):
        verify()


def _audit(d: Deployment, action: str) -> list[dict[str, Any]]:
    return list(d.server.cli_json("audit", "show", "--action", action)["records"])


def test_jwt_revoke_takes_a_delegated_token_jti(deployment: Deployment) -> None:
    """`jwt revoke --jti` of a delegated token revokes it (introspection inactive, in the
    signed list), says so, is idempotent and audited; an unknown jti is a one-line error
    naming every kind of JWT it looked for."""
    d = deployment
    token = _exchange(d, CODER, scope="repo:read")
    jti = _jti(token)
    out = d.server.cli_json("jwt", "revoke", "--jti", jti, "--reason", "leaked in a log")
    assert [(t["jti"], t["client_id"], t["subject"]) for t in out["revoked_tokens"]] == [
        (jti, CODER, "alice")
    ]
    assert not _active(d, token)
    assert jti in _revocation_list(d)
    human = d.server.cli("jwt", "revoke", "--jti", jti, output=None)
    assert human.returncode == 0, human.stderr
    assert "already revoked" in human.stdout
    record = next(r for r in _audit(d, "token.revoke") if r["target"] == jti)
    assert record["subject"] == CODER and record["actor_kind"] == "admin"
    assert record["details"]["reason"] == "leaked in a log"
    assert record["details"]["sub"] == "alice"
    missing = d.server.cli("jwt", "revoke", "--jti", "no-such-jti", output=None)
    assert "no JWT-SVID, WIT-SVID or delegated token with jti no-such-jti" in one_line_error(
        missing
    )


def test_rfc7009_revocation_is_audited_with_the_workload_as_actor(
    deployment: Deployment,
) -> None:
    """A revocation at /oauth2/revoke writes a token.revoke record whose actor is the
    authenticated caller."""
    d = deployment
    token = _exchange(d, CODER, scope="repo:read")
    assert d.post("/oauth2/revoke", {**_caller(d, CODER), "token": token}).status_code == 200
    record = next(r for r in _audit(d, "token.revoke") if r["target"] == _jti(token))
    assert (record["actor_kind"], record["actor"]) == ("workload", CODER)
    assert record["details"]["revoked_tokens"] == [_jti(token)]


def test_agent_ban_revokes_the_delegated_tokens_of_its_workloads(
    deployment: Deployment, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A workload on a real agent exchanges a person's token with the JWT-SVID the agent gave
    it; `agent ban` revokes that delegated token (introspection inactive, in the signed list,
    listed in the agent.ban record); a token of an identity the agent never served stays
    active."""
    d = deployment
    workload = f"spiffe://{TD}/agents/on-banned-node"
    root = short_temp_dir("credo-ban-")
    try:
        with start_agent(d.server, root) as agent:
            create_entry(d.server, agent.spiffe_id, workload)
            d.server.cli_json(
                "delegation", "create", "--agent-id", workload, "--subject-issuer", "corp",
                "--scope", "repo:read", "--audience", GIT,
            )  # fmt: skip
            wait_for(lambda: workload in agent.fetch_ids(), 60, "the workload's identity")
            with WorkloadApiClient(agent.endpoint) as client:
                svid = client.fetch_jwt_svid([f"{d.issuer}/oauth2/token"], workload).token
            form = {**_form(d, workload, scope="repo:read"), "client_assertion": svid}
            response = d.post("/oauth2/token", form)
            assert response.status_code == 200, response.text
            token = str(response.json()["access_token"])
            other = _exchange(d, CODER, scope="repo:read")
            assert _active(d, token)
            d.server.cli_json("agent", "ban", "--spiffe-id", agent.spiffe_id, "--reason", "x")
            assert not _active(d, token)
            assert _active(d, other)
            assert _jti(token) in _revocation_list(d)
            banned = next(r for r in _audit(d, "agent.ban") if r["subject"] == agent.spiffe_id)
            assert banned["details"]["revoked_tokens"] == [_jti(token)]
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_a_person_revokes_a_token_issued_on_their_behalf(deployment: Deployment) -> None:
    """With no client credentials but their own token from the identity provider as
    ``subject_token``, the person revokes a delegated token issued for them (the record
    names the person as actor); someone else's token, or a token this server issued used as
    the person's credential, is refused and revokes nothing."""
    d = deployment
    token = _exchange(d, CODER, scope="repo:read")
    bob = d.person_token(sub="bob")
    refused = d.post("/oauth2/revoke", {"token": token, "subject_token": bob})
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"] == "unauthorized_client"
    assert "bob may not revoke" in refused.json()["error_description"]
    assert _active(d, token)
    own = d.post("/oauth2/revoke", {"token": token, "subject_token": token})
    assert own.status_code == 401 and own.json()["error"] == "invalid_client", own.text
    assert _active(d, token)
    forged = d.post("/oauth2/revoke", {"token": token, "subject_token": "a.b.c"})
    assert forged.status_code == 400, forged.text
    assert _active(d, token)
    done = d.post("/oauth2/revoke", {"token": token, "subject_token": d.person_token()})
    assert done.status_code == 200, done.text
    assert not _active(d, token)
    record = next(r for r in _audit(d, "token.revoke") if r["target"] == _jti(token))
    assert (record["actor_kind"], record["actor"]) == ("person", "alice")
