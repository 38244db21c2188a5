"""Tests for AuthorityManager: creation, upstream mode, rotation, taint/revoke, resume."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from ca_testkit import TD, FakeClock, MakeManager
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from credo.bundle import Bundle
from credo.jwtsvid import JwtSvid
from credo.keys import KeyType, generate_private_key, private_key_to_pkcs8_pem
from credo.spiffe_id import SpiffeId, TrustDomain
from credo.witsvid import WitSvid
from credo.x509svid import ca_certificate_template, signature_hash_for, verify_x509_svid
from server.ca.errors import AuthorityNotFound, InvalidAuthorityState, UpstreamCaError
from server.ca.keymanager import DiskKeyManager
from server.ca.manager import AuthorityChange, AuthorityManager, key_id_for
from server.datastore.sql import SqlDataStore

WORKLOAD = SpiffeId.from_segments(TD, "workload")
CA_TTL = 600


def _stored_bundle(datastore: SqlDataStore) -> Bundle:
    data = datastore.fetch_bundle("example.org")
    assert data is not None
    return Bundle.parse(TD, data)


def _assert_signs_and_verifies(manager: AuthorityManager, now: datetime) -> None:
    bundle = manager.bundle()
    chain = manager.ca.sign_x509_svid(WORKLOAD, generate_private_key().public_key(), 30)
    assert verify_x509_svid(chain, bundle.x509_bundle(), now=now) == WORKLOAD
    token = manager.ca.sign_jwt_svid(WORKLOAD, ["aud"], 30)
    assert JwtSvid.parse_and_validate(token, bundle.jwt_bundle(), ["aud"], now=now).spiffe_id == (
        WORKLOAD
    )


def test_start_creates_active_authorities_and_bundle(
    make_manager: MakeManager, datastore: SqlDataStore, clock: FakeClock
) -> None:
    """A first start creates an active CA and JWT key and publishes them in the bundle."""
    manager = make_manager()
    manager.start()
    x, j = manager.state("x509"), manager.state("jwt")
    assert x.active is not None and x.prepared is None and x.old is None
    assert j.active is not None and j.prepared is None
    ca = manager.ca.x509_ca
    assert ca is not None and ca.authority_id == x.active.authority_id
    ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert x.active.authority_id == ski.digest.hex()
    assert manager.ca.jwt_key_id == j.active.authority_id and len(j.active.authority_id) == 32
    bundle = _stored_bundle(datastore)
    assert bundle.sequence_number >= 1
    assert bundle.x509_authorities == (ca.certificate,)
    assert list(bundle.jwt_authorities) == [j.active.authority_id]
    assert bundle.refresh_hint == 60
    _assert_signs_and_verifies(manager, clock())


def test_restart_reuses_authorities_without_bundle_change(
    make_manager: MakeManager, datastore: SqlDataStore
) -> None:
    """Restarting loads the same active authorities and leaves the bundle sequence alone."""
    first = make_manager()
    first.start()
    before = _stored_bundle(datastore).sequence_number
    second = make_manager()
    second.start()
    assert second.state("x509") == first.state("x509")
    assert second.ca.jwt_key_id == first.ca.jwt_key_id
    assert _stored_bundle(datastore).sequence_number == before


def _write_upstream(
    tmp_path: Path, *, with_intermediate: bool
) -> tuple[Path, Path, x509.Certificate]:
    now = datetime.now(UTC)
    root_key = generate_private_key(KeyType.EC_P256)
    upstream_td = TrustDomain("upstream.example")
    root = ca_certificate_template(
        upstream_td,
        root_key.public_key(),
        not_before=now - timedelta(days=1),
        not_after=now + timedelta(days=3650),
    ).sign(root_key, signature_hash_for(root_key))
    signer_key, certs = root_key, [root]
    if with_intermediate:
        signer_key = generate_private_key(KeyType.EC_P256)
        mid = ca_certificate_template(
            upstream_td,
            signer_key.public_key(),
            not_before=now - timedelta(days=1),
            not_after=now + timedelta(days=365),
            issuer=root,
        ).sign(root_key, signature_hash_for(root_key))
        certs = [mid, root]
    cert_path, key_path = tmp_path / "upstream.crt", tmp_path / "upstream.key"
    cert_path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs))
    key_path.write_bytes(private_key_to_pkcs8_pem(signer_key))
    return cert_path, key_path, root


@pytest.mark.parametrize("with_intermediate", [False, True], ids=["root-signs", "root-mid-signs"])
def test_upstream_mode_chains_to_upstream_root(
    tmp_path: Path,
    make_manager: MakeManager,
    datastore: SqlDataStore,
    clock: FakeClock,
    with_intermediate: bool,
) -> None:
    """Upstream mode: chains are leaf->ours(->upstream mid); the bundle holds the upstream root."""
    cert_path, key_path, root = _write_upstream(tmp_path, with_intermediate=with_intermediate)
    clock.now = datetime.now(UTC).replace(microsecond=0)
    manager = make_manager(upstream_ca_cert=cert_path, upstream_ca_key=key_path)
    manager.start()
    bundle = _stored_bundle(datastore)
    assert bundle.x509_authorities == (root,)
    ca = manager.ca.x509_ca
    assert ca is not None and not ca.self_signed
    chain = manager.ca.sign_x509_svid(WORKLOAD, generate_private_key().public_key(), 30)
    assert chain[1] == ca.certificate
    assert len(chain) == (3 if with_intermediate else 2)
    assert verify_x509_svid(chain, bundle.x509_bundle(), now=clock()) == WORKLOAD
    # Rotating the intermediate does not change the X.509 part of the bundle.
    info = manager.prepare("x509")
    manager.activate("x509", info.authority_id)
    assert _stored_bundle(datastore).x509_authorities == (root,)
    chain = manager.ca.sign_x509_svid(WORKLOAD, generate_private_key().public_key(), 30)
    assert verify_x509_svid(chain, bundle.x509_bundle(), now=clock()) == WORKLOAD


def test_upstream_key_mismatch_is_refused(tmp_path: Path, make_manager: MakeManager) -> None:
    """An upstream key that does not match the upstream certificate is refused clearly."""
    cert_path, key_path, _ = _write_upstream(tmp_path, with_intermediate=False)
    key_path.write_bytes(private_key_to_pkcs8_pem(generate_private_key()))
    manager = make_manager(upstream_ca_cert=cert_path, upstream_ca_key=key_path)
    with pytest.raises(UpstreamCaError, match="does not match"):
        manager.start()


def test_rotation_across_several_lifetimes(
    make_manager: MakeManager, datastore: SqlDataStore, clock: FakeClock
) -> None:
    """Prepare at half life, activate with a sixth left, prune old after expiry; SVIDs verify."""
    manager = make_manager()
    published: list[int] = []
    set_bundle = datastore.set_bundle

    def record(td: str, data: bytes) -> None:
        published.append(Bundle.parse(TD, data).sequence_number)
        set_bundle(td, data)

    datastore.set_bundle = record  # type: ignore[method-assign]
    changes: list[tuple[datetime, AuthorityChange]] = []
    manager.on_change.append(lambda change: changes.append((clock(), change)))
    manager.start()
    step = 10
    previous_svid = manager.ca.sign_x509_svid(WORKLOAD, generate_private_key().public_key(), 60)
    for _ in range(4 * CA_TTL // step):
        now = clock.advance(step)
        manager.tick(now)
        _assert_signs_and_verifies(manager, now)
        # An SVID from the previous step still verifies against the new bundle.
        if previous_svid[0].not_valid_after_utc >= now:
            verify_x509_svid(previous_svid, manager.bundle().x509_bundle(), now=now)
        previous_svid = manager.ca.sign_x509_svid(WORKLOAD, generate_private_key().public_key(), 60)
        for kind in ("x509", "jwt", "wit"):
            rows = datastore.list_authorities(kind)
            assert [r.status for r in rows].count("active") == 1
            assert len(rows) <= 3

    assert published == list(range(1, len(published) + 1))
    x509_changes = [(t, c) for t, c in changes if c.kind == "x509"]
    actions = [c.action for _, c in x509_changes]
    assert actions.count("activated") >= 4 and actions.count("pruned") >= 2
    # Check the timing of each x509 transition against the lifetime of the authority involved.
    born: dict[str, datetime] = {}
    for t, c in x509_changes:
        if c.action == "prepared":
            born[c.authority_id] = t
    activations = [(t, c.authority_id) for t, c in x509_changes if c.action == "activated"]
    for (_, prev), (t_next, nxt) in itertools.pairwise(activations):
        # The CA NotBefore is backdated 10 s, so it lives CA_TTL + 10 s.
        life = timedelta(seconds=CA_TTL + 10)
        nb = born[prev] - timedelta(seconds=10)
        tick = timedelta(seconds=step)
        assert nb + life / 2 <= born[nxt] < nb + life / 2 + tick
        assert nb + life * 5 / 6 <= t_next < nb + life * 5 / 6 + tick
    for t, c in x509_changes:
        if c.action == "pruned":
            assert t >= born[c.authority_id] - timedelta(seconds=10) + timedelta(seconds=CA_TTL)


def test_jwt_key_is_in_bundle_before_it_signs(
    make_manager: MakeManager, datastore: SqlDataStore, clock: FakeClock
) -> None:
    """A prepared JWT key is in the bundle while tokens are still signed by the active one."""
    manager = make_manager()
    manager.start()
    active = manager.ca.jwt_key_id
    manager.tick(clock.advance(CA_TTL / 2 + 1))
    prepared = manager.state("jwt").prepared
    assert prepared is not None
    assert prepared.authority_id in _stored_bundle(datastore).jwt_authorities
    assert manager.ca.jwt_key_id == active
    token = manager.ca.sign_jwt_svid(WORKLOAD, ["a"], 30)
    assert (
        JwtSvid.parse_and_validate(token, manager.bundle().jwt_bundle(), ["a"], now=clock()).key_id
        == active
    )
    manager.tick(clock.advance(CA_TTL / 3))
    assert manager.ca.jwt_key_id == prepared.authority_id


def test_wit_key_rotates_and_is_published_with_use_wit_svid(
    make_manager: MakeManager, datastore: SqlDataStore, clock: FakeClock
) -> None:
    """The WIT key has its own rotation: published (use wit-svid) before it signs, then
    active; a WIT-SVID signed before the switch still validates against the new bundle."""
    manager = make_manager()
    manager.start()
    state = manager.state("wit")
    assert state.active is not None
    active = state.active.authority_id
    assert active not in _stored_bundle(datastore).jwt_authorities
    workload_key = generate_private_key()
    before = manager.ca.sign_wit_svid(WORKLOAD, workload_key.public_key(), CA_TTL)
    manager.tick(clock.advance(CA_TTL / 2 + 1))
    prepared = manager.state("wit").prepared
    assert prepared is not None
    assert prepared.authority_id in _stored_bundle(datastore).wit_authorities
    manager.tick(clock.advance(CA_TTL / 3))
    after = manager.ca.sign_wit_svid(WORKLOAD, workload_key.public_key(), 60)
    bundle = _stored_bundle(datastore).wit_bundle()
    assert WitSvid.parse_and_validate(after, bundle, now=clock()).key_id == prepared.authority_id
    old = WitSvid.parse_and_validate(before, bundle, now=clock())
    assert old.key_id == active
    assert set(manager.key_manager.list_key_ids()) >= {
        f"wit-{active}",
        f"wit-{prepared.authority_id}",
    }


def test_sequence_number_increments_on_every_change(
    make_manager: MakeManager, datastore: SqlDataStore
) -> None:
    """Prepare, taint, revoke each bump spiffe_sequence by one; activation changes nothing."""
    manager = make_manager()
    manager.start()
    seqs = [_stored_bundle(datastore).sequence_number]
    old_id = manager.state("x509").active.authority_id  # type: ignore[union-attr]
    info = manager.prepare("x509")
    seqs.append(_stored_bundle(datastore).sequence_number)
    manager.activate("x509", info.authority_id)
    seqs.append(_stored_bundle(datastore).sequence_number)
    manager.taint("x509", old_id)
    seqs.append(_stored_bundle(datastore).sequence_number)
    manager.revoke("x509", old_id)
    seqs.append(_stored_bundle(datastore).sequence_number)
    base = seqs[0]
    assert seqs == [base, base + 1, base + 1, base + 2, base + 3]


def test_taint_and_revoke_rules(
    make_manager: MakeManager, datastore: SqlDataStore, clock: FakeClock
) -> None:
    """Only an old authority can be tainted, only a tainted one revoked; revoke drops it."""
    manager = make_manager()
    manager.start()
    for kind in ("x509", "jwt"):
        first = manager.state(kind).active  # type: ignore[arg-type]
        assert first is not None
        with pytest.raises(
            InvalidAuthorityState,
            match=f"cannot taint {kind} authority '{first.authority_id}': it is active",
        ):
            manager.taint(kind, first.authority_id)  # type: ignore[arg-type]
        nxt = manager.prepare(kind)  # type: ignore[arg-type]
        with pytest.raises(InvalidAuthorityState, match="it is prepared; only an old authority"):
            manager.taint(kind, nxt.authority_id)  # type: ignore[arg-type]
        with pytest.raises(InvalidAuthorityState, match="it is active; expected the prepared"):
            manager.activate(kind, first.authority_id)  # type: ignore[arg-type]
        manager.activate(kind, nxt.authority_id)  # type: ignore[arg-type]
        with pytest.raises(InvalidAuthorityState, match="is not tainted; taint it first"):
            manager.revoke(kind, first.authority_id)  # type: ignore[arg-type]
        tainted = manager.taint(kind, first.authority_id)  # type: ignore[arg-type]
        assert tainted.tainted and tainted.status == "old"
        assert manager.tainted_authority_ids(kind) == {first.authority_id}  # type: ignore[arg-type]
        assert manager.state(kind).old == tainted  # type: ignore[arg-type]
        with pytest.raises(InvalidAuthorityState, match="already tainted"):
            manager.taint(kind, first.authority_id)  # type: ignore[arg-type]
        manager.revoke(kind, first.authority_id)  # type: ignore[arg-type]
        assert manager.tainted_authority_ids(kind) == frozenset()  # type: ignore[arg-type]
        assert manager.state(kind).old is None  # type: ignore[arg-type]
        with pytest.raises(AuthorityNotFound, match=f"no {kind} authority with id 'nope'"):
            manager.revoke(kind, "nope")  # type: ignore[arg-type]
    bundle = _stored_bundle(datastore)
    assert len(bundle.x509_authorities) == 1
    assert list(bundle.jwt_authorities) == [manager.ca.jwt_key_id]
    assert datastore.fetch_authority(first.authority_id) is None
    _assert_signs_and_verifies(manager, clock())


def test_restart_mid_rotation_resumes_with_prepared(
    make_manager: MakeManager, db_url: str, key_dir: Path, clock: FakeClock
) -> None:
    """A restarted manager (same datastore, same key dir) resumes with the prepared authority."""
    manager = make_manager()
    manager.start()
    active = manager.state("x509").active
    manager.tick(clock.advance(CA_TTL / 2 + 1))
    prepared = manager.state("x509").prepared
    assert active is not None and prepared is not None
    # "kill -9": drop the manager; reopen the datastore from its file.
    reopened = SqlDataStore.open(db_url, clock=clock.unix)
    try:
        resumed = AuthorityManager(manager.config, reopened, DiskKeyManager(key_dir), clock=clock)
        resumed.start(clock())
        assert resumed.state("x509").prepared == prepared
        assert resumed.state("x509").active == active
        resumed.tick(clock.advance(CA_TTL / 3))
        assert resumed.state("x509").active.authority_id == prepared.authority_id  # type: ignore[union-attr]
        assert resumed.ca.x509_ca.authority_id == prepared.authority_id  # type: ignore[union-attr]
        _assert_signs_and_verifies(resumed, clock())
    finally:
        reopened.close()


def test_crash_between_demote_and_promote_resumes(
    make_manager: MakeManager, datastore: SqlDataStore, clock: FakeClock
) -> None:
    """With the active row already demoted but the prepared not yet promoted, start activates it."""
    manager = make_manager()
    manager.start()
    prepared = manager.prepare("x509")
    for row in datastore.list_authorities("x509"):
        if row.status == "active":
            datastore.update_authority(replace(row, status="old"))
    resumed = make_manager()
    resumed.start()
    assert resumed.state("x509").active.authority_id == prepared.authority_id  # type: ignore[union-attr]
    assert resumed.state("x509").old is not None


def test_missing_key_for_prepared_row_is_dropped(
    make_manager: MakeManager,
    datastore: SqlDataStore,
    key_dir: Path,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A prepared row whose key file vanished is dropped with a warning and later re-prepared."""
    manager = make_manager()
    manager.start()
    prepared = manager.prepare("x509")
    row = datastore.fetch_authority(prepared.authority_id)
    assert row is not None
    (key_dir / f"{key_id_for(row)}.pem").unlink()
    orphan = key_dir / "jwt-orphan.pem"
    orphan.write_bytes(private_key_to_pkcs8_pem(generate_private_key()))
    caplog.set_level(logging.WARNING, logger="server.ca")
    resumed = make_manager()
    resumed.start()
    assert resumed.state("x509").prepared is None
    assert datastore.fetch_authority(prepared.authority_id) is None
    assert not orphan.exists()
    dropped = [r for r in caplog.records if r.getMessage().startswith("dropped authority")]
    assert dropped and dropped[0].authority_id == prepared.authority_id  # type: ignore[attr-defined]
    assert all(
        c.public_bytes(serialization.Encoding.DER) != row.public_data
        for c in _stored_bundle(datastore).x509_authorities
    )
    resumed.tick(clock.advance(CA_TTL / 2 + 1))
    assert resumed.state("x509").prepared is not None


