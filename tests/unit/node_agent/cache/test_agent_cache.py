"""The SVID cache against a fake signing server (a real in-process gRPC Agent service)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from agent_fake_server import (
    AGENT_ID,
    FakeAgentServer,
    RunningAgent,
    attested_client,
    make_authority,
    wait_until,
)

from credo.selector import Selector
from node_agent.cache.manager import MAX_BATCH
from node_agent.errors import AgentBanned
from node_agent.server_client import ServerClient

UID = frozenset({Selector("unix", "uid:1000"), Selector("unix", "gid:1000")})


def run(scenario: Callable[[], Awaitable[None]], timeout: float = 30.0) -> None:
    """Run an async scenario with a deadline."""

    async def bounded() -> None:
        await asyncio.wait_for(scenario(), timeout)

    asyncio.run(bounded())


async def _started(**server_settings: Any) -> tuple[FakeAgentServer, ServerClient]:
    server = FakeAgentServer(**server_settings)
    await server.start()
    return server, attested_client(server)


def test_csrs_are_sent_in_batches_of_at_most_500() -> None:
    """1,200 entries are signed in three BatchNewX509SVID calls of at most 500 CSRs each."""

    async def scenario() -> None:
        server, client = await _started()
        for i in range(1200):
            server.create_entry(f"spiffe://example.org/w/{i}", [f"unix:uid:{i}"], push=False)
        async with RunningAgent(server, client, max_size=2000) as agent:
            await wait_until(lambda: agent.cache.size == 1200, timeout=20)
            assert max(server.state.batch_sizes) <= MAX_BATCH
            assert sum(server.state.batch_sizes) == 1200
            assert len(server.state.batch_sizes) == 3
        await server.stop()

    run(scenario, 40)


def test_renewal_time_is_half_life_with_ten_percent_jitter() -> None:
    """Each SVID's renewal time falls within half its lifetime ±10%, and is jittered."""

    async def scenario() -> None:
        server, client = await _started(x509_ttl=1000)
        for i in range(40):
            server.create_entry(f"spiffe://example.org/w/{i}", [f"unix:uid:{i}"], push=False)
        before = time.time()
        async with RunningAgent(server, client) as agent:
            await wait_until(lambda: agent.cache.size == 40)
            after = time.time()
            fractions = []
            for entry_id in server.state.entries:
                svid = agent.cache.cached_svid(entry_id)
                renew_at = agent.cache.renew_at(entry_id)
                assert svid is not None and renew_at is not None
                not_before = svid.leaf.not_valid_before_utc.timestamp()
                end = svid.leaf.not_valid_after_utc.timestamp()
                # Half-life counts from when the SVID arrived (NotBefore is backdated), some
                # time between `before` and `after`: bound renew_at for both extremes.
                earliest, latest = max(not_before, before), max(not_before, after)
                assert earliest + 0.45 * (end - earliest) <= renew_at, entry_id
                assert renew_at <= latest + 0.55 * (end - latest), entry_id
                fractions.append((renew_at - earliest) / (end - earliest))
            assert len({round(f, 4) for f in fractions}) > 1, "renewal times are not jittered"
        await server.stop()

    run(scenario)


def test_svid_is_renewed_and_pushed_at_half_life() -> None:
    """An SVID with a 2s lifetime is replaced on its own and the new one is pushed."""

    async def scenario() -> None:
        server, client = await _started(x509_ttl=2)
        server.create_entry("spiffe://example.org/web", ["unix:uid:1000"], push=False)
        async with RunningAgent(server, client) as agent:
            sub = agent.cache.subscribe(UID)
            first = await sub.next()
            assert [str(i.spiffe_id) for i in first.identities] == ["spiffe://example.org/web"]
            second = await asyncio.wait_for(sub.next(), 20)
            old = first.identities[0].svid.leaf.serial_number
            assert second.identities[0].svid.leaf.serial_number != old
            sub.close()
        await server.stop()

    run(scenario)


def test_deleted_entry_svid_is_dropped_and_pushed_at_once() -> None:
    """Deleting an entry on the server removes its SVID from an open subscription at once."""

    async def scenario() -> None:
        server, client = await _started()
        keep = server.create_entry("spiffe://example.org/a", ["unix:uid:1000"], created_at=1)
        gone = server.create_entry("spiffe://example.org/b", ["unix:uid:1000"], created_at=2)
        async with RunningAgent(server, client) as agent:
            sub = agent.cache.subscribe(UID)
            first = await sub.next()
            assert [i.entry_id for i in first.identities] == [keep, gone]
            server.delete_entry(gone)
            update = await asyncio.wait_for(sub.next(), 20)
            assert [i.entry_id for i in update.identities] == [keep]
            assert agent.cache.cached_svid(gone) is None
            sub.close()
        await server.stop()

    run(scenario)


