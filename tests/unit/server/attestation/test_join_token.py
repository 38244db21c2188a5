"""The join_token node attestor: single use, expiry, and the agent ID it gives."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import pytest

from credo.spiffe_id import SpiffeId, TrustDomain
from server.attestation import AttestationError
from server.attestation.join_token import JoinTokenAttestor
from server.datastore.models import JoinToken
from server.datastore.sql import SqlDataStore
from tests.helpers.server import InProcessServer

TD = TrustDomain("example.org")


@pytest.fixture
def store(tmp_path: Path) -> SqlDataStore:
    return SqlDataStore.open(f"sqlite:///{tmp_path / 'ds.sqlite3'}")


def test_token_gives_agent_id_and_is_single_use(store: SqlDataStore) -> None:
    """A valid token names the agent .../credo/agent/join_token/<token> and works only once."""
    store.create_join_token(JoinToken("tok-1", int(time.time()) + 60, "spiffe://example.org/alias"))
    attestor = JoinTokenAttestor(store, TD)
    result = attestor.attest(b"tok-1")
    assert result.agent_id == SpiffeId.parse("spiffe://example.org/credo/agent/join_token/tok-1")
    assert result.selectors == [] and not result.can_reattest
    assert result.alias_id == SpiffeId.parse("spiffe://example.org/alias")
    with pytest.raises(AttestationError, match="does not exist or has already been used"):
        attestor.attest(b"tok-1")


def test_expired_token_is_consumed_and_refused(store: SqlDataStore) -> None:
    """An expired token is refused as expired, and is gone afterwards."""
    now = 1_000_000.0
    store.create_join_token(JoinToken("old", int(now) - 1))
    attestor = JoinTokenAttestor(store, TD, clock=lambda: now)
    with pytest.raises(AttestationError, match="join token expired"):
        attestor.attest(b"old")
    assert store.fetch_join_token("old") is None


@pytest.mark.parametrize("payload", [b"", b"\xff\xfe", b"a/b"])
def test_malformed_payload_is_refused(store: SqlDataStore, payload: bytes) -> None:
    """Empty, non-UTF-8 or path-breaking payloads are refused, never crash."""
    with pytest.raises(AttestationError):
        JoinTokenAttestor(store, TD).attest(payload)


def test_race_of_two_attestations_with_one_token(server: InProcessServer) -> None:
    """Two agents attesting concurrently with one token: exactly one succeeds."""
    token = server.create_join_token()
    server.bootstrap_channel()  # warm up the admin bundle fetch outside the race
    barrier = threading.Barrier(2)
    outcomes: list[object] = []

    def attempt() -> None:
        barrier.wait()
        try:
            outcomes.append(server.attest(token))
        except grpc.RpcError as err:
            outcomes.append(err.code())

    threads = [threading.Thread(target=attempt) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    codes = [o for o in outcomes if isinstance(o, grpc.StatusCode)]
    assert len(outcomes) == 2
    assert codes == [grpc.StatusCode.PERMISSION_DENIED]


def test_expired_token_is_refused_by_the_server(server: InProcessServer) -> None:
    """A token used after its TTL is PERMISSION_DENIED 'join token expired', then unknown."""
    token = server.create_join_token(ttl=1)
    time.sleep(1.1)
    with pytest.raises(grpc.RpcError) as err:
        server.attest(token)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.value.details() == "join token expired; generate a new one"
    with pytest.raises(grpc.RpcError) as again:
        server.attest(token)
    assert again.value.details() == "join token does not exist or has already been used"
