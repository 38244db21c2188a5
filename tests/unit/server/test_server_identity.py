"""The server's own SVID is re-signed at about half its life, counted from when it was made."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from credo._renewal import RENEWAL_JITTER
from credo.spiffe_id import TrustDomain
from server.api.common import BundleSource
from server.ca.keymanager import MemoryKeyManager
from server.ca.manager import AuthorityManager, AuthorityManagerConfig
from server.datastore.sql import SqlDataStore
from server.identity import ServerIdentity

TD = TrustDomain("example.org")
TTL = 600


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[AuthorityManager]:
    store = SqlDataStore.open(f"sqlite:///{tmp_path / 'ds.sqlite3'}")
    manager = AuthorityManager(
        AuthorityManagerConfig(trust_domain=TD, ca_ttl=3600, x509_svid_ttl=TTL),
        store,
        MemoryKeyManager(),
    )
    manager.start()
    yield manager
    store.close()


@pytest.mark.parametrize(("draw", "factor"), [(0.0, 1 - RENEWAL_JITTER), (0.5, 1.0)])
def test_server_svid_renews_at_jittered_half_life_from_arrival(
    manager: AuthorityManager, draw: float, factor: float
) -> None:
    """Renewal is half the lifetime left when the SVID was made (not from its backdated
    NotBefore), moved by the shared +-10% jitter."""
    identity = ServerIdentity(
        manager,
        BundleSource(manager.datastore, TD),  # type: ignore[arg-type]
        key_type="ec-p256",
        dns_names=("localhost",),
        rng=lambda: draw,
    )
    before = time.time()
    assert identity.refresh()
    after = time.time()
    leaf = identity.certificate
    assert leaf is not None
    not_after = leaf.not_valid_after_utc.timestamp()
    assert leaf.not_valid_before_utc.timestamp() < before - 5  # backdated
    low = before + factor * (not_after - before) / 2
    high = after + factor * (not_after - after) / 2
    assert low <= identity.renew_at <= high


def test_server_svid_is_kept_until_renewal_is_due(manager: AuthorityManager) -> None:
    """A refresh before the renewal time keeps the SVID; a forced one re-signs it."""
    identity = ServerIdentity(
        manager,
        BundleSource(manager.datastore, TD),  # type: ignore[arg-type]
        key_type="ec-p256",
        dns_names=("localhost",),
    )
    assert identity.refresh()
    first = identity.certificate
    assert not identity.refresh()
    assert identity.certificate is first
    assert identity.refresh(force=True)
    assert identity.certificate is not first