def test_new_entry_is_pushed_to_open_subscription() -> None:
    """An entry created on the server reaches an open subscription with a signed SVID."""

    async def scenario() -> None:
        server, client = await _started()
        server.create_entry("spiffe://example.org/a", ["unix:uid:1000"], created_at=1)
        async with RunningAgent(server, client) as agent:
            sub = agent.cache.subscribe(UID)
            await sub.next()
            server.create_entry("spiffe://example.org/b", ["unix:uid:1000"], created_at=2)
            update = await asyncio.wait_for(sub.next(), 2)
            assert [str(i.spiffe_id) for i in update.identities] == [
                "spiffe://example.org/a",
                "spiffe://example.org/b",
            ]
            sub.close()
        await server.stop()

    run(scenario)


def test_first_update_waits_for_pending_svids() -> None:
    """A subscription opened before matching SVIDs are signed waits for them, not 'no identity'."""

    async def scenario() -> None:
        server, client = await _started()
        async with RunningAgent(server, client, svid_wait_timeout=5) as agent:
            sub = agent.cache.subscribe(UID)
            server.create_entry("spiffe://example.org/late", ["unix:uid:1000"])
            await wait_until(lambda: bool(agent.cache.served))
            update = await sub.next()
            assert [str(i.spiffe_id) for i in update.identities] == ["spiffe://example.org/late"]
            sub.close()
        await server.stop()

    run(scenario)


def test_identities_are_ordered_oldest_entry_first_and_subset_matched() -> None:
    """Identities come oldest entry first; entries needing selectors it lacks are left out."""

    async def scenario() -> None:
        server, client = await _started()
        newer = server.create_entry("spiffe://example.org/newer", ["unix:uid:1000"], created_at=20)
        older = server.create_entry("spiffe://example.org/older", ["unix:gid:1000"], created_at=10)
        server.create_entry("spiffe://example.org/other", ["unix:uid:1000", "unix:user:bob"])
        async with RunningAgent(server, client) as agent:
            sub = agent.cache.subscribe(UID)
            update = await sub.next()
            assert [i.entry_id for i in update.identities] == [older, newer]
            assert agent.cache.matching_identities(UID)[0].entry_id == older
            sub.close()
        await server.stop()

    run(scenario)


def test_entries_under_node_aliases_and_their_descendants_are_served() -> None:
    """Entries under a join-token alias, under a node alias, and two levels deep are served;
    the alias entry (selector spiffe_id:<agent>) is not."""

    async def scenario() -> None:
        server, client = await _started()
        web = "spiffe://example.org/nodes/web"
        alias = server.create_entry(web, [f"spiffe_id:{AGENT_ID}"], created_at=1)
        under_alias = server.create_entry(
            "spiffe://example.org/web/app", ["unix:uid:1000"], parent_id=web, created_at=2
        )
        under_node = server.create_entry(
            "spiffe://example.org/group/app",
            ["unix:uid:1000"],
            parent_id="spiffe://example.org/nodes/group",
            created_at=3,
        )
        deep = server.create_entry(
            "spiffe://example.org/web/app/tool",
            ["unix:gid:1000"],
            parent_id="spiffe://example.org/web/app",
            created_at=4,
        )
        async with RunningAgent(server, client) as agent:
            served = {e.id for e in agent.cache.served}
            assert served == {under_alias, under_node, deep}
            assert alias not in served
            sub = agent.cache.subscribe(UID)
            update = await sub.next()
            assert [i.entry_id for i in update.identities] == [under_alias, under_node, deep]
            sub.close()
        await server.stop()

    run(scenario)


def test_update_counts_matching_entries_without_an_svid() -> None:
    """While the server fails to sign, a workload's update has no identity and says how many
    matching entries lack an SVID."""

    async def scenario() -> None:
        server, client = await _started()
        server.fail_batch = grpc.StatusCode.UNAVAILABLE
        server.create_entry("spiffe://example.org/a", ["unix:uid:1000"])
        server.create_entry("spiffe://example.org/b", ["unix:uid:1000", "unix:gid:1000"])
        server.create_entry("spiffe://example.org/c", ["unix:uid:4"])
        async with RunningAgent(server, client) as agent:
            update = agent.cache.update_for(UID)
            assert update.identities == () and update.unsigned == 2
        await server.stop()

    run(scenario)


