"""The token exchange as a function: form fields in, RFC 8693 response or RFC 6749 error out.

A real SQLite datastore, real keys: the person's identity provider is an RSA key published
in a JWKS file; agents authenticate with JWT-SVIDs signed by the server's JWT key; PyJWT
(code we did not write) checks every issued token.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from credo.bundle import Bundle
from credo.jwtsvid import sign_jwt_svid
from credo.selector import Selector
from credo.spiffe_id import SpiffeId, TrustDomain
from credo.x509svid import ca_certificate_template, sign_x509_svid
from server.ca.ca import JwtKey
from server.datastore import (
    Budget,
    DelegationPolicy,
    IssuedJwtSvid,
    RegistrationEntry,
    SqlDataStore,
)
from server.delegation.config import SubjectIssuerConfig
from server.delegation.errors import OAuthError
from server.delegation.exchange import (
    ACCESS_TOKEN_TYPE,
    GRANT_TYPE,
    ID_TOKEN_TYPE,
    JWT_SPIFFE_ASSERTION,
    JWT_TOKEN_TYPE,
    TokenExchange,
)
from server.delegation.subjects import SubjectIssuers

TD = TrustDomain("example.org")
ISSUER = "https://credo.example.org"
IDP = "https://login.example.com"
GIT = "https://git.example.com"
A = SpiffeId.parse("spiffe://example.org/agents/coder")
B = SpiffeId.parse("spiffe://example.org/agents/reviewer")
C = SpiffeId.parse("spiffe://example.org/agents/linter")


class Clock:
    def __init__(self) -> None:
        self.now = float(int(time.time()))

    def __call__(self) -> float:
        return self.now


@dataclass
class World:
    exchange: TokenExchange
    store: SqlDataStore
    clock: Clock
    idp_key: rsa.RSAPrivateKey
    jwt_key: JwtKey

    def person_token(self, **claims: Any) -> str:
        now = int(self.clock())
        body: dict[str, Any] = {
            "iss": IDP,
            "sub": "alice",
            "aud": "credo",
            "iat": now,
            "exp": now + 3600,
            "groups": ["eng"],
        }
        body.update(claims)
        for name in [k for k, v in body.items() if v is None]:
            del body[name]
        return jwt.encode(body, self.idp_key, algorithm="RS256", headers={"kid": "idp-1"})

    def svid(
        self, agent: SpiffeId, audience: str = ISSUER + "/oauth2/token", age: int = 0, **kw: Any
    ) -> str:
        return sign_jwt_svid(
            agent,
            [audience],
            key=self.jwt_key.private_key,
            key_id=self.jwt_key.kid,
            now=datetime.fromtimestamp(self.clock() - age, UTC),
            **kw,
        )

    def run(self, agent: SpiffeId, subject: str, **form: str) -> dict[str, Any]:
        fields = {
            "grant_type": GRANT_TYPE,
            "client_assertion_type": JWT_SPIFFE_ASSERTION,
            "client_assertion": self.svid(agent),
            "subject_token": subject,
            "subject_token_type": ID_TOKEN_TYPE,
            "audience": GIT,
        }
        fields.update(form)
        fields = {k: v for k, v in fields.items() if v != "<omit>"}
        return self.exchange.exchange(list(fields.items())).response

    def refused(self, agent: SpiffeId, subject: str, **form: str) -> OAuthError:
        with pytest.raises(OAuthError) as info:
            self.run(agent, subject, **form)
        return info.value

    def verify(self, token: str) -> dict[str, Any]:
        """PyJWT, with the server's published public key."""
        public = self.jwt_key.private_key.public_key()
        header = jwt.get_unverified_header(token)
        assert header["typ"] == "at+jwt" and header["kid"] == self.jwt_key.kid
        return jwt.decode(token, public, algorithms=["ES256"], audience=GIT, issuer=ISSUER)

    def policy(self, agent: str, **changes: Any) -> DelegationPolicy:
        fields: dict[str, Any] = {
            "agent_id": agent,
            "subject_issuer": "corp",
            "scopes": ("repo:read", "repo:write", "pr:comment"),
            "audiences": (GIT,),
        }
        fields.update(changes)
        return self.store.create_delegation_policy(DelegationPolicy(**fields))


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    clock = Clock()
    idp_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(idp_key.public_key()))
    jwk.update(kid="idp-1", use="sig", alg="RS256")
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [jwk]}))
    signing = ec.generate_private_key(ec.SECP256R1())
    key = JwtKey("jwt-key-1", signing, datetime.now(UTC) + timedelta(days=1))
    bundle = Bundle(TD, jwt_authorities={key.kid: signing.public_key()})
    store = SqlDataStore.open(f"sqlite:///{tmp_path / 'ds.db'}", clock=clock)
    subjects = SubjectIssuers.from_config(
        {"corp": SubjectIssuerConfig(issuer=IDP, jwks_file=jwks, audience=("credo",))},
        clock=clock,
    )
    owners = {str(A): "alice@example.com", str(B): "team-review", str(C): ""}
    for uid, agent in enumerate((A, B, C)):  # a token is recorded only for a registered agent
        store.create_registration_entry(
            RegistrationEntry(str(agent), f"spiffe://{TD}/host", (Selector("unix", f"uid:{uid}"),))
        )
    exchange = TokenExchange(
        trust_domain=TD,
        datastore=store,
        subjects=subjects,
        issuer=lambda: ISSUER,
        jwt_key=lambda: key,
        bundle=lambda: bundle,
        owner_of=lambda agent: owners.get(str(agent)),
        clock=clock,
    )
    try:
        yield World(exchange, store, clock, idp_key, key)
    finally:
        store.close()


