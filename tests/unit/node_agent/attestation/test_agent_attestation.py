"""Node attestation, the stored agent SVID, renewal and bans, against a fake TLS server."""

from __future__ import annotations

import asyncio
import socket
import stat
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from agent_fake_server import FakeAgentServer, make_authority, make_client
from cryptography.hazmat.primitives import serialization

from credo._renewal import RENEWAL_JITTER
from credo.keys import generate_private_key
from credo.spiffe_id import TrustDomain
from credo.x509svid import X509Svid
from node_agent.attestation.errors import AttestationRejected, NoAgentCredentials
from node_agent.attestation.join_token import JoinTokenAttestor, JoinTokenConfig
from node_agent.attestation.session import AgentSession, SessionConfig
from node_agent.attestation.store import SvidStore
from node_agent.errors import AgentBanned, ServerUnreachable

TD = TrustDomain.parse("example.org")


def run(scenario: Callable[[], Awaitable[None]], timeout: float = 20.0) -> None:
    """Run an async scenario with a deadline."""

    async def bounded() -> None:
        await asyncio.wait_for(scenario(), timeout)

    asyncio.run(bounded())


def _bundle_file(server: FakeAgentServer, tmp_path: Path) -> Path:
    path = tmp_path / "bootstrap.pem"
    path.write_bytes(server.authorities[0].cert.public_bytes(serialization.Encoding.PEM))
    return path


def _session(
    address: str, tmp_path: Path, join_token: str | None = None, **settings: object
) -> AgentSession:
    """A session as the agent builds it: real store, real server client, join-token attestor."""
    store = SvidStore(tmp_path / "data")
    config = SessionConfig(
        trust_domain=TD,
        **{"attest_retry_timeout": 0.3, **settings},  # type: ignore[arg-type]
    )
    client = make_client(address, forget_agent_svid=store.delete)
    return AgentSession(config, client, JoinTokenAttestor(JoinTokenConfig(), join_token), store)


def test_attests_with_join_token_and_stores_svid_0600(tmp_path: Path) -> None:
    """Attesting with a join token stores the agent SVID, a 0600 key and the bundle."""

    async def scenario() -> None:
        server = FakeAgentServer()
        server.join_tokens.add("tok-1")
        address = await server.start(tls=True)
        session = _session(
            address, tmp_path, trust_bundle=_bundle_file(server, tmp_path), join_token="tok-1"
        )
        await session.start()
        assert str(session.agent_id) == "spiffe://example.org/credo/agent/join_token/tok-1"
        store = SvidStore(tmp_path / "data")
        assert stat.S_IMODE(store.key_path.stat().st_mode) == 0o600
        assert stat.S_IMODE(store.svid_path.stat().st_mode) == 0o600
        stored = store.load()
        assert stored is not None and stored.svid.spiffe_id == session.agent_id
        assert stored.authorities == (server.authorities[0].cert,)
        await session.client.close()
        await server.stop()

    run(scenario)


def test_restart_resumes_with_stored_svid_without_token(tmp_path: Path) -> None:
    """A second session with no join token resumes with the stored SVID and does not attest."""

    async def scenario() -> None:
        server = FakeAgentServer()
        server.join_tokens.add("tok-2")
        address = await server.start(tls=True)
        bundle = _bundle_file(server, tmp_path)
        first = _session(address, tmp_path, trust_bundle=bundle, join_token="tok-2")
        await first.start()
        await first.client.close()
        again = _session(address, tmp_path, trust_bundle=bundle)
        await again.start()
        assert again.agent_id == first.agent_id
        assert server.attest_calls == 1
        await again.client.close()
        await server.stop()

    run(scenario)


def test_no_stored_svid_and_no_token_is_a_clear_error(tmp_path: Path) -> None:
    """Without a stored SVID or a join token, start() says exactly that."""

    async def scenario() -> None:
        session = _session("127.0.0.1:1", tmp_path)
        with pytest.raises(NoAgentCredentials, match="no stored agent SVID and no join token"):
            await session.start()

    run(scenario)


def test_refused_join_token_is_attestation_rejected(tmp_path: Path) -> None:
    """A join token the server does not know is reported as a refused attestation."""

    async def scenario() -> None:
        server = FakeAgentServer()
        address = await server.start(tls=True)
        session = _session(
            address, tmp_path, trust_bundle=_bundle_file(server, tmp_path), join_token="nope"
        )
        with pytest.raises(AttestationRejected, match="unknown or used"):
            await session.start()
        await server.stop()

    run(scenario)


