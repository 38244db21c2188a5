"""Fixtures shared by the integration tests."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.processes import short_temp_dir


@pytest.fixture
def root() -> Iterator[Path]:
    """A fresh short directory under /tmp for an agent's sockets and data; removed after."""
    path = short_temp_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)