def test_run_loop_ticks_until_stopped(make_manager: MakeManager, clock: FakeClock) -> None:
    """run() starts the manager, ticks every interval, and returns when stop is set."""
    manager = make_manager(rotation_check_interval=0.01)
    seen: list[AuthorityChange] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        changed = asyncio.Event()

        def on_change(change: AuthorityChange) -> None:  # called on the manager's thread
            seen.append(change)
            loop.call_soon_threadsafe(changed.set)

        async def until(predicate: Callable[[], bool]) -> None:
            while not predicate():
                await asyncio.wait_for(changed.wait(), 30)
                changed.clear()

        manager.on_change.append(on_change)
        stop = asyncio.Event()
        task = asyncio.create_task(manager.run(stop))
        # start() (on a worker thread) activates an X.509 authority at the current time;
        # only then move the clock past half its life, so a later tick must prepare the next.
        await until(lambda: any(c.action == "activated" and c.kind == "x509" for c in seen))
        started = len(seen)
        clock.advance(CA_TTL / 2 + 1)
        await until(
            lambda: any(c.action == "prepared" and c.kind == "x509" for c in seen[started:])
        )
        stop.set()
        await asyncio.wait_for(task, 5)

    asyncio.run(main())
    assert manager.state("x509").prepared is not None


