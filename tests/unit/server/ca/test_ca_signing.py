"""Tests for CertificateAuthority signing and the credential templates."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from ca_testkit import TD, FakeClock, MakeManager
from cryptography import x509

from credo.bundle import Bundle, X509Bundle
from credo.errors import InvalidSpiffeId
from credo.jwtsvid import JwtSvid
from credo.keys import KeyType, generate_private_key
from credo.spiffe_id import SpiffeId
from credo.x509svid import verify_x509_svid
from server.ca.ca import SIGN_JWT, SIGN_X509_WORKLOAD, CertificateAuthority
from server.ca.errors import InvalidAuthorityState

WORKLOAD = SpiffeId.from_segments(TD, "workload", "db")


def _bundle(manager_bundle: Bundle) -> X509Bundle:
    return manager_bundle.x509_bundle()


def test_workload_svid_verifies_against_bundle(make_manager: MakeManager, clock: FakeClock) -> None:
    """A workload SVID is [leaf] for a self-signed CA and verifies against the bundle."""
    manager = make_manager()
    manager.start()
    leaf_key = generate_private_key(KeyType.EC_P256)
    chain = manager.ca.sign_x509_svid(WORKLOAD, leaf_key.public_key(), 60, ("db.local",))
    assert len(chain) == 1
    assert verify_x509_svid(chain, _bundle(manager.bundle()), now=clock()) == WORKLOAD
    san = chain[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["db.local"]
    assert chain[0].not_valid_after_utc == clock() + timedelta(seconds=60)
    assert chain[0].not_valid_before_utc == clock() - timedelta(seconds=10)


def test_svid_ttl_is_capped_at_ca_not_after(make_manager: MakeManager, clock: FakeClock) -> None:
    """An SVID asked for longer than the CA lives expires with the CA."""
    manager = make_manager()
    manager.start()
    ca = manager.ca.x509_ca
    assert ca is not None
    chain = manager.ca.sign_x509_svid(WORKLOAD, generate_private_key().public_key(), 10**6)
    assert chain[0].not_valid_after_utc == ca.not_after


def test_agent_and_server_svids(make_manager: MakeManager, clock: FakeClock) -> None:
    """Agent SVIDs carry no DNS names; the server SVID has its reserved TLS name and localhost."""
    manager = make_manager()
    manager.start()
    agent_id = SpiffeId.from_segments(TD, "credo", "agent", "join_token", "t1")
    agent = manager.ca.sign_agent_svid(agent_id, generate_private_key().public_key(), 60)
    assert verify_x509_svid(agent, _bundle(manager.bundle()), now=clock()) == agent_id
    server_key = generate_private_key()
    server = manager.sign_server_svid(server_key)
    assert verify_x509_svid(server, _bundle(manager.bundle()), now=clock()) == SpiffeId.parse(
        "spiffe://example.org/credo/server"
    )
    san = server[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["server.credo.invalid", "localhost"]
    assert server[0].not_valid_after_utc == clock() + timedelta(seconds=60)


def test_jwt_svid_validates_and_is_capped(make_manager: MakeManager, clock: FakeClock) -> None:
    """A JWT-SVID validates against the bundle's JWT keys and never outlives the JWT key."""
    manager = make_manager()
    manager.start()
    token = manager.ca.sign_jwt_svid(WORKLOAD, ["api"], 120)
    svid = JwtSvid.parse_and_validate(token, manager.bundle().jwt_bundle(), ["api"], now=clock())
    assert svid.spiffe_id == WORKLOAD
    key = manager.ca.jwt_key
    assert key is not None
    clock.advance(590)
    late = manager.ca.sign_jwt_svid(WORKLOAD, ["api"], 120)
    capped = JwtSvid.parse_and_validate(late, manager.bundle().jwt_bundle(), ["api"], now=clock())
    assert capped.expires_at == key.not_after


