"""AuthorityManager with several servers on one datastore: own rows only, union bundle, races."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from ca_testkit import TD, FakeClock
from cryptography import x509

from credo.bundle import Bundle
from credo.jwtsvid import JwtSvid
from credo.keys import generate_private_key
from credo.spiffe_id import SpiffeId
from credo.x509svid import verify_x509_svid
from server.ca.errors import InvalidAuthorityState
from server.ca.keymanager import DiskKeyManager
from server.ca.manager import AuthorityManager, AuthorityManagerConfig, key_id_for
from server.datastore.sql import SqlDataStore

PG_URL = os.environ.get("CREDO_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
WORKLOAD = SpiffeId.from_segments(TD, "workload")
CA_TTL = 600

Make = Callable[..., AuthorityManager]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def shared_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database shared by the "servers": a SQLite file or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'shared.sqlite3'}"
        return
    psycopg = pytest.importorskip("psycopg")
    schema = f"credo_ca_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(PG_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"postgres not reachable at {PG_URL}: {exc}")
    with admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
        sep = "&" if "?" in PG_URL else "?"
        try:
            yield f"{PG_URL}{sep}options={quote(f'-csearch_path={schema}')}"
        finally:
            admin.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture
def make(shared_url: str, tmp_path: Path, clock: FakeClock) -> Iterator[Make]:
    """Build a manager for server ``name``: its own datastore connection and key directory."""
    stores: list[SqlDataStore] = []

    def build(name: str, server_id: str | None = None) -> AuthorityManager:
        store = SqlDataStore.open(shared_url, clock=clock.unix)
        stores.append(store)
        config = AuthorityManagerConfig(
            trust_domain=TD,
            ca_ttl=CA_TTL,
            x509_svid_ttl=60,
            server_id=name if server_id is None else server_id,
        )
        return AuthorityManager(
            config, store, DiskKeyManager(tmp_path / name / "keys"), clock=clock
        )

    yield build
    for store in stores:
        store.close()


def _rows(manager: AuthorityManager, owner: str | None = None) -> dict[str, tuple[str, str]]:
    return {
        r.authority_id: (r.owner, r.status) for r in manager.datastore.list_authorities(owner=owner)
    }


def _bundle(manager: AuthorityManager) -> Bundle:
    data = manager.datastore.fetch_bundle(TD.name)
    assert data is not None
    return Bundle.parse(TD, data)


def _x509_ids(bundle: Bundle) -> set[str]:
    return {
        c.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest.hex()
        for c in bundle.x509_authorities
    }


def _assert_verifies(signer: AuthorityManager, bundle: Bundle, clock: FakeClock) -> None:
    chain = signer.ca.sign_x509_svid(WORKLOAD, generate_private_key().public_key(), 30)
    assert verify_x509_svid(chain, bundle.x509_bundle(), now=clock()) == WORKLOAD
    token = signer.ca.sign_jwt_svid(WORKLOAD, ["aud"], 30)
    parsed = JwtSvid.parse_and_validate(token, bundle.jwt_bundle(), ["aud"], now=clock())
    assert parsed.spiffe_id == WORKLOAD


def test_second_server_keeps_first_servers_authorities(make: Make, clock: FakeClock) -> None:
    """A server starting on a shared database neither drops nor changes another's rows."""
    a = make("a")
    a.start()
    rows_a = _rows(a, "a")
    # One X.509 CA, one JWT key and one WIT key per server.
    assert len(rows_a) == 3 and {o for o, _ in rows_a.values()} == {"a"}
    b = make("b")
    b.start()
    assert _rows(b, "a") == rows_a
    assert len(_rows(b, "b")) == 3
    assert a.state("x509") != b.state("x509")
    # Restarting either one (fresh managers on the same key dirs) keeps everything.
    for name in ("a", "b", "a"):
        make(name).start()
    assert _rows(a, "a") == rows_a and len(_rows(a)) == 6
    # Only its own keys are in each key manager; neither deleted the other's.
    assert {key_id_for(r) for r in a.datastore.list_authorities(owner="a")} == set(
        a.key_manager.list_key_ids()
    )