def test_exchange_issues_a_token_with_exactly_the_rfc_claims(world: World) -> None:
    """sub = the person, act = the agent, the requested scope, and the owner of the agent."""
    world.policy(str(A), subject_claims=(("groups", "eng"),))
    response = world.run(A, world.person_token(), scope="repo:read")
    assert response["issued_token_type"] == ACCESS_TOKEN_TYPE
    assert response["token_type"] == "Bearer"
    assert response["scope"] == "repo:read"
    assert response["expires_in"] == 300
    claims = world.verify(response["access_token"])
    now = int(world.clock())
    assert set(claims) == {
        "iss",
        "sub",
        "act",
        "client_id",
        "aud",
        "scope",
        "iat",
        "exp",
        "jti",
        "credo_owner",
        "credo_subject_issuer",
    }
    assert claims["sub"] == "alice"
    assert claims["act"] == {"sub": str(A)}
    assert claims["client_id"] == str(A)
    assert claims["aud"] == GIT
    assert claims["scope"] == "repo:read"
    assert claims["iat"] == now and claims["exp"] == now + 300
    assert claims["credo_owner"] == "alice@example.com"
    assert claims["credo_subject_issuer"] == IDP


def test_lifetime_is_the_least_of_policy_and_subject_token(world: World) -> None:
    """A person's token with 60 s left yields a token with 60 s, not the policy's 5 minutes."""
    world.policy(str(A))
    now = int(world.clock())
    response = world.run(A, world.person_token(exp=now + 60))
    assert response["expires_in"] == 60
    assert world.verify(response["access_token"])["exp"] == now + 60