def test_jwt_issuer_puts_iss_on_every_jwt_svid(make_manager: MakeManager, clock: FakeClock) -> None:
    """A CA with jwt_issuer signs JWT-SVIDs with that iss, the kid of the active key and a
    fresh jti each time; without it, tokens carry no iss."""
    manager = make_manager()
    manager.start()
    manager.ca.jwt_issuer = "https://oidc.example.org"
    tokens = [manager.ca.sign_jwt_svid(WORKLOAD, ["api"], 120) for _ in range(3)]
    svids = [
        JwtSvid.parse_and_validate(
            t,
            manager.bundle().jwt_bundle(),
            ["api"],
            now=clock(),
            issuer="https://oidc.example.org",
        )
        for t in tokens
    ]
    assert {s.key_id for s in svids} == {manager.ca.jwt_key_id}
    assert len({s.jwt_id for s in svids}) == 3
    manager.ca.jwt_issuer = ""
    plain = manager.ca.sign_jwt_svid(WORKLOAD, ["api"], 120)
    assert (
        JwtSvid.parse_and_validate(
            plain, manager.bundle().jwt_bundle(), ["api"], now=clock()
        ).issuer
        is None
    )


def test_foreign_trust_domain_is_refused(make_manager: MakeManager) -> None:
    """The CA refuses to sign an ID outside its trust domain."""
    manager = make_manager()
    manager.start()
    other = SpiffeId.parse("spiffe://other.org/w")
    with pytest.raises(InvalidSpiffeId, match=r"not in trust domain example\.org"):
        manager.ca.sign_x509_svid(other, generate_private_key().public_key(), 60)
    with pytest.raises(InvalidSpiffeId):
        manager.ca.sign_jwt_svid(other, ["a"], 60)


def test_signing_without_active_authority_fails_clearly() -> None:
    """Signing before the manager started raises InvalidAuthorityState, not AttributeError."""
    ca = CertificateAuthority(TD)
    with pytest.raises(InvalidAuthorityState, match="no active x509 authority"):
        ca.sign_x509_svid(WORKLOAD, generate_private_key().public_key(), 60)
    with pytest.raises(InvalidAuthorityState, match="no active jwt authority"):
        ca.sign_jwt_svid(WORKLOAD, ["a"], 60)


def test_on_sign_hook_reports_kind_and_duration(make_manager: MakeManager) -> None:
    """Every signature calls on_sign(kind, seconds) so the API can export metrics."""
    manager = make_manager()
    manager.start()
    calls: list[tuple[str, float]] = []
    manager.ca.on_sign.append(lambda kind, seconds: calls.append((kind, seconds)))
    manager.ca.sign_x509_svid(WORKLOAD, generate_private_key().public_key(), 60)
    manager.ca.sign_jwt_svid(WORKLOAD, ["a"], 60)
    assert [k for k, _ in calls] == [SIGN_X509_WORKLOAD, SIGN_JWT]
    assert all(s >= 0 for _, s in calls)


def test_signing_is_consistent_during_rotation(make_manager: MakeManager, clock: FakeClock) -> None:
    """SVIDs signed from many threads while the CA rotates all verify against the bundle."""
    manager = make_manager()
    manager.start()
    public = generate_private_key().public_key()
    chains: list[list[x509.Certificate]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def sign() -> None:
        while not stop.is_set():
            try:
                chains.append(manager.ca.sign_x509_svid(WORKLOAD, public, 30))
            except BaseException as err:  # collected and asserted below
                errors.append(err)

    threads = [threading.Thread(target=sign) for _ in range(4)]
    for t in threads:
        t.start()
    for _ in range(3):
        info = manager.prepare("x509")
        manager.activate("x509", info.authority_id)
    stop.set()
    for t in threads:
        t.join()
    assert not errors
    bundle = _bundle(manager.bundle())
    for chain in chains:
        verify_x509_svid(chain, bundle, now=clock())
