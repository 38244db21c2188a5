"""Issuer._record: a batch's issued-SVID rows and audit records, written together."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from credo import SpiffeId, TrustDomain, ca_certificate_template, generate_private_key
from credo.selector import Selector
from server.agents.errors import EntryNotAuthorized
from server.ca.ca import X509CA, build_workload_svid
from server.datastore import RegistrationEntry, SqlDataStore
from server.issuance import IssueFailed, Issuer, X509SvidIssued
from server.revocation import authority_id_of

TD = "spiffe://example.org"
AGENT = f"{TD}/credo/agent/join_token/t1"


def test_a_revoked_entry_fails_its_items_and_every_item_is_audited_once(
    tmp_path: Path,
) -> None:
    """Entries revoked after authorization fail their items (no issued row, a refused
    record); the others are recorded with the leaf's serial and authority id, each SVID
    audited once, in one chain step per batch."""
    store = SqlDataStore.open(f"sqlite:///{tmp_path / 'ds.db'}")
    try:
        td, now = TrustDomain("example.org"), datetime.now(UTC)
        key = generate_private_key()
        ca_cert = ca_certificate_template(
            td, key.public_key(), not_before=now, not_after=now + timedelta(days=1)
        ).sign(key, hashes.SHA256())
        ca = X509CA("ca", ca_cert, key)
        public_key = generate_private_key().public_key()
        entries = [
            store.create_registration_entry(
                RegistrationEntry(f"{TD}/w{i}", AGENT, (Selector("unix", f"uid:{i}"),))
            )
            for i in range(3)
        ]
        results: list[X509SvidIssued | IssueFailed] = []
        for entry in entries:
            leaf = build_workload_svid(
                td, ca.leaf_signer, SpiffeId.parse(entry.spiffe_id), public_key, 3600, (), now
            )
            chain = [leaf.der, ca_cert.public_bytes(serialization.Encoding.DER)]
            results.append(X509SvidIssued(entry.id, entry.spiffe_id, chain, leaf.not_after))
        results.append(IssueFailed("gone", EntryNotAuthorized("gone")))
        store.revoke_registration_entry(entries[1].id, "compromised")
        head = store.fetch_audit_head()

        out = Issuer(None, audit_writer=store, issued=store)._record(  # type: ignore[arg-type]
            results, {e.id: e for e in entries}, AGENT
        )

        assert [type(r) for r in out] == [X509SvidIssued, IssueFailed, X509SvidIssued, IssueFailed]
        leaves = [x509.load_der_x509_certificate(r.cert_chain[0]) for r in results[:3]]  # type: ignore[union-attr]
        serials = [format(c.serial_number, "x") for c in leaves]
        for i in (0, 2):
            got = store.fetch_issued_x509_svid(serials[i])
            assert got is not None
            assert (got.entry_id, got.agent_id) == (entries[i].id, AGENT)
            assert got.authority_id == authority_id_of(leaves[i]) != ""
        assert store.fetch_issued_x509_svid(serials[1]) is None
        records = store.list_audit_records()
        new = [r for r in records if r.seq > (head.seq if head else 0)]
        assert [(r.action, r.outcome, r.target) for r in new] == [
            ("x509_svid.issue", "allowed", serials[0]),
            ("x509_svid.issue", "refused", ""),
            ("x509_svid.issue", "allowed", serials[2]),
            ("x509_svid.issue", "refused", ""),
        ]
        assert len({r.time_ms for r in new}) == 1  # chained in one transaction
    finally:
        store.close()
