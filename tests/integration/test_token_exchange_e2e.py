"""Token exchange against a real ``credo-server`` over HTTPS, with clients we did not write.

authlib's OAuth 2.0 client performs the RFC 8693 exchange; PyJWT verifies the issued token
with keys it finds through the RFC 8414 metadata; ``credo.verify_access_token`` and RFC 7662
introspection agree; malformed bodies (hypothesis) never get a 500 and change nothing.
"""

from __future__ import annotations

import json
import re
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from authlib.integrations.requests_client import OAuth2Session
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import credo
from credo.errors import InsufficientScope
from tests.helpers.processes import ServerProcess, create_entry, start_server, wait_for

TD = "example.org"
IDP = "https://login.example.com"
GIT = "https://git.example.com"
CODER = f"spiffe://{TD}/agents/coder"
REVIEWER = f"spiffe://{TD}/agents/reviewer"
RESOURCE = f"spiffe://{TD}/resource/git"
GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
ID_TOKEN = "urn:ietf:params:oauth:token-type:id_token"
ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"
JWT_SPIFFE = "urn:ietf:params:oauth:client-assertion-type:jwt-spiffe"


@dataclass
class Deployment:
    server: ServerProcess
    idp_key: rsa.RSAPrivateKey
    ca_file: Path
    trust: ssl.SSLContext

    @property
    def issuer(self) -> str:
        return self.server.http_url

    @property
    def token_endpoint(self) -> str:
        return f"{self.issuer}/oauth2/token"

    def person_token(self, **claims: Any) -> str:
        now = int(time.time())
        body = {"iss": IDP, "sub": "alice", "aud": "credo", "iat": now, "exp": now + 600}
        body.update(groups=["eng"], **claims)
        return jwt.encode(body, self.idp_key, algorithm="RS256", headers={"kid": "idp-1"})

    def svid(self, spiffe_id: str, audience: str | None = None) -> str:
        out = self.server.cli_json(
            "jwt", "mint", "--spiffe-id", spiffe_id, "--audience", audience or self.token_endpoint
        )
        return str(out["token"])

    def post(self, path: str, data: Any, **kw: Any) -> requests.Response:
        return requests.post(f"{self.issuer}{path}", data=data, verify=str(self.ca_file), **kw)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """A server trusting one identity provider (a JWKS file), with two agents and policies."""
    tmp = tmp_path_factory.mktemp("exchange")
    idp_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(idp_key.public_key()))
    jwk.update(kid="idp-1", alg="RS256", use="sig")
    (tmp / "idp.jwks").write_text(json.dumps({"keys": [jwk]}))
    config = tmp / "server.toml"
    config.write_text(
        "[server.delegation]\n"
        f'introspection_allowed = ["{RESOURCE}"]\n'
        "[server.delegation.issuers.corp]\n"
        f'issuer = "{IDP}"\njwks_file = "{tmp / "idp.jwks"}"\naudience = ["credo"]\n'
        'algorithms = ["RS256"]\n'
    )
    with start_server(tmp, config=config, http_bind_address="127.0.0.1:0") as server:
        ca_file = tmp / "bundle.pem"
        ca_file.write_text(server.bundle_pem())
        trust = ssl.create_default_context(cafile=str(ca_file))
        parent = f"spiffe://{TD}/host"
        create_entry(server, parent, CODER, extra=["--owner", "alice@example.com"])
        create_entry(server, parent, REVIEWER, "unix:uid:4242", extra=["--owner", "team-review"])
        server.cli_json(
            "delegation", "create", "--agent-id", CODER, "--subject-issuer", "corp",
            "--subject-claim", "groups=eng", "--scope", "repo:read", "--scope", "repo:write",
            "--scope", "pr:comment", "--audience", GIT, "--max-depth", "2",
            "--budget", "repo:write=3/1h",
        )  # fmt: skip
        server.cli_json(
            "delegation", "create", "--agent-id", REVIEWER, "--subject-issuer", "corp",
            "--scope", "repo:read", "--audience", GIT, "--max-depth", "2",
        )  # fmt: skip
        yield Deployment(server, idp_key, ca_file, trust)


def _exchange_with_authlib(d: Deployment, agent: str, subject: str, **extra: str) -> Any:
    session = OAuth2Session(client_id=agent, token_endpoint_auth_method="none")
    return session.fetch_token(
        d.token_endpoint,
        verify=str(d.ca_file),  # a request option (authlib passes it on to requests)
        grant_type=GRANT,
        subject_token=subject,
        subject_token_type=extra.pop("subject_token_type", ID_TOKEN),
        audience=GIT,
        client_assertion_type=JWT_SPIFFE,
        client_assertion=d.svid(agent),
        **extra,
    )