def test_three_hop_chain_carries_every_actor_and_the_intersection(world: World) -> None:
    """person -> A -> B -> C: the last token nests C, B, A and holds only the common scope."""
    world.policy(str(A), max_depth=3)
    world.policy(str(B), max_depth=3, scopes=("repo:read", "pr:comment"))
    world.policy("spiffe://example.org/agents/*", max_depth=3, scopes=("repo:read",))
    first = world.run(A, world.person_token(), scope="repo:read repo:write pr:comment")
    second = world.run(
        B,
        first["access_token"],
        subject_token_type=ACCESS_TOKEN_TYPE,
        scope="repo:read pr:comment",
    )
    third = world.run(C, second["access_token"], subject_token_type=ACCESS_TOKEN_TYPE)
    claims = world.verify(third["access_token"])
    assert claims["sub"] == "alice"
    assert claims["act"] == {"sub": str(C), "act": {"sub": str(B), "act": {"sub": str(A)}}}
    assert claims["scope"] == "repo:read"
    # C may not take more than B handed on, even what its own policy would allow.
    world.policy(str(C), max_depth=3, scopes=("repo:read", "pr:comment", "repo:write"))
    narrower = world.run(
        B, first["access_token"], subject_token_type=ACCESS_TOKEN_TYPE, scope="repo:read"
    )
    wider = world.refused(
        C, narrower["access_token"], subject_token_type=ACCESS_TOKEN_TYPE, scope="pr:comment"
    )
    assert wider.error == "invalid_scope" and "previous link" in wider.description
    # B may not widen what A handed on, even within its own policy.
    widened = world.refused(
        B, third["access_token"], subject_token_type=ACCESS_TOKEN_TYPE, scope="pr:comment"
    )
    assert widened.error in ("invalid_scope", "invalid_grant")


def test_one_hop_more_than_max_depth_is_refused(world: World) -> None:
    """With max_depth 2 for B, person -> A -> B works and A -> B -> A' does not."""
    world.policy(str(A), max_depth=1)
    world.policy(str(B), max_depth=2)
    world.policy(str(C), max_depth=2)
    first = world.run(A, world.person_token())
    second = world.run(B, first["access_token"], subject_token_type=ACCESS_TOKEN_TYPE)
    err = world.refused(C, second["access_token"], subject_token_type=ACCESS_TOKEN_TYPE)
    assert err.error == "unauthorized_client" and "at most 2" in err.description


def _expired_svid(world: World) -> str:
    return world.svid(A, age=600, expires_at=datetime.fromtimestamp(world.clock() - 120, UTC))


REFUSALS: list[tuple[str, dict[str, Any], dict[str, str], str]] = [
    # (name, person-token claims, form overrides, expected error)
    ("untrusted-issuer", {"iss": "https://evil.example"}, {}, "invalid_grant"),
    ("expired-subject", {"exp": -10}, {}, "invalid_grant"),
    ("not-yet-valid-subject", {"nbf": 3600}, {}, "invalid_grant"),
    ("wrong-subject-audience", {"aud": "someone-else"}, {}, "invalid_grant"),
    ("no-policy-for-person", {"groups": ["sales"]}, {}, "unauthorized_client"),
    ("scope-outside-person", {"scope": "repo:read"}, {"scope": "repo:write"}, "invalid_scope"),
    ("scope-outside-policy", {}, {"scope": "admin:all"}, "invalid_scope"),
    ("audience-outside-policy", {}, {"audience": "https://other.example"}, "invalid_target"),
    ("may-act-someone-else", {"may_act": {"sub": str(B)}}, {}, "invalid_grant"),
    ("no-audience", {}, {"audience": "<omit>"}, "invalid_request"),
    ("person-named-like-a-workload", {"sub": "spiffe://example.org/admin"}, {}, "invalid_grant"),
    ("no-subject-type", {}, {"subject_token_type": "<omit>"}, "invalid_request"),
    ("wrong-grant", {}, {"grant_type": "password"}, "unsupported_grant_type"),
    (
        "no-client-auth",
        {},
        {"client_assertion": "<omit>", "client_assertion_type": "<omit>"},
        "invalid_client",
    ),
    ("bad-assertion-type", {}, {"client_assertion_type": "jwt-bearer"}, "invalid_client"),
    ("client-id-mismatch", {}, {"client_id": str(B)}, "invalid_client"),
    ("unknown-parameter", {}, {"password": "x"}, "invalid_request"),
]


