"""Fixtures: a real ``SqlDataStore`` on a temp SQLite file and on a fresh PostgreSQL schema.

Every test that takes ``store`` (or ``db_url``) runs once per backend. PostgreSQL tests
use ``CREDO_TEST_POSTGRES_URL`` (default ``postgresql://postgres@127.0.0.1:5432/test``),
create a uniquely named schema, point ``search_path`` at it and drop it afterwards;
they are skipped when that server cannot be reached.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest
from ds_helpers import FakeClock

from server.datastore import SqlDataStore

PG_URL = os.environ.get("CREDO_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture
def clock() -> FakeClock:
    """A controllable clock shared by the store under test."""
    return FakeClock()


def _pg_schema_url(schema: str) -> str:
    sep = "&" if "?" in PG_URL else "?"
    return f"{PG_URL}{sep}options={quote(f'-csearch_path={schema}')}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL for an empty database: a temp SQLite file, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'credo.db'}"
        return
    schema = f"credo_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(PG_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"postgres not reachable at {PG_URL}: {exc}")
    with admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
        try:
            yield _pg_schema_url(schema)
        finally:
            admin.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture
def store(db_url: str, clock: FakeClock) -> Iterator[SqlDataStore]:
    """An open, migrated store on each backend, closed after the test."""
    opened = SqlDataStore.open(db_url, clock=clock)
    try:
        yield opened
    finally:
        opened.close()