def test_authlib_exchanges_and_pyjwt_verifies_with_discovered_keys(d: Deployment) -> None:
    """The exchange through authlib; PyJWT, keys from the RFC 8414 metadata, sees the RFC claims."""
    token = _exchange_with_authlib(d, CODER, d.person_token(), scope="repo:read pr:comment")
    assert token["token_type"] == "Bearer"
    assert token["issued_token_type"] == ACCESS_TOKEN
    assert token["scope"] == "pr:comment repo:read"
    assert 0 < token["expires_in"] <= 300
    meta = requests.get(
        f"{d.issuer}/.well-known/oauth-authorization-server", verify=str(d.ca_file), timeout=10
    ).json()
    assert meta["issuer"] == d.issuer
    assert meta["token_endpoint"] == d.token_endpoint
    assert GRANT in meta["grant_types_supported"]
    signing_key = jwt.PyJWKClient(meta["jwks_uri"], ssl_context=d.trust).get_signing_key_from_jwt(
        token["access_token"]
    )
    assert jwt.get_unverified_header(token["access_token"])["typ"] == "at+jwt"
    claims = jwt.decode(
        token["access_token"], signing_key, algorithms=["ES256"], audience=GIT, issuer=d.issuer
    )
    assert claims["sub"] == "alice"
    assert claims["act"] == {"sub": CODER}
    assert claims["client_id"] == CODER
    assert claims["aud"] == GIT
    assert claims["scope"] == "pr:comment repo:read"
    assert claims["credo_owner"] == "alice@example.com"
    assert claims["exp"] - claims["iat"] == token["expires_in"]
    assert {"iat", "exp", "jti", "iss"} <= set(claims)


def test_chain_verify_access_token_and_introspection_agree(d: Deployment) -> None:
    """coder -> reviewer: the resource server's check and introspection see the whole chain."""
    first = _exchange_with_authlib(d, CODER, d.person_token(), scope="repo:read")
    second = _exchange_with_authlib(
        d, REVIEWER, first["access_token"], subject_token_type=ACCESS_TOKEN
    )
    checked = credo.verify_access_token(
        second["access_token"],
        issuer=d.issuer,
        audience=GIT,
        required_scopes=["repo:read"],
        ssl_context=d.trust,
    )
    assert checked.subject == "alice"
    assert checked.actors == (REVIEWER, CODER)
    assert checked.scopes == {"repo:read"}
    assert checked.owner == "team-review"
    with pytest.raises(InsufficientScope):
        credo.verify_access_token(
            second["access_token"],
            issuer=d.issuer,
            audience=GIT,
            required_scopes=["repo:write"],
            ssl_context=d.trust,
        )
    caller = {"client_assertion_type": JWT_SPIFFE, "client_assertion": d.svid(RESOURCE)}
    seen = d.post("/oauth2/introspect", {**caller, "token": second["access_token"]}).json()
    assert seen["active"] is True
    assert seen["act"] == {"sub": REVIEWER, "act": {"sub": CODER}}
    assert (seen["sub"], seen["scope"], seen["client_id"]) == ("alice", "repo:read", REVIEWER)
    assert d.post("/oauth2/introspect", {**caller, "token": "x.y.z"}).json() == {"active": False}
    stranger = {"client_assertion_type": JWT_SPIFFE, "client_assertion": d.svid(CODER)}
    refused = d.post("/oauth2/introspect", {**stranger, "token": second["access_token"]})
    assert refused.status_code == 401 and refused.json()["error"] == "invalid_client"


def test_mutual_tls_with_an_x509_svid_authenticates_the_agent(d: Deployment) -> None:
    """No client_assertion: the X509-SVID presented in the TLS handshake names the agent."""
    minted = d.server.cli_json("x509", "mint", "--spiffe-id", CODER)
    cert, key = d.ca_file.parent / "coder.pem", d.ca_file.parent / "coder.key"
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
    response = d.post("/oauth2/token", form, cert=(str(cert), str(key)))
    assert response.status_code == 200, response.text
    claims = jwt.decode(response.json()["access_token"], options={"verify_signature": False})
    assert claims["act"] == {"sub": CODER} and claims["client_id"] == CODER
    # Without the certificate (and without an assertion) the agent is unknown.
    anonymous = d.post("/oauth2/token", form)
    assert anonymous.status_code == 401 and anonymous.json()["error"] == "invalid_client"