@pytest.mark.parametrize(
    ("claims", "form", "error"),
    [pytest.param(c, f, e, id=name) for name, c, f, e in REFUSALS],
)
def test_refusal_matrix(
    world: World, claims: dict[str, Any], form: dict[str, str], error: str
) -> None:
    """Each broken rule is refused with its RFC error code, and nothing is spent."""
    world.policy(str(A), subject_claims=(("groups", "eng"),), budgets=(Budget("*", 1, 3600),))
    now = int(world.clock())
    for name in ("exp", "nbf"):
        if name in claims:
            claims = {**claims, name: now + claims[name]}
    err = world.refused(A, world.person_token(**claims), **form)
    assert err.error == error, err.description
    assert err.description and "eyJ" not in err.description
    # The budget's one unit is still there: the refusal consumed nothing.
    world.run(A, world.person_token())


def test_expired_client_svid_and_foreign_actor_token_are_refused(world: World) -> None:
    """An expired JWT-SVID as client is invalid_client; an actor_token of another agent too."""
    world.policy(str(A))
    expired = world.refused(A, world.person_token(), client_assertion=_expired_svid(world))
    assert expired.error == "invalid_client" and "expired" in expired.description
    wrong_aud = world.refused(
        A, world.person_token(), client_assertion=world.svid(A, audience="https://elsewhere")
    )
    assert wrong_aud.error == "invalid_client"
    foreign = world.refused(
        A, world.person_token(), actor_token=world.svid(B), actor_token_type=JWT_TOKEN_TYPE
    )
    assert foreign.error == "invalid_request" and str(B) in foreign.description
    ok = world.run(
        A, world.person_token(), actor_token=world.svid(A), actor_token_type=JWT_TOKEN_TYPE
    )
    assert world.verify(ok["access_token"])["act"] == {"sub": str(A)}


def test_an_access_token_is_no_client_assertion(world: World) -> None:
    """A delegated token (typ at+jwt) presented as client_assertion is invalid_client."""
    world.policy(str(A))
    token = world.run(A, world.person_token())["access_token"]
    err = world.refused(A, world.person_token(), client_assertion=token)
    assert err.error == "invalid_client" and "access token" in err.description


def test_an_agent_without_registration_entry_is_refused(world: World) -> None:
    """A valid JWT-SVID of an identity whose entry is gone (revoked) is invalid_client."""
    ghost = SpiffeId.parse("spiffe://example.org/agents/ghost")
    world.policy(str(ghost))
    err = world.refused(ghost, world.person_token())
    assert err.error == "invalid_client" and "no registration entry" in err.description


def test_budget_refuses_when_used_up_and_names_it(world: World) -> None:
    """repo:write=2/1h: two repo:write tokens, then a refusal naming the budget; reads go on."""
    policy = world.policy(str(A), budgets=(Budget("repo:write", 2, 3600),))
    for _ in range(2):
        world.run(A, world.person_token(), scope="repo:write")
    err = world.refused(A, world.person_token(), scope="repo:write")
    assert err.error == "unauthorized_client"
    assert "repo:write=2/3600s" in err.description and "resets at" in err.description
    world.run(A, world.person_token(), scope="repo:read")
    (use,) = world.store.list_budget_use(policy.id, int(world.clock()))
    assert (use.used, use.refused) == (2, 1)
    world.clock.now += 3600
    world.run(A, world.person_token(), scope="repo:write")


def test_repeated_fields_are_refused(world: World) -> None:
    """A field given twice is invalid_request (RFC 6749 3.2)."""
    world.policy(str(A))
    with pytest.raises(OAuthError) as info:
        world.exchange.exchange([("grant_type", GRANT_TYPE), ("grant_type", GRANT_TYPE)])
    assert info.value.error == "invalid_request"


