"""The agent's WIT-SVID cache: one batch per fetch, renewal at half-life, offline, drops."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.serialization import load_der_public_key

from credo import SpiffeId, generate_private_key, sign_wit_svid
from credo.witsvid import WitSvid, private_key_from_jwk, public_key_jwk
from node_agent.cache.errors import WitSvidUnavailable
from node_agent.cache.wit import WitSvidCache
from node_agent.errors import ServerUnreachable
from node_agent.server_client import IssuedWitSvid
from node_agent.workload_api.manager import Identity

ISSUER = generate_private_key()
TTL = 100.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


class FakeServer:
    """Signs real WIT-SVIDs with one key; ``down`` makes calls fail as unreachable."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.calls: list[list[str]] = []
        self.down = False
        self.kid = "wit-1"
        self.refuse: set[str] = set()

    async def sign(self, keys: Sequence[tuple[str, bytes]]) -> list[IssuedWitSvid]:
        self.calls.append([e for e, _ in keys])
        if self.down:
            raise ServerUnreachable("no server answered")
        now = datetime.fromtimestamp(self.clock(), UTC)
        out = []
        for entry_id, der in keys:
            if entry_id in self.refuse:
                out.append(IssuedWitSvid(entry_id, refusal="PERMISSION_DENIED: not authorized"))
                continue
            token = sign_wit_svid(
                SpiffeId.parse(f"spiffe://example.org/{entry_id}"),
                load_der_public_key(der),  # type: ignore[arg-type]
                key=ISSUER,
                key_id=self.kid,
                ttl=timedelta(seconds=TTL),
                now=now,
            )
            out.append(IssuedWitSvid(entry_id, token, self.clock(), self.clock() + TTL))
        return out


def _identity(name: str) -> Identity:
    return Identity(name, SpiffeId.parse(f"spiffe://example.org/{name}"), None, "")  # type: ignore[arg-type]


@pytest.fixture
def setup() -> tuple[Clock, FakeServer, WitSvidCache]:
    clock = Clock()
    server = FakeServer(clock)
    return clock, server, WitSvidCache(server.sign, clock=clock)


def test_one_batch_for_all_identities_and_key_matches_cnf(setup) -> None:  # type: ignore[no-untyped-def]
    """Two identities cost one server call; each private key is the one its WIT binds."""
    _clock, server, cache = setup
    wits = asyncio.run(cache.get((_identity("a"), _identity("b"))))
    assert server.calls == [["a", "b"]]
    for wit in wits:
        parsed = WitSvid.parse_insecure(wit.token)
        key = private_key_from_jwk(wit.private_key_jwk)
        assert public_key_jwk(key) == public_key_jwk(parsed.public_key)
    assert wits[0].private_key_jwk != wits[1].private_key_jwk


def test_reused_until_half_life_then_renewed(setup) -> None:  # type: ignore[no-untyped-def]
    """A WIT is served from the cache until its renewal time (about half-life), then renewed."""
    clock, server, cache = setup
    first = asyncio.run(cache.get((_identity("a"),)))[0]
    assert 0.4 * TTL <= first.refresh_at - clock.now <= 0.6 * TTL
    clock.now += 0.3 * TTL
    assert asyncio.run(cache.get((_identity("a"),)))[0].token == first.token
    clock.now = first.refresh_at + 1
    renewed = asyncio.run(cache.get((_identity("a"),)))[0]
    assert renewed.token != first.token and len(server.calls) == 2


def test_served_while_server_unreachable_then_unavailable(setup) -> None:  # type: ignore[no-untyped-def]
    """With the server down a cached WIT is served until shortly before expiry, then the
    fetch fails with WitSvidUnavailable; retries are spaced, not on every call."""
    clock, server, cache = setup
    first = asyncio.run(cache.get((_identity("a"),)))[0]
    server.down = True
    clock.now = first.refresh_at + 1
    again = asyncio.run(cache.get((_identity("a"),)))[0]
    assert again.token == first.token and again.refresh_at > clock.now
    clock.now += TTL
    with pytest.raises(WitSvidUnavailable, match="unreachable"):
        asyncio.run(cache.get((_identity("a"),)))


def test_refused_identity_left_out(setup) -> None:  # type: ignore[no-untyped-def]
    """An identity the server refuses gets no WIT; the others do; all refused is an error."""
    _clock, server, cache = setup
    server.refuse = {"b"}
    wits = asyncio.run(cache.get((_identity("a"), _identity("b"))))
    assert [str(w.identity.spiffe_id) for w in wits] == ["spiffe://example.org/a"]
    with pytest.raises(WitSvidUnavailable, match="not authorized"):
        asyncio.run(cache.get((_identity("b"),)))


def test_tainted_revoked_and_deleted_are_dropped(setup) -> None:  # type: ignore[no-untyped-def]
    """A WIT of a tainted or removed key, or of a deleted entry, is dropped at once."""
    _clock, _server, cache = setup
    asyncio.run(cache.get((_identity("a"), _identity("b"))))
    cache.drop_untrusted({"wit-1"}, set())
    assert len(cache) == 2
    cache.drop_untrusted({"wit-1"}, {"wit-1"})
    assert len(cache) == 0
    asyncio.run(cache.get((_identity("a"), _identity("b"))))
    cache.retain({"a"})
    assert "a" in cache and "b" not in cache
    cache.drop_untrusted({"wit-2"}, set())
    assert len(cache) == 0