def test_the_example_resource_server_accepts_and_refuses(d: Deployment) -> None:
    """docs/examples/resource_server.py: 200 naming the person and the chain; 403 without
    repo:read; 401 for a token that is not Credo's."""
    example = Path(__file__).parents[2] / "docs" / "examples" / "resource_server.py"
    proc = subprocess.Popen(
        [sys.executable, str(example), "--issuer", d.issuer, "--audience", GIT,
         "--ca-file", str(d.ca_file), "--port", "0"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        port = proc.stdout.readline().strip().rpartition(":")[2]
        url = f"http://127.0.0.1:{port}/repo"

        def call(token: str) -> requests.Response:
            return requests.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=10)

        good = _exchange_with_authlib(d, CODER, d.person_token(), scope="repo:read")
        answer = call(good["access_token"])
        assert answer.status_code == 200, answer.text
        assert answer.json() == {
            "for": "alice",
            "actors": [CODER],
            "scopes": ["repo:read"],
            "owner": "alice@example.com",
        }
        narrow = _exchange_with_authlib(d, CODER, d.person_token(), scope="pr:comment")
        forbidden = call(narrow["access_token"])
        assert forbidden.status_code == 403
        assert "insufficient_scope" in forbidden.headers["WWW-Authenticate"]
        assert call(d.person_token()).status_code == 401
    finally:
        proc.terminate()
        proc.wait(10)


def test_three_hop_chain_over_https_and_one_hop_too_many(d: Deployment) -> None:
    """person -> coder -> reviewer -> linter: the last token carries the whole chain and the
    common scope; a fourth agent (its policy allows depth 3) is refused."""
    linter, fourth = f"spiffe://{TD}/agents/linter", f"spiffe://{TD}/agents/fourth"
    for i, agent in enumerate((linter, fourth)):
        create_entry(d.server, f"spiffe://{TD}/host", agent, f"unix:uid:{5000 + i}")
        d.server.cli_json(
            "delegation", "create", "--agent-id", agent, "--subject-issuer", "corp",
            "--scope", "repo:read", "--scope", "pr:comment", "--audience", GIT,
            "--max-depth", "3",
        )  # fmt: skip
    first = d.post("/oauth2/token", _form(d, CODER, scope="repo:read pr:comment")).json()
    hops = [first]
    for agent in (REVIEWER, linter):
        answer = d.post(
            "/oauth2/token",
            _form(
                d, agent, subject_token=hops[-1]["access_token"], subject_token_type=ACCESS_TOKEN
            ),
        )
        assert answer.status_code == 200, answer.text
        hops.append(answer.json())
    checked = credo.verify_access_token(
        hops[-1]["access_token"], issuer=d.issuer, audience=GIT, ssl_context=d.trust
    )
    assert checked.actors == (linter, REVIEWER, CODER)
    assert checked.scopes == {"repo:read"}  # the reviewer's policy has only repo:read
    too_deep = d.post(
        "/oauth2/token",
        _form(d, fourth, subject_token=hops[-1]["access_token"], subject_token_type=ACCESS_TOKEN),
    )
    assert too_deep.status_code == 400
    assert too_deep.json()["error"] == "unauthorized_client"
    assert "at most 3" in too_deep.json()["error_description"]


def test_deleting_the_agents_entry_stops_its_exchanges(d: Deployment) -> None:
    """The kill switch: with its entry deleted, a still-valid SVID exchanges nothing."""
    temp = f"spiffe://{TD}/agents/temp"
    entry_id = create_entry(d.server, f"spiffe://{TD}/host", temp, "unix:uid:4343")
    d.server.cli_json(
        "delegation", "create", "--agent-id", temp, "--subject-issuer", "corp",
        "--scope", "repo:read", "--audience", GIT,
    )  # fmt: skip
    assert d.post("/oauth2/token", _form(d, temp)).status_code == 200
    d.server.cli_json("entry", "delete", "--id", entry_id)
    form = _form(d, temp)  # a fresh JWT-SVID, minted after the entry is gone

    def refused() -> bool:
        response = d.post("/oauth2/token", form)
        return response.status_code == 401 and "no registration entry" in response.text

    wait_for(refused, 10, "the exchange to be refused")


def _form(d: Deployment, agent: str = CODER, **fields: str) -> dict[str, str]:
    form = {
        "grant_type": GRANT,
        "client_assertion_type": JWT_SPIFFE,
        "client_assertion": d.svid(agent),
        "subject_token": d.person_token(),
        "subject_token_type": ID_TOKEN,
        "audience": GIT,
    }
    form.update(fields)
    return form


def test_refusals_over_http_have_rfc_codes(d: Deployment) -> None:
    """Over HTTPS, refusals are 400/401 JSON with the RFC 6749/8693 code and no-store."""
    now = int(time.time())
    cases = [
        (_form(d, subject_token=d.person_token(iss="https://evil.example")), 400, "invalid_grant"),
        (_form(d, subject_token=d.person_token(exp=now - 60)), 400, "invalid_grant"),
        (_form(d, scope="admin"), 400, "invalid_scope"),
        (_form(d, audience="https://elsewhere.example"), 400, "invalid_target"),
        (_form(d, client_assertion=d.svid(CODER, audience="https://other")), 401, "invalid_client"),
        (_form(d, grant_type="client_credentials"), 400, "unsupported_grant_type"),
    ]
    for form, status, error in cases:
        response = d.post("/oauth2/token", form)
        assert (response.status_code, response.json()["error"]) == (status, error), response.text
        assert response.headers["Cache-Control"] == "no-store"
        assert "eyJ" not in response.json()["error_description"]
    not_form = d.post("/oauth2/token", json.dumps(_form(d)), headers={"Content-Type": "text/json"})
    assert not_form.status_code == 400 and not_form.json()["error"] == "invalid_request"


def test_budget_is_exact_and_named_when_used_up(d: Deployment) -> None:
    """repo:write=3/1h: three tokens, then a refusal naming the budget; budget show agrees."""
    granted = 0
    for _ in range(4):
        response = d.post("/oauth2/token", _form(d, scope="repo:write"))
        if response.status_code == 200:
            granted += 1
        else:
            assert response.json()["error"] == "unauthorized_client"
            assert "repo:write=3/3600s" in response.json()["error_description"]
    assert granted == 3
    (policy,) = [
        p for p in d.server.cli_json("delegation", "list")["policies"] if p["agent_id"] == CODER
    ]
    (use,) = d.server.cli_json("delegation", "budget", "show", "--id", policy["id"])["budgets"]
    assert (use["used"], use["remaining"], use["refused"]) == (3, 0, 1)


def test_concurrent_exchanges_take_exactly_the_budget_and_it_resets(d: Deployment) -> None:
    """*=4/5s, twelve exchanges at once on one server (sharing its group commits): exactly
    four tokens, every refusal names the budget and when it resets; after that moment the
    next window grants again."""
    agent = f"spiffe://{TD}/agents/burst"
    create_entry(d.server, f"spiffe://{TD}/host", agent, "unix:uid:4343")
    d.server.cli_json(
        "delegation", "create", "--agent-id", agent, "--subject-issuer", "corp",
        "--scope", "repo:read", "--audience", GIT, "--budget", "*=4/5s",
    )  # fmt: skip
    assertion = d.svid(agent)
    form = {
        "grant_type": GRANT,
        "subject_token": d.person_token(),
        "subject_token_type": ID_TOKEN,
        "audience": GIT,
        "client_assertion_type": JWT_SPIFFE,
        "client_assertion": assertion,
    }
    # Start the burst early in a window, so that all of it falls into that one window.
    wait_for(lambda: time.time() % 5 < 0.5, 10, "the start of a 5 s window", interval=0.02)
    with ThreadPoolExecutor(max_workers=12) as pool:
        responses = list(pool.map(lambda _: d.post("/oauth2/token", form), range(12)))
    granted = [r for r in responses if r.status_code == 200]
    refused = [r.json() for r in responses if r.status_code != 200]
    assert len(granted) == 4, [r.text for r in responses]
    assert {e["error"] for e in refused} == {"unauthorized_client"}
    whens = set()
    for error in refused:
        assert "*=4/5s" in error["error_description"]
        named = re.search(r"resets at (\S+) ", error["error_description"])
        assert named is not None, error
        whens.add(named.group(1))
    (when,) = whens  # one window
    reset_at = datetime.strptime(when, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
    again = wait_for(
        lambda: (r := d.post("/oauth2/token", form)).status_code == 200 and r, 30, "a new window"
    )
    assert time.time() >= reset_at and again.json()["access_token"]


FIELD_NAMES = st.sampled_from(
    ["grant_type", "subject_token", "subject_token_type", "audience", "scope", "client_assertion",
     "client_assertion_type", "actor_token", "actor_token_type", "resource", "x"]
)  # fmt: skip


@pytest.mark.slow
def test_malformed_bodies_never_500_and_change_nothing(d: Deployment) -> None:
    """Random forms and raw bytes (hypothesis): always a 4xx JSON error; nothing changes."""
    before = d.server.cli_json("delegation", "list")

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        fields=st.lists(st.tuples(FIELD_NAMES, st.text(max_size=200)), max_size=8),
        raw=st.binary(max_size=300),
    )
    def post_garbage(fields: list[tuple[str, str]], raw: bytes) -> None:
        for body in (fields, raw):
            response = d.post(
                "/oauth2/token",
                body,
                headers={"Content-Type": "application/x-www-form-urlencoded"},
                timeout=10,
            )
            assert 400 <= response.status_code < 500, response.text
            assert "error" in response.json()

    post_garbage()
    assert d.server.cli_json("delegation", "list") == before
    assert "Traceback" not in d.server.logs


@pytest.fixture
def d(deployment: Deployment) -> Deployment:
    return deployment


def _audit(d: Deployment, *args: str) -> list[dict[str, Any]]:
    return list(d.server.cli_json("audit", "show", *args)["records"])


def test_exchanges_and_policy_changes_are_audited_with_the_person(d: Deployment) -> None:
    """A granted and a refused exchange each leave one token.exchange record naming the
    agent, the person (sub), the scopes and the owner, never the token; policy create,
    update and delete are recorded; ``audit trace`` of the agent names the person."""
    agent = f"spiffe://{TD}/agents/audited"
    create_entry(d.server, f"spiffe://{TD}/host", agent, "unix:uid:4444", extra=["--owner", "bob"])
    d.server.cli_json(
        "delegation", "create", "--agent-id", agent, "--subject-issuer", "corp",
        "--scope", "repo:read", "--audience", GIT,
    )  # fmt: skip
    (policy,) = d.server.cli_json("delegation", "list", "--agent-id", agent)["policies"]
    d.server.cli_json(
        "delegation", "update", "--id", policy["id"],
        "--scope", "repo:read", "--scope", "pr:comment",
    )  # fmt: skip
    granted = d.post("/oauth2/token", _form(d, agent, scope="repo:read"))
    assert granted.status_code == 200, granted.text
    token = granted.json()["access_token"]
    refused = d.post("/oauth2/token", _form(d, agent, scope="admin"))
    assert refused.status_code == 400 and refused.json()["error"] == "invalid_scope"
    d.server.cli_json("delegation", "delete", "--id", policy["id"])

    records = _audit(d, "--spiffe-id", agent, "--action", "token.")
    assert [r["outcome"] for r in records] == ["allowed", "refused"]
    ok, no = records
    for rec in records:
        assert (rec["actor"], rec["subject"], rec["owner"]) == (agent, agent, "bob")
        assert rec["details"]["sub"] == "alice"
        assert rec["details"]["subject_issuer"] == "corp"
    assert ok["details"]["scopes"] == ["repo:read"]
    assert ok["details"]["jti"] == jwt.decode(token, options={"verify_signature": False})["jti"]
    assert ok["details"]["policy_id"] == policy["id"]
    assert no["details"]["requested_scopes"] == ["admin"] and "admin" in no["reason"]
    assert no["details"]["error"] == "invalid_scope"

    changes = _audit(d, "--action", "delegation_policy.")
    mine = [r for r in changes if r["target"] == policy["id"]]
    assert [r["action"] for r in mine] == [
        "delegation_policy.create",
        "delegation_policy.update",
        "delegation_policy.delete",
    ]
    assert all(r["subject"] == agent and r["actor_kind"] == "admin" for r in mine)
    assert mine[1]["details"]["scopes"] == ["pr:comment", "repo:read"]

    trace = d.server.cli("audit", "trace", "--spiffe-id", agent, output=None).stdout
    assert "token.exchange" in trace and '"sub":"alice"' in trace.replace(" ", "")
    exported = d.server.cli("audit", "export", output=None).stdout
    assert token not in exported and token.split(".")[2] not in exported
    assert d.server.cli("audit", "verify", output=None).returncode == 0