def test_server_with_wrong_spiffe_id_is_not_trusted(tmp_path: Path) -> None:
    """A server whose certificate chains to the bundle but is not credo/server is refused."""

    async def scenario() -> None:
        server = FakeAgentServer()
        server.server_spiffe_id = "spiffe://example.org/impostor"
        server.join_tokens.add("tok-3")
        address = await server.start(tls=True)
        session = _session(
            address, tmp_path, trust_bundle=_bundle_file(server, tmp_path), join_token="tok-3"
        )
        with pytest.raises(ServerUnreachable, match=r"expected spiffe://example\.org/credo/server"):
            await session.start()
        assert server.attest_calls == 0
        await server.stop()

    run(scenario)


def test_server_certificate_without_the_reserved_name_is_not_trusted(tmp_path: Path) -> None:
    """A certificate from our CA that names only ``localhost`` (as a workload SVID may) is refused.

    Agents check the server against ``server.credo.invalid``, a name the server never puts
    in a workload SVID, so a workload holding a ``localhost`` SVID cannot pose as the server.
    """

    async def scenario() -> None:
        server = FakeAgentServer()
        server.server_dns_names = ("localhost",)
        server.join_tokens.add("tok-4")
        address = await server.start(tls=True)
        session = _session(
            address, tmp_path, trust_bundle=_bundle_file(server, tmp_path), join_token="tok-4"
        )
        with pytest.raises(ServerUnreachable):
            await session.start()
        assert server.attest_calls == 0
        await server.stop()

    run(scenario)


