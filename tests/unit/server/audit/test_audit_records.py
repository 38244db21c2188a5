"""The audit record, its chain, the call context and signed checkpoints, without a server."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from credo.keys import PrivateKey, generate_private_key
from server import audit
from server.audit import Actor, AuditRecord, ChainBroken, InvalidAuditRecord, verify_chain
from server.audit.checkpoint import Checkpointer, checkpoint_verifier
from server.datastore import SqlDataStore

PEM = serialization.Encoding.PEM


def _chain(n: int) -> list[AuditRecord]:
    records: list[AuditRecord] = []
    prev = audit.GENESIS
    for seq in range(1, n + 1):
        rec = audit.chain_record(
            audit.pending("entry.create", target=f"e{seq}", actor=Actor("admin", "uid=1 pid=2")),
            seq=seq,
            time_ms=1_700_000_000_000 + seq,
            prev_hash=prev,
        )
        records.append(rec)
        prev = rec.hash
    return records


def test_a_chain_verifies_and_each_kind_of_damage_is_named() -> None:
    """Edited, removed, swapped and re-hashed records each fail at the right record."""
    records = _chain(5)
    assert verify_chain(records).head_hash == records[-1].hash
    edited = [*records[:2], replace(records[2], target="x"), *records[3:]]
    with pytest.raises(ChainBroken, match="modified") as info:
        verify_chain(edited)
    assert info.value.seq == 3
    with pytest.raises(ChainBroken, match="record 3 is missing"):
        verify_chain([*records[:2], *records[3:]])
    with pytest.raises(ChainBroken, match="record 3 is missing") as info:
        verify_chain([records[0], records[1], records[3], records[2]])  # read out of order
    assert info.value.seq == 3
    rehashed = audit.chain_record(
        audit.pending("entry.create", target="x", actor=Actor("admin", "uid=1 pid=2")),
        seq=3,
        time_ms=records[2].time_ms,
        prev_hash=records[1].hash,
    )
    with pytest.raises(ChainBroken, match="does not follow") as info:
        verify_chain([*records[:2], rehashed, *records[3:]])
    assert info.value.seq == 4


@pytest.mark.parametrize(
    "field",
    ["subject", "target", "reason", "details"],
)
def test_values_shaped_like_a_jwt_or_a_pem_block_are_refused(field: str) -> None:
    """No record may carry a JWT or a PEM block, in any field."""
    for secret in ("eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln", "-----BEGIN PRIVATE KEY-----"):
        value: object = {"x": secret} if field == "details" else secret
        with pytest.raises(InvalidAuditRecord):
            audit.pending("x", **{field: value})  # type: ignore[arg-type]


def test_the_actor_is_scoped_to_the_call() -> None:
    """acting_as restores the previous actor; identify in one task does not reach another."""
    audit.set_server_actor("srv")
    try:
        assert audit.current().actor == Actor("server", "srv")
        with audit.acting_as(Actor("admin", "uid=1 pid=2")) as ctx:
            assert audit.current() == ctx and ctx.request_id
        assert audit.current().actor == Actor("server", "srv")

        async def calls() -> list[Actor]:
            async def one(name: str) -> Actor:
                audit.identify(Actor("agent", name))
                await asyncio.sleep(0)
                return audit.current().actor

            return list(await asyncio.gather(one("a"), one("b")))

        assert asyncio.run(calls()) == [Actor("agent", "a"), Actor("agent", "b")]
        assert audit.current().actor == Actor("server", "srv")
    finally:
        audit.set_server_actor("")


class _Signer:
    """A CA and a server SVID it signed, standing in for the server's identity."""

    def __init__(self, trust_domain: str = "example.org") -> None:
        now = datetime.now(UTC)
        self.ca_key = generate_private_key()
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "test CA")])
        self.ca = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1))
            .not_valid_after(now + timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
                ),
                critical=False,
            )
            .sign(self.ca_key, hashes.SHA256())
        )
        self.key: PrivateKey = generate_private_key()
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(minutes=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, True, False, False, False, False, False, False),
                critical=True,
            )
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}/credo/server")]
                ),
                critical=True,
            )
            .sign(self.ca_key, hashes.SHA256())
        )
        self.chain = [leaf.public_bytes(serialization.Encoding.DER)]

    def roots(self) -> bytes:
        return self.ca.public_bytes(PEM)

    def sign_checkpoint(self, message: bytes) -> tuple[bytes, list[bytes]]:
        from server.audit.checkpoint import sign_message

        return sign_message(self.key, message), list(self.chain)


def test_a_checkpoint_verifies_against_its_trust_domain_only(tmp_path: Path) -> None:
    """A checkpoint by the server verifies with its bundle, not another; a rewrite under
    it is caught at the checkpoint."""
    signer = _Signer()
    store = SqlDataStore.open(f"sqlite:///{tmp_path / 'a.db'}")
    try:
        store.append_audit_records(
            [audit.pending("entry.create", target=f"e{i}") for i in range(3)]
        )
        made = Checkpointer(store, signer, 600).checkpoint()
        assert made is not None and made.action == "audit.checkpoint" and made.target == "3"
        assert Checkpointer(store, signer, 600).checkpoint() == made  # head unchanged: no new one
        records = store.list_audit_records()
    finally:
        store.close()
    result = verify_chain(records, on_checkpoint=checkpoint_verifier(signer.roots()))
    assert (result.checkpoints, result.signed_through) == (1, 3)
    with pytest.raises(ChainBroken, match="not signed by a server of this trust domain"):
        verify_chain(records, on_checkpoint=checkpoint_verifier(_Signer().roots()))
    # Record 2 rewritten and every later hash recomputed: the checkpoint disagrees.
    forged: list[AuditRecord] = [records[0]]
    for rec in records[1:]:
        item = audit.PendingRecord(
            action=rec.action,
            actor=rec.actor,
            target="forged" if rec.seq == 2 else rec.target,
            details=rec.details_dict(),
        )
        forged.append(
            audit.chain_record(item, seq=rec.seq, time_ms=rec.time_ms, prev_hash=forged[-1].hash)
        )
    verify_chain(forged)  # consistent without the checkpoint check
    with pytest.raises(ChainBroken, match="checkpoint signed record 3 with a different hash"):
        verify_chain(forged, on_checkpoint=checkpoint_verifier(None))
