"""Security review of the node agent: regressions for the issues found (see each test)."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest

from credo.spiffe_id import SpiffeId, TrustDomain
from node_agent.cache.manager import CacheConfig, CacheManager
from node_agent.server_client import Backoff, BackoffPolicy, IssuedJwtSvid, X509SvidResult
from node_agent.workload import peer as peer_module
from node_agent.workload.errors import PeerChanged
from node_agent.workload.peer import PeerCredentials, PeerProcess
from node_agent.workload.tracker import PeerTrackingProxy
from node_agent.workload_api.manager import Identity
from node_agent.workload_api.server import WorkloadApiServer, WorkloadApiServerConfig

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")


def _start(socket_path: str) -> None:
    """Start (and at once stop) a Workload API server on ``socket_path``."""
    server = WorkloadApiServer(
        WorkloadApiServerConfig(socket_path=socket_path),
        None,  # type: ignore[arg-type]  # never called: the start is refused
        None,  # type: ignore[arg-type]
    )

    async def go() -> None:
        try:
            await server.start()
        finally:
            await server.stop(0)

    asyncio.run(go())


@pytest.fixture
def short_dir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="credo-sr-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


# --- setgid exec between connect() and accept() ------------------------------------------


def test_capture_refuses_effective_gid_other_than_peercred() -> None:
    """A caller whose effective gid is not the one SO_PEERCRED recorded is refused.

    A process that connects and then execs a setgid binary before the agent accepts keeps
    its uid but runs with the binary's gid: its selectors (unix:gid, unix:path, ...) are not
    the caller's.
    """
    creds = PeerCredentials(os.getpid(), os.geteuid(), os.getegid() + 1)
    with pytest.raises(PeerChanged, match="gid"):
        PeerProcess.capture(creds)


def test_ensure_same_process_detects_gid_change(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pinned process whose effective gid changed after connecting is refused."""
    peer = PeerProcess.capture(PeerCredentials(os.getpid(), os.geteuid(), os.getegid()))
    try:
        peer.ensure_same_process()
        monkeypatch.setattr(
            peer_module,
            "read_effective_ids",
            lambda pid: (os.geteuid(), os.getegid() + 1),
        )
        with pytest.raises(PeerChanged, match="gid"):
            peer.ensure_same_process()
    finally:
        peer.close()


# --- JWT-SVID cache keyed by workload-chosen audiences -----------------------------------


class _Client:
    """The server client as the cache sees it: signs any JWT-SVID asked for."""

    def __init__(self) -> None:
        self.calls = 0

    @property
    def agent_id(self) -> SpiffeId:
        return SpiffeId.parse("spiffe://example.org/credo/agent/join_token/x")

    def backoff(self) -> Backoff:
        return Backoff(BackoffPolicy())

    async def batch_new_x509_svid(self, csrs: Any) -> list[X509SvidResult]:
        raise AssertionError("not used")

    async def new_jwt_svid(self, entry_id: str, audience: Any) -> IssuedJwtSvid:
        self.calls += 1
        now = time.time()
        return IssuedJwtSvid(f"token-{self.calls}", int(now), int(now) + 300)


def test_jwt_cache_is_bounded_for_attacker_chosen_audiences() -> None:
    """A workload asking for many distinct audiences cannot grow the agent's memory."""

    async def scenario() -> None:
        client = _Client()
        cache = CacheManager(
            CacheConfig(trust_domain=TrustDomain("example.org"), jwt_cache_max_size=10), client
        )
        identity = Identity(
            "entry-1",
            SpiffeId.parse("spiffe://example.org/web"),
            None,  # type: ignore[arg-type]  # not used for JWT-SVIDs
        )
        for i in range(100):
            await cache.fetch_jwt_svid(identity, (f"aud-{i}",))
        assert len(cache.jwt_svids) <= 10
        assert cache.jwt_svids.in_flight == 0
        # The most recent ones are still served from the cache.
        calls = client.calls
        await cache.fetch_jwt_svid(identity, ("aud-99",))
        assert client.calls == calls

    asyncio.run(scenario())


# --- socket directories another local user controls --------------------------------------


@needs_root
def test_public_socket_directory_owned_by_another_user_is_refused(short_dir: str) -> None:
    """A pre-created socket directory owned by another user is not used.

    Its owner could swap api.sock for their own socket and serve workloads forged bundles.
    """
    public = os.path.join(short_dir, "public")
    os.mkdir(public, 0o755)
    os.chown(public, 4242, 4242)
    with pytest.raises(PermissionError, match="owned by uid 4242"):
        _start(os.path.join(public, "api.sock"))


@needs_root
def test_public_socket_parent_owned_by_another_user_is_refused(short_dir: str) -> None:
    """An ancestor (like /tmp/credo-agent) owned by another user is refused too."""
    parent = os.path.join(short_dir, "credo-agent")
    os.mkdir(parent, 0o755)
    os.chown(parent, 4242, 4242)
    with pytest.raises(PermissionError, match="owned by uid 4242"):
        _start(os.path.join(parent, "public", "api.sock"))


def test_public_socket_parent_writable_by_others_is_refused(short_dir: str) -> None:
    """An ancestor anyone may write to (and not sticky) is refused."""
    parent = os.path.join(short_dir, "shared")
    os.mkdir(parent)
    os.chmod(parent, 0o777)
    with pytest.raises(PermissionError, match="writable by other users"):
        _start(os.path.join(parent, "public", "api.sock"))


@needs_root
def test_private_relay_directory_owned_by_another_user_is_refused(short_dir: str) -> None:
    """The relay's private directory must belong to the agent (nobody else may bind there)."""
    private = os.path.join(short_dir, "private")
    os.mkdir(private, 0o700)
    os.chown(private, 4242, 4242)
    with pytest.raises(PermissionError):
        PeerTrackingProxy(os.path.join(short_dir, "api.sock"), private)