def test_no_private_key_material_or_tokens_in_logs(
    make_manager: MakeManager, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing logged during start, rotation, signing and taint holds a key or a token."""
    caplog.set_level(logging.DEBUG)
    manager = make_manager()
    manager.start()
    tokens = []
    for _ in range(8):
        manager.tick(clock.advance(CA_TTL / 6))
        manager.ca.sign_x509_svid(WORKLOAD, generate_private_key().public_key(), 30)
        tokens.append(manager.ca.sign_jwt_svid(WORKLOAD, ["a"], 30))
    keys = [manager.key_manager.get_key(k) for k in manager.key_manager.list_key_ids()]  # type: ignore[attr-defined]
    secrets = [private_key_to_pkcs8_pem(k).decode().splitlines()[1] for k in keys if k is not None]
    assert caplog.records
    for record in caplog.records:
        text = record.getMessage() + " " + " ".join(str(v) for v in record.__dict__.values())
        assert "PRIVATE KEY" not in text
        for secret in secrets:
            assert secret not in text
        for token in tokens:
            assert token not in text and token.split(".")[2] not in text


def test_expired_upstream_is_refused(
    tmp_path: Path, make_manager: MakeManager, clock: FakeClock
) -> None:
    """An upstream CA that has expired cannot sign a new intermediate; the error says so."""
    cert_path, key_path, _ = _write_upstream(tmp_path, with_intermediate=False)
    clock.now = datetime.now(UTC) + timedelta(days=4000)
    manager = make_manager(upstream_ca_cert=cert_path, upstream_ca_key=key_path)
    with pytest.raises(UpstreamCaError, match="upstream ca certificate expires at"):
        manager.start()


def test_checks_work_from_the_last_journal_read_while_the_generation_stands(
    make_manager: MakeManager, datastore: SqlDataStore, clock: FakeClock
) -> None:
    """With a generation (the server passes its feed position and the datastore's
    committed writes), a check that finds nothing due sends the database nothing; each
    rotation step's write moves it, so the steps go on as with a read per check."""
    manager = make_manager()
    manager.start()

    def generation() -> object:
        return datastore.writes_committed

    manager.tick(clock.advance(1), generation)  # the first check reads the journal
    before = datastore.statements_executed
    for _ in range(10):
        manager.tick(clock.advance(1), generation)
    assert datastore.statements_executed == before

    actions: list[str] = []
    manager.on_change.append(lambda change: actions.append(change.action))
    for _ in range(4 * CA_TTL // 10):
        manager.tick(clock.advance(10), generation)
        _assert_signs_and_verifies(manager, clock())
        for kind in ("x509", "jwt", "wit"):
            rows = datastore.list_authorities(kind)
            assert [r.status for r in rows].count("active") == 1
            assert len(rows) <= 3
    assert actions.count("activated") >= 3 * 4 and actions.count("pruned") >= 3 * 2