def test_cache_is_bounded_by_lru_but_keeps_subscribed_svids() -> None:
    """At most max_size SVIDs are cached; a subscribed entry beyond them is signed on demand."""

    async def scenario() -> None:
        server, client = await _started()
        ids = [
            server.create_entry(
                f"spiffe://example.org/w/{i}", [f"unix:uid:{i}"], created_at=i, push=False
            )
            for i in range(30)
        ]
        async with RunningAgent(server, client, max_size=10) as agent:
            await wait_until(lambda: agent.cache.size == 10)
            await asyncio.sleep(0.2)
            assert agent.cache.size == 10
            assert agent.cache.cached_svid(ids[25]) is None
            sub = agent.cache.subscribe(frozenset({Selector("unix", "uid:25")}))
            update = await sub.next()
            assert [i.entry_id for i in update.identities] == [ids[25]]
            await asyncio.sleep(0.2)
            assert agent.cache.size == 10
            assert agent.cache.cached_svid(ids[25]) is not None
            sub.close()
        await server.stop()

    run(scenario)


def test_jwt_svid_is_reused_until_half_its_lifetime() -> None:
    """A JWT-SVID is reused for the same audiences until half its life, then re-fetched."""

    async def scenario() -> None:
        server, client = await _started(jwt_ttl=2)
        server.create_entry("spiffe://example.org/web", ["unix:uid:1000"])
        async with RunningAgent(server, client) as agent:
            await wait_until(lambda: bool(agent.cache.matching_identities(UID)))
            identity = agent.cache.matching_identities(UID)[0]
            first = await agent.cache.fetch_jwt_svid(identity, ("b", "a"))
            again = await agent.cache.fetch_jwt_svid(identity, ("a", "b"))
            assert again == first
            assert server.state.jwt_calls == 1
            await agent.cache.fetch_jwt_svid(identity, ("c",))
            assert server.state.jwt_calls == 2
            await asyncio.sleep(1.2)
            fresh = await agent.cache.fetch_jwt_svid(identity, ("a", "b"))
            assert server.state.jwt_calls == 3
            assert fresh != first
        await server.stop()

    run(scenario)


def test_cached_jwt_svid_is_dropped_when_its_key_is_tainted() -> None:
    """A cached JWT-SVID signed by a key that becomes tainted is not served again."""

    async def scenario() -> None:
        server, client = await _started()
        server.create_entry("spiffe://example.org/web", ["unix:uid:1000"])
        async with RunningAgent(server, client) as agent:
            await wait_until(lambda: bool(agent.cache.matching_identities(UID)))
            identity = agent.cache.matching_identities(UID)[0]
            await agent.cache.fetch_jwt_svid(identity, ("a",))
            assert server.state.jwt_calls == 1
            server.jwt_tainted = True
            server.bundle_changed()
            await wait_until(lambda: bool(agent.cache.bundle_set()))
            for _ in range(100):  # the bundle change reaches the cache asynchronously
                await agent.cache.fetch_jwt_svid(identity, ("a",))
                if server.state.jwt_calls > 1:
                    break
                await asyncio.sleep(0.05)
            assert server.state.jwt_calls == 2
        await server.stop()

    run(scenario)


def test_cached_svids_are_served_while_server_is_down() -> None:
    """After the server goes away, cached SVIDs are still served (until they expire)."""

    async def scenario() -> None:
        server, client = await _started()
        server.create_entry("spiffe://example.org/web", ["unix:uid:1000"])
        async with RunningAgent(server, client) as agent:
            await wait_until(lambda: bool(agent.cache.matching_identities(UID)))
            await server.stop()
            await asyncio.sleep(0.5)
            assert [str(i.spiffe_id) for i in agent.cache.matching_identities(UID)] == [
                "spiffe://example.org/web"
            ]
            sub = agent.cache.subscribe(UID)
            update = await sub.next()
            assert len(update.identities) == 1
            sub.close()

    run(scenario)