def test_insecure_bootstrap_attests_without_bundle(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With insecure_bootstrap and no bundle the agent attests, warning loudly."""

    async def scenario() -> None:
        server = FakeAgentServer()
        server.join_tokens.add("tok-4")
        address = await server.start(tls=True)
        session = _session(address, tmp_path, insecure_bootstrap=True, join_token="tok-4")
        await session.start()
        assert session.authorities == (server.authorities[0].cert,)
        await session.client.close()
        await server.stop()

    run(scenario)
    assert "INSECURE BOOTSTRAP" in caplog.text


def test_renewal_uses_a_new_key_and_stores_it(tmp_path: Path) -> None:
    """Renewing the agent SVID stores a new certificate for a new key."""

    async def scenario() -> None:
        server = FakeAgentServer()
        server.join_tokens.add("tok-5")
        address = await server.start(tls=True)
        session = _session(
            address, tmp_path, trust_bundle=_bundle_file(server, tmp_path), join_token="tok-5"
        )
        await session.start()
        before = session.svid
        asked = time.time()
        await session.renew()
        answered = time.time()
        after = session.svid
        assert server.renew_calls == 1
        assert after.leaf.serial_number != before.leaf.serial_number
        assert after.marshal_key_der() != before.marshal_key_der()
        stored = SvidStore(tmp_path / "data").load()
        assert stored is not None and stored.svid.leaf == after.leaf
        not_before = after.leaf.not_valid_before_utc.timestamp()
        end = after.leaf.not_valid_after_utc.timestamp()
        # Half-life +-10%, like every SVID, counted from when the SVID arrived (some time
        # between `asked` and `answered`): bound renew_at for both extremes.
        earliest, latest = max(not_before, asked), max(not_before, answered)
        low = earliest + (end - earliest) / 2 * (1 - RENEWAL_JITTER)
        high = latest + (end - latest) / 2 * (1 + RENEWAL_JITTER)
        assert low <= session.renew_at() <= high
        await session.client.close()
        await server.stop()

    run(scenario)


def test_ban_deletes_stored_svid_and_raises(tmp_path: Path) -> None:
    """When the server says the agent is banned, the stored SVID and key are deleted."""

    async def scenario() -> None:
        server = FakeAgentServer()
        server.join_tokens.add("tok-6")
        address = await server.start(tls=True)
        session = _session(
            address, tmp_path, trust_bundle=_bundle_file(server, tmp_path), join_token="tok-6"
        )
        await session.start()
        server.banned = True
        with pytest.raises(AgentBanned, match="was banned by the server; its SVID was deleted"):
            await session.renew()
        store = SvidStore(tmp_path / "data")
        assert not store.svid_path.exists()
        assert not store.key_path.exists()
        await session.client.close()
        await server.stop()

    run(scenario)


def test_store_ignores_mismatched_or_partial_files(tmp_path: Path) -> None:
    """The store loads nothing when a file is missing or the key does not match the chain."""
    store = SvidStore(tmp_path)
    assert store.load() is None
    (tmp_path / "agent_svid.pem").write_bytes(b"garbage")
    (tmp_path / "agent_key.pem").write_bytes(
        generate_private_key().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (tmp_path / "bundle.pem").write_bytes(b"")
    assert store.load() is None
    assert not isinstance(store.load(), X509Svid)


class _AttestsAgain:
    """A node attestor whose data may be sent more than once (as k8s_psat's will be)."""

    type = "join_token"
    can_reattest = True

    def __init__(self, *tokens: str) -> None:
        self._tokens = list(tokens)

    async def payload(self) -> bytes:
        return self._tokens.pop(0).encode()


def test_attestor_that_may_attest_again_renews_by_attesting(tmp_path: Path) -> None:
    """With a node attestor that may attest again, renewal attests again for a new key
    (SPIRE's re-attestation) instead of calling RenewAgent; the new SVID is stored."""

    async def scenario() -> None:
        server = FakeAgentServer()
        server.join_tokens.update({"first", "second"})
        address = await server.start(tls=True)
        store = SvidStore(tmp_path / "data")
        session = AgentSession(
            SessionConfig(trust_domain=TD, trust_bundle=_bundle_file(server, tmp_path)),
            make_client(address, forget_agent_svid=store.delete),
            _AttestsAgain("first", "second"),
            store,
        )
        await session.start()
        before = session.svid
        await session.renew()
        assert (server.attest_calls, server.renew_calls) == (2, 0)
        assert session.svid.marshal_key_der() != before.marshal_key_der()
        stored = store.load()
        assert stored is not None and stored.svid.leaf == session.svid.leaf
        await session.client.close()
        await server.stop()

    run(scenario)


def test_a_port_nobody_listens_on_is_one_warning_then_a_clear_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Attesting to a closed port logs one warning naming the servers, the reason and how
    long it keeps trying (retries at debug), then fails saying no server answered."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"  # bound, never listening
        session = _session(
            address,
            tmp_path,
            join_token="tok-closed",
            trust_bundle=_bundle_file(FakeAgentServer(), tmp_path),
            attest_retry_timeout=1.0,
        )
        caplog.set_level("DEBUG", logger="node_agent.attestation.session")

        async def scenario() -> None:
            with pytest.raises(ServerUnreachable) as info:
                await session.start()
            assert str(info.value) == (
                f"node attestation failed: no server answered for 1s (cannot reach server "
                f"{address}: connection refused (nothing listens on that port))"
            )

        run(scenario)
    tries = [
        r for r in caplog.records if r.getMessage() == "cannot attest to the server yet; retrying"
    ]
    assert len(tries) >= 2
    assert [r.levelname for r in tries] == ["WARNING"] + ["DEBUG"] * (len(tries) - 1)
    first = tries[0].__dict__
    assert first["servers"] == address and "connection refused" in first["error"]
    assert 0 <= first["retrying_for_s"] <= 1
    assert "Errno" not in caplog.text


def test_a_bootstrap_bundle_without_the_servers_current_ca_says_how_to_refresh_it(
    tmp_path: Path,
) -> None:
    """A bootstrap bundle holding only a CA the server no longer uses fails at once, saying
    the bundle lacks the server's current CA and how to refresh it."""

    async def scenario() -> None:
        server = FakeAgentServer()
        server.join_tokens.add("tok-stale")
        address = await server.start(tls=True)
        stale = tmp_path / "stale.pem"
        stale.write_bytes(make_authority().cert.public_bytes(serialization.Encoding.PEM))
        session = _session(address, tmp_path, trust_bundle=stale, join_token="tok-stale")
        started = time.monotonic()
        with pytest.raises(NoAgentCredentials) as info:
            await session.start()
        assert time.monotonic() - started < 0.3  # not retried: the retry window is 0.3 s
        message = str(info.value)
        assert message.startswith(
            f"the bootstrap trust bundle {stale} does not contain the server's current CA"
        )
        assert f"'credo-server bundle show --format pem > {stale}'" in message
        assert server.attest_calls == 0
        await server.stop()

    run(scenario)
