"""The agent's one client to the server, against real in-process gRPC servers over TLS:
the backoff policy, failover order, server verification, channel rebuilds on a new SVID,
error translation, and the typed answers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
from agent_fake_server import AGENT_ID, FakeAgentServer, attested_client, make_client

from credo._protocol import Refusal
from credo.keys import generate_private_key, make_csr
from node_agent.errors import (
    AgentBanned,
    AgentEvicted,
    AgentRemoved,
    ServerClientError,
    ServerRefused,
    ServerUnreachable,
)
from node_agent.server_client import Backoff, BackoffPolicy, ServerClient
from node_agent.sync.entries import RegistrationEntry, TrustBundles


def run(scenario: Callable[[], Awaitable[None]], timeout: float = 20.0) -> None:
    """Run an async scenario with a deadline."""

    async def bounded() -> None:
        await asyncio.wait_for(scenario(), timeout)

    asyncio.run(bounded())


@asynccontextmanager
async def servers(count: int, **settings: object) -> AsyncIterator[list[FakeAgentServer]]:
    """``count`` fake servers of one trust domain (one CA), sharing one call journal."""
    journal: list[str] = []
    fakes = [FakeAgentServer(name=chr(ord("a") + i), journal=journal) for i in range(count)]
    for fake in fakes[1:]:
        fake.authorities = fakes[0].authorities
    for fake in fakes:
        await fake.start(**settings)  # type: ignore[arg-type]
    try:
        yield fakes
    finally:
        for fake in fakes:
            await fake.stop()


# --- backoff -----------------------------------------------------------------------------


def test_backoff_grows_exponentially_with_jitter_and_is_capped() -> None:
    """Backoff delays double per failure within +-20% jitter, never exceed the cap, and reset."""
    backoff = Backoff(BackoffPolicy(initial=0.2, cap=30.0))
    delays = [backoff.next() for _ in range(12)]
    for attempt, delay in enumerate(delays[:7]):
        base = 0.2 * 2**attempt
        assert 0.8 * base <= delay <= 1.2 * base
    assert all(d <= 30.0 for d in delays)
    assert delays[-1] >= 0.8 * 30.0
    backoff.reset()
    assert backoff.next() <= 0.24


def test_backoff_jitter_reaches_both_bounds_and_never_the_cap_plus_jitter() -> None:
    """The lowest and highest draws give exactly -20% and +20%; at the cap, +20% is cut off."""
    low = Backoff(BackoffPolicy(initial=1.0, cap=10.0), rng=lambda: 0.0)
    high = Backoff(BackoffPolicy(initial=1.0, cap=10.0), rng=lambda: 1.0)
    assert [low.next() for _ in range(3)] == pytest.approx([0.8, 1.6, 3.2])
    assert [high.next() for _ in range(3)] == pytest.approx([1.2, 2.4, 4.8])
    for _ in range(10):
        assert high.next() <= 10.0


def test_every_retry_loop_gets_the_one_policy() -> None:
    """The client hands every retry loop a fresh backoff under its configured policy."""
    policy = BackoffPolicy(initial=0.5, cap=2.0)
    client = make_client("127.0.0.1:1", backoff=policy)
    first, second = client.backoff(), client.backoff()
    assert first is not second
    assert first.policy == second.policy == policy


# --- failover ----------------------------------------------------------------------------


def test_unary_calls_fail_over_in_order_and_stay_where_answered() -> None:
    """An unreachable server sends the call on to the next address, in the configured order
    and wrapping round; the server that answered stays current for the next call."""

    async def scenario() -> None:
        async with servers(3) as (a, b, c):
            journal = a.journal
            assert journal is not None
            client = attested_client(a, a.address, b.address, c.address)
            down = (grpc.StatusCode.UNAVAILABLE, "going away", None)
            a.refuse = b.refuse = down
            await client.fetch_bundle()
            assert journal == ["a", "b", "c"]
            assert client.address == c.address
            await client.fetch_bundle()
            assert journal == ["a", "b", "c", "c"]
            a.refuse, c.refuse = None, down
            await client.fetch_bundle()
            assert journal == ["a", "b", "c", "c", "c", "a"]
            assert client.address == a.address
            await client.close()

    run(scenario)


def test_no_server_answering_is_server_unreachable_after_one_round() -> None:
    """When every address is unreachable the call tries each once and raises
    ServerUnreachable, naming the last server tried."""

    async def scenario() -> None:
        async with servers(2) as (a, b):
            client = attested_client(a, a.address, b.address)
            a.refuse = b.refuse = (grpc.StatusCode.UNAVAILABLE, "going away", None)
            with pytest.raises(ServerUnreachable, match=f"server {b.address}: UNAVAILABLE"):
                await client.fetch_bundle()
            assert a.journal == ["a", "b"]
            await client.close()

    run(scenario)


def test_refusal_does_not_fail_over() -> None:
    """A server that answers with an error is not unreachable: the call is not retried
    elsewhere (another server of the same trust domain would answer the same)."""

    async def scenario() -> None:
        async with servers(2) as (a, b):
            client = attested_client(a, a.address, b.address)
            a.refuse = (grpc.StatusCode.INVALID_ARGUMENT, "bad request", None)
            with pytest.raises(ServerRefused):
                await client.fetch_bundle()
            assert a.journal == ["a"]
            assert client.address == a.address
            await client.close()

    run(scenario)


def test_sync_stream_moves_to_the_next_server_when_unreachable() -> None:
    """A sync stream that cannot be opened raises ServerUnreachable and the next attempt
    goes to the next address."""

    async def scenario() -> None:
        dead = FakeAgentServer()
        dead_address = await dead.start()
        await dead.stop()
        async with servers(1) as (live,):
            client = attested_client(live, dead_address, live.address)
            with pytest.raises(ServerUnreachable):
                async for _ in client.sync():
                    pass
            assert client.address == live.address
            async for message in client.sync():
                assert message.full
                break
            await client.close()

    run(scenario)


# --- server verification and channels ----------------------------------------------------


def test_server_with_another_spiffe_id_is_unreachable_and_never_called() -> None:
    """A server whose certificate chains to the bundle but is not credo/server is refused
    before any call reaches it."""

    async def scenario() -> None:
        server = FakeAgentServer(journal=[])
        server.server_spiffe_id = "spiffe://example.org/impostor"
        await server.start()
        client = attested_client(server)
        with pytest.raises(ServerUnreachable, match=r"expected spiffe://example\.org/credo/server"):
            await client.fetch_bundle()
        assert server.journal == []
        await client.close()
        await server.stop()

    run(scenario)


def test_channels_are_rebuilt_with_a_new_svid() -> None:
    """After set_credentials the next call presents the new agent SVID, and waiters on
    credentials_changed are woken."""

    async def scenario() -> None:
        async with servers(1, require_client_auth=True) as (server,):
            client = attested_client(server)
            await client.fetch_bundle()
            first = server.client_serials[-1]
            changed = client.credentials_changed()
            renewed = server.agent_svid()
            client.set_credentials(renewed, (server.authorities[0].cert,))
            assert changed.is_set()
            await client.fetch_bundle()
            assert server.client_serials[-1] == renewed.leaf.serial_number != first
            await client.close()

    run(scenario)


# --- error translation -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "message", "reason", "expected", "expected_reason"),
    [
        # The server's machine-readable reason decides.
        (grpc.StatusCode.PERMISSION_DENIED, "agent is banned", "banned", AgentBanned, None),
        (grpc.StatusCode.PERMISSION_DENIED, "gone", "evicted", AgentEvicted, None),
        (
            grpc.StatusCode.PERMISSION_DENIED,
            "the word banned in prose",
            "not_authorized",
            ServerRefused,
            Refusal.NOT_AUTHORIZED,
        ),
        (
            grpc.StatusCode.UNAUTHENTICATED,
            "agent SVID expired; attest again",
            "svid_expired",
            ServerRefused,
            Refusal.SVID_EXPIRED,
        ),
        (
            grpc.StatusCode.PERMISSION_DENIED,
            "agent SVID is not current",
            "svid_not_current",
            ServerRefused,
            Refusal.SVID_NOT_CURRENT,
        ),
        (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "too many signing calls",
            "rate_limited",
            ServerRefused,
            Refusal.RATE_LIMITED,
        ),
        # Servers from before credo-refusal: the words of the message (to be removed).
        (grpc.StatusCode.PERMISSION_DENIED, "agent is banned", None, AgentBanned, None),
        (
            grpc.StatusCode.PERMISSION_DENIED,
            "agent x is not attested (it may have been evicted); attest again",
            None,
            AgentEvicted,
            None,
        ),
        (
            grpc.StatusCode.INVALID_ARGUMENT,
            "banned word in a bad request",
            None,
            ServerRefused,
            None,
        ),
        (grpc.StatusCode.INTERNAL, "boom", None, ServerRefused, None),
        # Not an answer at all.
        (grpc.StatusCode.UNAVAILABLE, "going away", None, ServerUnreachable, None),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "slow", None, ServerUnreachable, None),
    ],
)
def test_rpc_errors_become_domain_errors(
    code: grpc.StatusCode,
    message: str,
    reason: str | None,
    expected: type[Exception],
    expected_reason: Refusal | None,
) -> None:
    """Each status and credo-refusal reason becomes its domain error; a ban or eviction
    forgets the stored agent SVID first, nothing else does."""

    async def scenario() -> None:
        forgotten: list[bool] = []
        async with servers(1) as (server,):
            client = attested_client(server, forget_agent_svid=lambda: forgotten.append(True))
            server.refuse = (code, message, reason)
            with pytest.raises(expected) as info:
                await client.fetch_bundle()
            error = info.value
            if isinstance(error, ServerRefused):
                assert (error.code, error.message, error.reason) == (
                    code.name,
                    message,
                    expected_reason,
                )
                assert error.server == server.address
                assert error.retryable == (code == grpc.StatusCode.RESOURCE_EXHAUSTED)
            if isinstance(error, AgentRemoved):
                assert error.agent_id == str(AGENT_ID)
                assert forgotten == [True]
            else:
                assert forgotten == []
            await client.close()

    run(scenario)


def test_a_ban_is_not_a_retryable_client_error() -> None:
    """Retry loops catch ServerClientError; a ban must never be caught there."""
    assert not issubclass(AgentBanned, ServerClientError)
    assert not issubclass(AgentEvicted, ServerClientError)
    assert issubclass(ServerRefused, ServerClientError)
    assert issubclass(ServerUnreachable, ServerClientError)


def test_ban_ends_an_open_sync_stream_with_agent_banned() -> None:
    """A stream refused with credo-refusal: banned raises AgentBanned from the iterator."""

    async def scenario() -> None:
        forgotten: list[bool] = []
        async with servers(1) as (server,):
            client = attested_client(server, forget_agent_svid=lambda: forgotten.append(True))
            server.refuse = (grpc.StatusCode.PERMISSION_DENIED, "agent is banned", "banned")
            with pytest.raises(AgentBanned, match="was banned by the server"):
                async for _ in client.sync():
                    pass
            assert forgotten == [True]
            await client.close()

    run(scenario)


def test_refused_attestation_is_server_refused_even_when_banned() -> None:
    """Attestation has no agent SVID to forget: a refusal, even 'banned', is ServerRefused."""

    async def scenario() -> None:
        forgotten: list[bool] = []
        async with servers(1) as (server,):
            client = make_client(server.address, forget_agent_svid=lambda: forgotten.append(True))
            server.refuse = (grpc.StatusCode.PERMISSION_DENIED, "agent is banned", "banned")
            with pytest.raises(ServerRefused) as info:
                await client.attest(
                    "join_token", b"tok", generate_private_key(), (server.authorities[0].cert,)
                )
            assert info.value.reason is Refusal.BANNED
            assert forgotten == []
            await client.close()

    run(scenario)


# --- typed answers -----------------------------------------------------------------------


def test_typed_methods_answer_in_model_types(tmp_path: Path) -> None:
    """Bundle, JWT-SVID, X509-SVID batch, renewal and sync come back as Credo's model
    types, with per-CSR refusals kept apart from issued chains."""

    async def scenario() -> None:
        async with servers(1) as (server,):
            entry_id = server.create_entry("spiffe://example.org/web", ["unix:uid:1000"])
            client = attested_client(server)
            bundles = await client.fetch_bundle()
            assert isinstance(bundles, TrustBundles)
            assert list(bundles.bundle.x509_authorities) == [server.authorities[0].cert]
            assert set(bundles.bundle.jwt_authorities) == {"jwt-1"}

            jwt = await client.new_jwt_svid(entry_id, ["db"])
            assert jwt.token.count(".") == 2
            assert jwt.expires_at - jwt.issued_at == pytest.approx(server.jwt_ttl, abs=1)

            key = generate_private_key()
            results = await client.batch_new_x509_svid(
                [(entry_id, make_csr(key)), ("no-such-entry", make_csr(key))]
            )
            by_id = {r.entry_id: r for r in results}
            assert by_id[entry_id].refusal == "" and len(by_id[entry_id].chain) == 1
            assert by_id["no-such-entry"].refusal == "NOT_FOUND: no such entry"
            assert by_id["no-such-entry"].chain == ()

            renewed = await client.renew(generate_private_key())
            assert renewed.spiffe_id == AGENT_ID

            async for message in client.sync():
                assert message.full
                assert [type(e) for e in message.entries] == [RegistrationEntry]
                assert message.entries[0].id == entry_id
                assert message.bundle is not None
                break
            await client.close()

    run(scenario)


def test_a_client_without_addresses_is_refused() -> None:
    """A client needs at least one server address."""
    with pytest.raises(ValueError, match="at least one server address"):
        make_client()


def test_calls_before_credentials_are_a_programming_error() -> None:
    """Before attestation installs an SVID, an mTLS call is a bug, not a network failure."""

    async def scenario() -> None:
        client: ServerClient = make_client("127.0.0.1:1")
        with pytest.raises(RuntimeError, match="no agent SVID"):
            await client.fetch_bundle()

    run(scenario)
