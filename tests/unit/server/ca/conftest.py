"""Fixtures for the CA tests: a real SQLite datastore, a disk key manager, a fake clock."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from ca_testkit import TD, FakeClock, MakeManager

from server.ca.keymanager import DiskKeyManager
from server.ca.manager import AuthorityManager, AuthorityManagerConfig
from server.datastore.sql import SqlDataStore


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'datastore.sqlite3'}"


@pytest.fixture
def datastore(db_url: str, clock: FakeClock) -> Iterator[SqlDataStore]:
    store = SqlDataStore.open(db_url, clock=clock.unix)
    yield store
    store.close()


@pytest.fixture
def key_dir(tmp_path: Path) -> Path:
    return tmp_path / "keys"


@pytest.fixture
def make_manager(datastore: SqlDataStore, key_dir: Path, clock: FakeClock) -> MakeManager:
    """Build (not start) a manager on the shared datastore and key directory."""

    def make(**overrides: object) -> AuthorityManager:
        settings: dict[str, object] = {"trust_domain": TD, "ca_ttl": 600, "x509_svid_ttl": 60}
        settings.update(overrides)
        config = AuthorityManagerConfig(**settings)  # type: ignore[arg-type]
        return AuthorityManager(config, datastore, DiskKeyManager(key_dir), clock=clock)

    return make
