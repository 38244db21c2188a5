"""CRLs of the X.509 authorities: contents (RFC 5280), what is listed, when they are re-signed."""

from __future__ import annotations

from ca_testkit import TD, FakeClock, MakeManager
from cryptography import x509

from credo.keys import KeyType, generate_private_key
from credo.spiffe_id import SpiffeId
from server.ca.crl import BACKDATE, CrlSigner
from server.datastore.models import RegistrationEntry
from server.datastore.sql import SqlDataStore
from server.revocation import issued_record

AGENT = f"spiffe://{TD.name}/credo/agent/join_token/t"


def test_crl_is_signed_by_its_authority_and_lists_revoked_unexpired_svids(
    make_manager: MakeManager, datastore: SqlDataStore, clock: FakeClock
) -> None:
    """The CRL verifies with the CA's key, names it as issuer, carries a CRL number and the
    authority key identifier, and lists revoked SVIDs until they expire."""
    manager = make_manager(server_id="server-a")
    manager.start(clock())
    signer = CrlSigner(
        datastore, manager.key_manager, "server-a", next_update=600, clock=clock.unix
    )
    ca = manager.ca.x509_ca
    assert ca is not None
    entry = datastore.create_registration_entry(RegistrationEntry(f"spiffe://{TD.name}/w", AGENT))
    key = generate_private_key(KeyType.EC_P256).public_key()
    short = manager.ca.sign_x509_svid(SpiffeId.parse(f"spiffe://{TD.name}/w"), key, 30)[0]
    long = manager.ca.sign_x509_svid(SpiffeId.parse(f"spiffe://{TD.name}/w"), key, 60)[0]
    kept = manager.ca.sign_x509_svid(SpiffeId.parse(f"spiffe://{TD.name}/w"), key, 60)[0]
    datastore.create_issued_x509_svids(
        [
            issued_record(c, f"spiffe://{TD.name}/w", entry_id=entry.id, agent_id=AGENT)
            for c in (short, long)
        ]
        + [issued_record(kept, f"spiffe://{TD.name}/w", agent_id=AGENT)]
    )
    assert issued_record(short, "x").authority_id == ca.authority_id

    (first,) = signer.sign_due()
    crl = x509.load_der_x509_crl(first.data)
    assert crl.is_signature_valid(ca.certificate.public_key())  # type: ignore[arg-type]
    assert crl.issuer == ca.certificate.subject and len(crl) == 0
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 1
    aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier is not None and aki.key_identifier.hex() == ca.authority_id
    assert crl.last_update_utc.timestamp() == clock.unix() - BACKDATE
    assert crl.next_update_utc is not None
    assert crl.next_update_utc.timestamp() == clock.unix() + 600
    assert signer.sign_due() == []  # fresh: nothing to do

    datastore.revoke_registration_entry(entry.id, "leaked")
    (second,) = signer.sign_due([ca.authority_id])
    crl = x509.load_der_x509_crl(second.data)
    assert {r.serial_number for r in crl} == {short.serial_number, long.serial_number}
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 2

    clock.advance(45)  # `short` has expired: it leaves the CRL at the next signing
    (third,) = signer.sign_due([ca.authority_id])
    assert {r.serial_number for r in x509.load_der_x509_crl(third.data)} == {long.serial_number}


def test_crl_is_re_signed_at_half_its_next_update(
    make_manager: MakeManager, datastore: SqlDataStore, clock: FakeClock
) -> None:
    """A CRL is signed again once half its nextUpdate has passed, not before."""
    manager = make_manager(server_id="server-a")
    manager.start(clock())
    signer = CrlSigner(
        datastore, manager.key_manager, "server-a", next_update=100, clock=clock.unix
    )
    assert len(signer.sign_due()) == 1
    clock.advance(49)
    assert signer.sign_due() == []
    clock.advance(1)
    (again,) = signer.sign_due()
    assert again.number == 2


def test_only_own_authorities_are_signed(
    make_manager: MakeManager, datastore: SqlDataStore, clock: FakeClock
) -> None:
    """A server signs CRLs only for the authorities it holds the key of."""
    manager = make_manager(server_id="server-a")
    manager.start(clock())
    other = CrlSigner(datastore, manager.key_manager, "server-b", clock=clock.unix)
    assert other.sign_due() == []