def _mtls_world(world: World) -> tuple[TokenExchange, list[Bundle], x509.Certificate]:
    """``world``'s exchange with an X.509 CA in the bundle, and an X509-SVID for A from it."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    start = datetime.fromtimestamp(world.clock(), UTC) - timedelta(hours=1)
    ca = ca_certificate_template(
        TD, ca_key.public_key(), not_before=start, not_after=start + timedelta(days=1)
    ).sign(ca_key, hashes.SHA256())
    leaf = sign_x509_svid(
        A,
        ec.generate_private_key(ec.SECP256R1()).public_key(),
        ca_cert=ca,
        ca_key=ca_key,
        ttl=timedelta(minutes=10),
        now=datetime.fromtimestamp(world.clock(), UTC),
    )
    jwt_keys = {world.jwt_key.kid: world.jwt_key.private_key.public_key()}
    current = [Bundle(TD, x509_authorities=(ca,), jwt_authorities=jwt_keys)]
    exchange = dataclasses.replace(world.exchange, bundle=lambda: current[0])
    return exchange, current, leaf


def _mtls_fields(world: World) -> list[tuple[str, str]]:
    return [
        ("grant_type", GRANT_TYPE),
        ("subject_token", world.person_token()),
        ("subject_token_type", ID_TOKEN_TYPE),
        ("audience", GIT),
    ]


def test_a_remembered_client_certificate_is_still_refused_once_expired(world: World) -> None:
    """The per-certificate verification memo keeps checking the SVID's validity times."""
    world.policy(str(A))
    exchange, _, leaf = _mtls_world(world)
    assert exchange.exchange(_mtls_fields(world), peer_chain=[leaf]).claims["client_id"] == str(A)
    world.clock.now = leaf.not_valid_after_utc.timestamp() + 1
    with pytest.raises(OAuthError) as info:
        exchange.exchange(_mtls_fields(world), peer_chain=[leaf])
    assert info.value.error == "invalid_client" and "expired" in info.value.description


def test_a_remembered_client_certificate_is_refused_after_its_ca_leaves_the_bundle(
    world: World,
) -> None:
    """A new bundle (its CA removed) is checked at once, not after the memo's second."""
    world.policy(str(A))
    exchange, current, leaf = _mtls_world(world)
    assert exchange.exchange(_mtls_fields(world), peer_chain=[leaf]).claims["client_id"] == str(A)
    current[0] = Bundle(TD, jwt_authorities=current[0].jwt_authorities)
    with pytest.raises(OAuthError) as info:
        exchange.exchange(_mtls_fields(world), peer_chain=[leaf])
    assert info.value.error == "invalid_client"


def test_a_revoked_client_credential_is_refused_whatever_else_is_wrong(world: World) -> None:
    """A JWT-SVID revoked after use: invalid_client, also for a request refused for another
    reason; no token, no budget unit or refusal, no audit record (an unauthenticated caller)."""
    policy = world.policy(str(A), budgets=(Budget("repo:write", 5, 3600),))
    svid = world.svid(A)
    jti = jwt.decode(svid, options={"verify_signature": False})["jti"]
    now = int(world.clock())
    assert world.store.create_issued_jwt_svid(IssuedJwtSvid(jti, str(A), now + 300))
    world.run(A, world.person_token(), scope="repo:write", client_assertion=svid)
    world.store.revoke_jwt_svid(jti, "leaked")
    audited = len(world.store.list_audit_records())
    for wrong in ({}, {"audience": "https://elsewhere.example.com"}, {"scope": "admin"}):
        err = world.refused(
            A, world.person_token(), **{"scope": "repo:write", "client_assertion": svid, **wrong}
        )
        assert err.error == "invalid_client" and "has been revoked" in err.description
    assert len(world.store.list_audit_records()) == audited
    (use,) = world.store.list_budget_use(policy.id, now)
    assert (use.used, use.refused) == (1, 0)