def test_svid_from_tainted_authority_is_reissued_at_once() -> None:
    """When the signing authority is marked tainted, its SVIDs are re-issued by the new one."""

    async def scenario() -> None:
        server, client = await _started()
        entry = server.create_entry("spiffe://example.org/web", ["unix:uid:1000"])
        async with RunningAgent(server, client) as agent:
            sub = agent.cache.subscribe(UID)
            first = await sub.next()
            old = server.authorities[0]
            assert first.identities[0].svid.leaf.issuer == old.cert.subject
            server.authorities.append(make_authority())
            old.tainted = True
            server.bundle_changed()
            deadline = time.monotonic() + 20
            while True:
                update = await asyncio.wait_for(sub.next(), 20)
                if update.identities and update.identities[0].svid.leaf.issuer != old.cert.subject:
                    break
                assert time.monotonic() < deadline
            assert update.identities[0].svid.leaf.issuer == server.authorities[1].cert.subject
            assert agent.cache.cached_svid(entry) is not None
            sub.close()
        await server.stop()

    run(scenario)


def test_svid_from_revoked_authority_is_dropped_at_once() -> None:
    """When the signing authority leaves the bundle, its SVIDs vanish at once and are replaced."""

    async def scenario() -> None:
        server, client = await _started()
        server.create_entry("spiffe://example.org/web", ["unix:uid:1000"])
        async with RunningAgent(server, client) as agent:
            sub = agent.cache.subscribe(UID)
            first = await sub.next()
            old = server.authorities[0]
            server.authorities = [make_authority()]
            server.bundle_changed()
            update = await asyncio.wait_for(sub.next(), 2)
            for identity in update.identities:
                assert identity.svid.leaf.issuer != old.cert.subject
            assert first.identities[0].svid.leaf.issuer == old.cert.subject
            await wait_until(lambda: bool(agent.cache.matching_identities(UID)))
            assert agent.cache.matching_identities(UID)[0].svid.leaf.issuer == (
                server.authorities[0].cert.subject
            )
            sub.close()
        await server.stop()

    run(scenario)


def test_svid_revoked_by_a_crl_is_replaced_and_the_crl_pushed() -> None:
    """A CRL listing a cached SVID's serial: the next update carries the CRL and a new SVID
    (never the revoked one); the bundle stream is woken too."""

    async def scenario() -> None:
        server, client = await _started()
        entry = server.create_entry("spiffe://example.org/web", ["unix:uid:1000"])
        async with RunningAgent(server, client) as agent:
            sub = agent.cache.subscribe(UID)
            bundles = agent.cache.subscribe_bundles()
            first = await sub.next()
            await bundles.next()
            assert first.crls == ()
            old = first.identities[0].svid.leaf.serial_number
            der = server.revoke(old)
            update = await asyncio.wait_for(sub.next(), 5)
            assert update.crls == (der,)
            assert [i.svid.leaf.serial_number != old for i in update.identities] == [True]
            assert agent.cache.crls() == (der,)
            await asyncio.wait_for(bundles.next(), 5)
            cached = agent.cache.cached_svid(entry)
            assert cached is not None and cached.leaf.serial_number != old
            sub.close()
            bundles.close()
        await server.stop()

    run(scenario)


def test_bundle_subscription_gets_bundle_changes() -> None:
    """A bundle subscription returns the own bundle at once and again when it changes."""

    async def scenario() -> None:
        server, client = await _started()
        async with RunningAgent(server, client) as agent:
            sub = agent.cache.subscribe_bundles()
            own, federated = await sub.next()
            assert list(own.x509_authorities) == [server.authorities[0].cert]
            assert dict(federated) == {}
            server.authorities.append(make_authority())
            server.bundle_changed()
            own, _ = await asyncio.wait_for(sub.next(), 2)
            assert len(own.x509_authorities) == 2
            assert set(agent.cache.bundle_set()) == {own.trust_domain}
            sub.close()
        await server.stop()

    run(scenario)


def test_ban_on_signing_call_raises_agent_banned() -> None:
    """A 'banned' answer to a signing call ends the cache loop with AgentBanned."""

    async def scenario() -> None:
        server, client = await _started()
        async with RunningAgent(server, client) as agent:
            server.banned = True
            server.create_entry("spiffe://example.org/web", ["unix:uid:1000"])
            with pytest.raises(AgentBanned, match="was banned by the server"):
                await asyncio.wait_for(agent._tasks[1], 5)
        await server.stop()

    run(scenario)