def test_bundle_is_union_of_every_servers_authorities(make: Make, clock: FakeClock) -> None:
    """The stored bundle holds both servers' CAs and JWT keys; each one's SVIDs verify."""
    a, b = make("a"), make("b")
    a.start()
    b.start()
    bundle = _bundle(a)
    ax, bx = a.state("x509").active, b.state("x509").active
    aj, bj = a.state("jwt").active, b.state("jwt").active
    assert ax and bx and aj and bj
    assert _x509_ids(bundle) == {ax.authority_id, bx.authority_id}
    assert set(bundle.jwt_authorities) == {aj.authority_id, bj.authority_id}
    assert a.bundle() == b.bundle() == bundle
    _assert_verifies(a, bundle, clock)
    _assert_verifies(b, bundle, clock)


def test_rotation_and_manual_control_touch_only_own_rows(make: Make, clock: FakeClock) -> None:
    """B's rotation, prepare and activate leave A's rows alone; B cannot taint A's authority."""
    a, b = make("a"), make("b")
    a.start()
    b.start()
    rows_a = _rows(a, "a")
    seq = _bundle(a).sequence_number
    prepared = b.prepare("x509")
    assert _rows(b, "a") == rows_a
    assert _bundle(a).sequence_number == seq + 1
    assert prepared.authority_id in _x509_ids(_bundle(a))
    b.activate("x509", prepared.authority_id)
    assert _rows(b, "a") == rows_a
    # Through B's own rotation (A alive, its authorities not yet expired), A is untouched.
    b_active = b.state("x509").active
    for _ in range(3):
        clock.advance(CA_TTL * 0.3)
        b.tick()
        assert _rows(b, "a") == rows_a
    assert b.state("x509").active != b_active
    a_x = next(iter(r for r, (_, s) in rows_a.items() if s == "active"))
    with pytest.raises(InvalidAuthorityState, match="belongs to another server"):
        b.taint("x509", a_x)
    with pytest.raises(InvalidAuthorityState, match="belongs to another server"):
        b.revoke("x509", a_x)


def test_expired_authorities_of_a_gone_server_are_pruned(make: Make, clock: FakeClock) -> None:
    """Rows of another server past their NotAfter are pruned by anyone (rows only)."""
    a, b = make("a"), make("b")
    a.start()
    b.start()
    a_keys = set(a.key_manager.list_key_ids())
    clock.advance(CA_TTL * 3)  # A is gone; B keeps rotating
    for _ in range(8):
        b.tick()
        clock.advance(CA_TTL / 10)
    assert _rows(b, "a") == {}
    bundle = _bundle(b)
    assert all(r.owner == "b" for r in b.datastore.list_authorities())
    assert len(bundle.jwt_authorities) == len(b.datastore.list_authorities("jwt"))
    assert set(a.key_manager.list_key_ids()) == a_keys  # B never touches A's key dir


def test_legacy_rows_are_adopted_by_the_server_holding_their_keys(
    make: Make, clock: FakeClock
) -> None:
    """Rows without an owner go to the server whose key manager holds their key."""
    legacy = make("a", server_id="")  # rows as written before schema version 2
    legacy.start()
    legacy_rows = _rows(legacy)
    assert {o for o, _ in legacy_rows.values()} == {""}
    b = make("b")  # another server starting first must not drop them
    b.start()
    assert _rows(b, "") == legacy_rows
    a = make("a")  # the same key directory as the legacy server
    a.start()
    assert {aid: s for aid, (o, s) in _rows(a, "a").items()} == {
        aid: s for aid, (_, s) in legacy_rows.items()
    }
    assert _rows(a, "") == {}
    assert a.ca.x509_ca is not None and a.ca.x509_ca.authority_id in legacy_rows


def test_concurrent_bundle_publishes_never_reuse_a_sequence(make: Make, clock: FakeClock) -> None:
    """Two managers publishing the bundle at the same time always get distinct sequences."""
    a, b = make("a"), make("b")
    a.start()
    b.start()
    start = _bundle(a).sequence_number
    seen: list[int] = []
    guard = threading.Lock()
    rounds = 15

    def publish(manager: AuthorityManager) -> None:
        for _ in range(rounds):
            bundle = manager._publish_bundle(force=True)
            with guard:
                seen.append(bundle.sequence_number)

    threads = [threading.Thread(target=publish, args=(m,)) for m in (a, b, a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    total = rounds * len(threads)
    assert sorted(seen) == list(range(start + 1, start + total + 1))
    final = _bundle(a)
    assert final.sequence_number == start + total
    assert len(final.x509_authorities) == 2 and len(final.jwt_authorities) == 2
