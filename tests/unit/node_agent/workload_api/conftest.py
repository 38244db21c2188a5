"""Fixtures: a real Workload API server on a Unix socket, backed by the fake manager."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# Load fakes.py under a unique name so it cannot clash with another package's fakes.py.
_spec = importlib.util.spec_from_file_location(
    "workload_api_fakes", Path(__file__).with_name("fakes.py")
)
assert _spec is not None and _spec.loader is not None
fakes = importlib.util.module_from_spec(_spec)
sys.modules["workload_api_fakes"] = fakes
_spec.loader.exec_module(fakes)

from node_agent.workload.unix import UnixAttestor, UnixAttestorConfig  # noqa: E402
from node_agent.workload_api.server import (  # noqa: E402
    WorkloadApiServer,
    WorkloadApiServerConfig,
)

Api = fakes.Api
TRUST_DOMAIN = "example.org"


@pytest.fixture
def short_dir() -> Iterator[str]:
    """A short temp directory (Unix socket paths are limited to 107 bytes)."""
    d = tempfile.mkdtemp(prefix="credo-t-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def api(short_dir: str) -> Iterator[Api]:
    """A Workload API server whose fake manager has no entries yet."""
    loop = fakes.LoopThread()
    manager = fakes.FakeManager(fakes.FakeCa(TRUST_DOMAIN), [fakes.FakeCa("partner.org")])
    socket_path = os.path.join(short_dir, "public", "api.sock")
    server = WorkloadApiServer(
        WorkloadApiServerConfig(socket_path=socket_path),
        manager,
        UnixAttestor(UnixAttestorConfig(discover_workload_path=False)),
    )
    loop.run(server.start())
    try:
        yield Api(socket_path, manager, loop, server)
    finally:
        loop.run(server.stop(0))
        loop.close()
