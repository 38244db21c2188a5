"""Fixtures shared by the integration tests."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.processes import short_temp_dir


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the test files that hold a ``slow`` test first (stable otherwise).

    With ``./scripts/test`` (pytest-xdist, ``--dist loadfile``) files are handed to workers in
    this order, so the long ones start at once instead of being the last to finish. Every
    worker computes the same order from the same collection, as xdist requires.
    """
    slow_files = {item.path for item in items if item.get_closest_marker("slow") is not None}
    items.sort(key=lambda item: item.path not in slow_files)


@pytest.fixture
def root() -> Iterator[Path]:
    """A fresh short directory under /tmp for an agent's sockets and data; removed after."""
    path = short_temp_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)
