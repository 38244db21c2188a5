"""Node attestation rules: re-attestation only where the plugin allows it, bans, alias entries.

These run the server's real attestation flow (``server.agents.attestation``) on a real
SQLite datastore and a real CA. The plugin is a stand-in for one that, like k8s_psat, can
present fresh attestation data for the same node (no such plugin ships yet).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography import x509

from credo._reserved import agent_spiffe_id
from credo.keys import generate_private_key
from credo.selector import Selector
from credo.spiffe_id import SpiffeId, TrustDomain
from server.agents.attestation import NodeAttestation
from server.agents.errors import AgentBanned, RateLimited, ReattestationRefused
from server.attestation.errors import AttestationError, UnknownNodeAttestor
from server.attestation.protocol import AttestationResult
from server.ca.keymanager import MemoryKeyManager
from server.ca.manager import AuthorityManager, AuthorityManagerConfig
from server.datastore.sql import SqlDataStore

TD = TrustDomain("example.org")
AGENT = agent_spiffe_id(TD, "fake", "cluster", "node-1")


class _FakeNodeAttestor:
    """Attests every payload as node-1; ``can_reattest`` as configured."""

    type = "fake"

    def __init__(self, *, can_reattest: bool, alias: SpiffeId | None = None) -> None:
        self.can_reattest = can_reattest
        self.alias = alias

    def attest(self, payload: bytes) -> AttestationResult:
        if payload == b"bad":
            raise AttestationError("payload proves nothing")
        return AttestationResult(
            agent_id=AGENT,
            selectors=[Selector("fake", payload.decode())],
            can_reattest=self.can_reattest,
            alias_id=self.alias,
        )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqlDataStore]:
    ds = SqlDataStore.open(f"sqlite:///{tmp_path / 'ds.sqlite3'}")
    yield ds
    ds.close()


def _attestation(store: SqlDataStore, attestor: _FakeNodeAttestor) -> NodeAttestation:
    manager = AuthorityManager(
        AuthorityManagerConfig(trust_domain=TD, ca_ttl=3600, x509_svid_ttl=600),
        store,
        MemoryKeyManager(),
    )
    manager.start()
    return NodeAttestation(store, manager.ca, {"fake": attestor}, agent_svid_ttl=600)


def _attest(attestation: NodeAttestation, payload: bytes) -> list[x509.Certificate]:
    attestor = attestation.admit("10.0.0.1", "fake")
    key = generate_private_key()
    return asyncio.run(attestation.attest(attestor, payload, key.public_key(), "10.0.0.1"))


def _serial(chain: list[x509.Certificate]) -> str:
    return format(chain[0].serial_number, "x")


def test_reattesting_agent_of_a_plugin_that_allows_it_gets_a_new_svid(
    store: SqlDataStore,
) -> None:
    """A plugin whose result has can_reattest lets a known agent attest again: a new SVID for
    the same agent ID, and the node record takes the new serial and selectors."""
    attestation = _attestation(store, _FakeNodeAttestor(can_reattest=True))
    first = _attest(attestation, b"zone-a")
    second = _attest(attestation, b"zone-b")
    assert _serial(first) != _serial(second)
    for chain in (first, second):
        uris = chain[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert uris.get_values_for_type(x509.UniformResourceIdentifier) == [str(AGENT)]
    node = store.fetch_attested_node(str(AGENT))
    assert node is not None
    assert node.cert_serial == _serial(second)
    assert node.selectors == (Selector("fake", "zone-b"),)


def test_known_agent_of_a_plugin_that_forbids_it_is_refused(store: SqlDataStore) -> None:
    """Without can_reattest, attestation data naming an agent the server knows is refused,
    and the node keeps the SVID it has."""
    attestation = _attestation(store, _FakeNodeAttestor(can_reattest=False))
    first = _attest(attestation, b"zone-a")
    with pytest.raises(ReattestationRefused, match="does not allow attesting again"):
        _attest(attestation, b"zone-a")
    node = store.fetch_attested_node(str(AGENT))
    assert node is not None and node.cert_serial == _serial(first)


def test_banned_agent_cannot_reattest(store: SqlDataStore) -> None:
    """A banned agent stays banned even when its plugin allows re-attestation."""
    attestation = _attestation(store, _FakeNodeAttestor(can_reattest=True))
    _attest(attestation, b"zone-a")
    node = store.fetch_attested_node(str(AGENT))
    assert node is not None
    store.update_attested_node(replace(node, banned=True))
    with pytest.raises(AgentBanned):
        _attest(attestation, b"zone-a")


def test_refused_payload_records_nothing(store: SqlDataStore) -> None:
    """When the plugin refuses the payload no node is recorded."""
    attestation = _attestation(store, _FakeNodeAttestor(can_reattest=True))
    with pytest.raises(AttestationError, match="proves nothing"):
        _attest(attestation, b"bad")
    assert store.fetch_attested_node(str(AGENT)) is None


def test_alias_entry_is_created_once(store: SqlDataStore) -> None:
    """A result naming an alias creates one entry parented to the agent, also on re-attest."""
    alias = SpiffeId.parse("spiffe://example.org/nodes/group-a")
    attestation = _attestation(store, _FakeNodeAttestor(can_reattest=True, alias=alias))
    _attest(attestation, b"zone-a")
    _attest(attestation, b"zone-a")
    entries = store.list_registration_entries().entries
    assert [(e.spiffe_id, e.parent_id) for e in entries] == [(str(alias), str(AGENT))]
    assert entries[0].selectors == (Selector("spiffe_id", str(AGENT)),)


def test_admit_checks_the_type_and_the_source_rate(store: SqlDataStore) -> None:
    """An unknown attestation type names the known ones; a source over its burst is limited."""
    attestation = NodeAttestation(
        store,
        None,
        {"fake": _FakeNodeAttestor(can_reattest=True)},
        rate_limit=0.01,
    )
    with pytest.raises(UnknownNodeAttestor, match=r"unknown node attestor 'tpm'; .* fake"):
        attestation.admit("10.0.0.2", "tpm")
    for _ in range(4):  # the burst is five per source, the unknown type above was the first
        attestation.admit("10.0.0.2", "fake")
    with pytest.raises(RateLimited, match=r"too many node attestations from 10\.0\.0\.2"):
        attestation.admit("10.0.0.2", "fake")
    attestation.admit("10.0.0.3", "fake")  # another source is not limited
