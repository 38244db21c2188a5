"""A simulated fleet: many node agents in this process, each with the agent's own code.

Each :class:`SimAgent` is the real agent minus its Workload API: its own data dir and
:class:`~node_agent.attestation.store.SvidStore`, its own
:class:`~node_agent.server_client.ServerClient` (own mTLS channel, own TCP connection),
an :class:`~node_agent.attestation.session.AgentSession` that attests with its own join
token and renews the agent SVID (:meth:`AgentSession.run_renewal`, plus :meth:`SimAgent.renew`
on demand), the :class:`~node_agent.sync.syncer.EntrySyncer` holding its ``SyncEntries``
stream, and :func:`~node_agent.cache.signer.sign_batch` for workload X509-SVIDs. Where the
real agent hands synced entries to its SVID cache, a :class:`Recorder` keeps them and notes
when each SPIFFE ID and each trust bundle first arrived.

:class:`Fleet` runs every agent on one asyncio loop in a background thread, so that a
test or benchmark drives the server with ordinary blocking admin calls in its own thread
and waits on the fleet with :meth:`Fleet.call`::

    with Fleet(server.address, bundle_path, TRUST_DOMAIN, root) as fleet:
        fleet.call(fleet.attest_all(tokens))         # tokens from Agents.CreateJoinToken
        fleet.call(fleet.wait_synced())
        ...
    # every agent's tasks cancelled and channels closed, the loop thread joined

Only loopback addresses are dialled (whatever ``server_address`` says: the caller passes
the address of a server it started on 127.0.0.1). Nothing here starts a process.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import re
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from credo.spiffe_id import TrustDomain
from node_agent.attestation.join_token import JoinTokenAttestor, JoinTokenConfig
from node_agent.attestation.session import AgentSession, SessionConfig
from node_agent.attestation.store import SvidStore
from node_agent.cache.signer import SignedBatch, sign_batch
from node_agent.errors import AgentRemoved, ServerUnreachable
from node_agent.server_client import MAX_BATCH, BackoffPolicy, ServerClient, ServerClientConfig
from node_agent.sync.entries import RegistrationEntry, TrustBundles
from node_agent.sync.syncer import EntrySyncer

__all__ = ["Fleet", "Recorder", "SimAgent", "create_join_tokens", "workload_entries"]

T = TypeVar("T")

LOOPBACK_PREFIXES = ("127.", "localhost:", "[::1]:")


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


class Recorder:
    """The :class:`~node_agent.sync.syncer.SyncListener` of a simulated agent.

    Holds the last entry set and bundles, and the ``time.perf_counter()`` at which each
    SPIFFE ID and each X.509 authority (DER) was first seen. Waiters are woken on every
    change (:meth:`wait_until`).
    """

    def __init__(self) -> None:
        self.entries: dict[str, RegistrationEntry] = {}
        self.bundles: TrustBundles | None = None
        self.connected = False
        self.first_seen: dict[str, float] = {}
        self.gone_at: dict[str, float] = {}
        self.authority_seen: dict[bytes, float] = {}
        self.updates = 0
        self._changed = asyncio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    @property
    def spiffe_ids(self) -> frozenset[str]:
        return frozenset(str(e.spiffe_id) for e in self.entries.values())

    def update_entries(self, entries: Mapping[str, RegistrationEntry]) -> None:
        now = time.perf_counter()
        before = self.spiffe_ids
        self.entries = dict(entries)
        after = self.spiffe_ids
        for spiffe_id in after - before:
            self.first_seen.setdefault(spiffe_id, now)
            self.gone_at.pop(spiffe_id, None)
        for spiffe_id in before - after:
            self.gone_at[spiffe_id] = now
        self.updates += 1
        self._notify()

    def update_bundles(self, bundles: TrustBundles) -> None:
        now = time.perf_counter()
        self.bundles = bundles
        for cert in bundles.bundle.x509_authorities:
            self.authority_seen.setdefault(_der(cert), now)
        self._notify()

    def set_connected(self, connected: bool) -> None:
        self.connected = connected
        self._notify()

    def changed(self) -> None:
        """Wake the waiters (something outside the listener changed: the agent stopped)."""
        self._notify()

    async def wait_until(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        """Return once ``predicate()`` holds; TimeoutError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not predicate():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{what}: not within {timeout:g}s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)


class _TimedTrust:
    """The syncer's trust listener: notes when each X.509 authority arrived, then hands it
    to the agent session (which stores the bundle and rebuilds the channels, as the agent's
    does). Noted first: the session's file writes run on the loop, one agent after another
    here, where a real agent has only its own."""

    def __init__(self, agent: SimAgent) -> None:
        self._agent = agent

    def set_authorities(
        self, authorities: tuple[x509.Certificate, ...], tainted: frozenset[bytes] = frozenset()
    ) -> None:
        now = time.perf_counter()
        seen = self._agent.recorder.authority_seen
        for cert in authorities:
            seen.setdefault(_der(cert), now)
        self._agent.session.set_authorities(authorities, tainted)


class SimAgent:
    """One simulated node agent (see the module docstring)."""

    def __init__(
        self,
        name: str,
        token: str,
        server_address: str,
        bundle: Path,
        trust_domain: str,
        root: Path,
    ) -> None:
        if not server_address.startswith(LOOPBACK_PREFIXES):
            raise ValueError(f"the simulated fleet dials loopback only, not {server_address}")
        td = TrustDomain.parse(trust_domain)
        self.name = name
        self.spiffe_id = f"spiffe://{trust_domain}/credo/agent/join_token/{token}"
        self.store = SvidStore(root / name)
        self.client = ServerClient(
            ServerClientConfig(
                server_addresses=(server_address,),
                trust_domain=td,
                backoff=BackoffPolicy(initial=0.2, cap=5.0),
            ),
            forget_agent_svid=self.store.delete,
        )
        self.session = AgentSession(
            SessionConfig(trust_domain=td, trust_bundle=bundle, attest_retry_timeout=120.0),
            self.client,
            JoinTokenAttestor(JoinTokenConfig(), token),
            self.store,
        )
        self.recorder = Recorder()
        self.syncer = EntrySyncer(self.client, self.recorder, _TimedTrust(self))
        self.removed: AgentRemoved | None = None
        """Set when the server banned (or evicted) the agent: its loops have ended."""
        self.failure: BaseException | None = None
        """Set when one of its loops ended with anything else (a bug)."""
        self.svids: dict[str, Any] = {}
        """Entry id -> the last X509-SVID signed for it."""
        self.renewals = 0
        self.retries = 0
        """Signing and renewal calls retried after the server did not answer in time."""
        self.retry_reasons: collections.Counter[str] = collections.Counter()
        """Why they were retried (the error, its server address left out)."""
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Attest (the session stores the SVID), then run the sync stream and renewal."""
        await asyncio.to_thread(self.store.prepare)
        await self.session.start()
        for name, loop in (("sync", self.syncer.run), ("renewal", self.session.run_renewal)):
            task = asyncio.get_running_loop().create_task(loop(), name=f"{self.name}-{name}")
            task.add_done_callback(self._ended)
            self._tasks.append(task)

    def _ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        error = task.exception()
        if isinstance(error, AgentRemoved):
            self.removed = error
            for other in self._tasks:
                other.cancel()
        elif error is not None:
            self.failure = error
        self.recorder.changed()

    @property
    def synced(self) -> bool:
        return self.syncer.synced.is_set()

    def workload_entries(self) -> list[RegistrationEntry]:
        """The synced entries, oldest first (as the real cache orders them)."""
        return sorted(self.recorder.entries.values(), key=lambda e: e.sort_key)

    async def sign(
        self, entries: Sequence[RegistrationEntry] | None = None, *, retry_for: float = 0.0
    ) -> SignedBatch:
        """Sign an X509-SVID for each of ``entries`` (default: every synced entry).

        A call that finds the server unreachable (overloaded: its deadline passed) is
        retried with the client's backoff for up to ``retry_for`` seconds, as the agent's
        SVID cache retries a failed signing call.
        """
        todo = list(self.workload_entries() if entries is None else entries)
        signed = SignedBatch()
        for start in range(0, len(todo), MAX_BATCH):
            batch = await self._sign_batch(todo[start : start + MAX_BATCH], retry_for)
            signed.issued += batch.issued
            signed.refused += batch.refused
        for entry, svid in signed.issued:
            self.svids[entry.id] = svid
        return signed

    async def _sign_batch(
        self, batch: Sequence[RegistrationEntry], retry_for: float
    ) -> SignedBatch:
        return await self._retrying(lambda: sign_batch(self.client, batch), retry_for)

    async def _retrying(self, call: Callable[[], Awaitable[T]], retry_for: float) -> T:
        """``call()``, again after the client's backoff while the server does not answer in
        time, for up to ``retry_for`` seconds (as the agent's own retry loops do)."""
        deadline = time.monotonic() + retry_for
        backoff = self.client.backoff()
        while True:
            try:
                return await call()
            except ServerUnreachable as exc:
                delay = backoff.next()
                if time.monotonic() + delay > deadline:
                    raise
                self.retries += 1
                self.retry_reasons[re.sub(r"\d+\.\d+\.\d+\.\d+:\d+", "SERVER", str(exc))[:90]] += 1
                await asyncio.sleep(delay)

    async def renew(self, *, retry_for: float = 0.0) -> None:
        """Renew the agent SVID now (``RenewAgent`` with a new key), as at half-life;
        retried like :meth:`sign`."""
        await self._retrying(self.session.renew, retry_for)
        self.renewals += 1

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.client.close()


class Fleet:
    """Simulated agents on one asyncio loop in a background thread (module docstring)."""

    def __init__(
        self,
        server_address: str,
        bundle: Path,
        trust_domain: str,
        root: Path,
        *,
        attest_concurrency: int = 32,
    ) -> None:
        self.server_address = server_address
        self.bundle = bundle
        self.trust_domain = trust_domain
        self.root = root
        self.attest_concurrency = attest_concurrency
        self.agents: list[SimAgent] = []
        self._loop = asyncio.new_event_loop()
        # Key generation and TLS handshakes of many agents run in the loop's worker threads.
        self._loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(8))
        self._thread = threading.Thread(target=self._loop.run_forever, name="fleet", daemon=True)

    def __enter__(self) -> Fleet:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop every agent, then the loop; idempotent."""
        if not self._thread.is_alive():
            return
        with contextlib.suppress(Exception):
            self.call(self._stop_all(), timeout=60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        if not self._thread.is_alive():
            self._loop.close()

    async def _stop_all(self) -> None:
        await asyncio.gather(*(a.stop() for a in self.agents), return_exceptions=True)
        await self._loop.shutdown_default_executor()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 300.0) -> T:
        """Run ``coro`` on the fleet's loop and return its result (blocking this thread)."""
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except BaseException:
            future.cancel()
            raise

    def call_soon(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Start ``coro`` on the fleet's loop; its future (``.result(timeout)`` to wait)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    # --- on the loop ------------------------------------------------------------------

    async def attest_all(self, tokens: Iterable[str]) -> list[SimAgent]:
        """One agent per join token, attested (at most ``attest_concurrency`` at a time)
        and syncing; the new agents, in token order."""
        fresh = [
            SimAgent(
                f"agent-{len(self.agents) + i}",
                token,
                self.server_address,
                self.bundle,
                self.trust_domain,
                self.root,
            )
            for i, token in enumerate(tokens)
        ]
        self.agents += fresh
        gate = asyncio.Semaphore(self.attest_concurrency)

        async def one(agent: SimAgent) -> None:
            async with gate:
                await agent.start()

        await asyncio.gather(*(one(a) for a in fresh))
        return fresh

    async def each(
        self, work: Callable[[SimAgent], Awaitable[T]], agents: Iterable[SimAgent] | None = None
    ) -> list[T]:
        """``work(agent)`` for every agent (default: all), concurrently; results in order."""
        return list(await asyncio.gather(*(work(a) for a in (agents or self.agents))))

    async def wait_synced(self, timeout: float = 120.0) -> None:
        """Until every agent has applied its first full entry set."""
        await asyncio.gather(
            *(
                asyncio.wait_for(a.syncer.synced.wait(), timeout)
                for a in self.agents
                if a.removed is None
            )
        )

    async def wait_for(
        self, agent: SimAgent, predicate: Callable[[SimAgent], bool], timeout: float, what: str
    ) -> None:
        """Until ``predicate(agent)`` holds (woken by the agent's sync updates)."""
        await agent.recorder.wait_until(lambda: predicate(agent), timeout, f"{agent.name}: {what}")

    async def wait_entry(self, agent: SimAgent, spiffe_id: str, timeout: float = 30.0) -> float:
        """Until ``agent`` holds an entry for ``spiffe_id``; the perf_counter it arrived."""
        await self.wait_for(
            agent, lambda a: spiffe_id in a.recorder.first_seen, timeout, f"entry {spiffe_id}"
        )
        return agent.recorder.first_seen[spiffe_id]

    async def wait_authority(self, der: bytes, timeout: float = 60.0) -> list[float]:
        """Until every connected agent's bundle holds the X.509 authority ``der``; the
        perf_counter at which each agent got it."""

        async def one(agent: SimAgent) -> float:
            await self.wait_for(
                agent, lambda a: der in a.recorder.authority_seen, timeout, "the new authority"
            )
            return agent.recorder.authority_seen[der]

        return await self.each(one, [a for a in self.agents if a.removed is None])


# --- the admin side (blocking; the caller's thread) -----------------------------------------


def create_join_tokens(admin: Any, count: int, ttl: int = 600) -> list[str]:
    """``count`` fresh join tokens from ``Agents.CreateJoinToken`` on the admin channel."""
    from credo._proto.credo.server.v1 import admin_pb2, admin_pb2_grpc

    stub = admin_pb2_grpc.AgentsStub(admin)
    return [
        stub.CreateJoinToken(admin_pb2.CreateJoinTokenRequest(ttl=ttl), timeout=30).token
        for _ in range(count)
    ]


def workload_entries(
    admin: Any, parents: Sequence[str], per_agent: int, tag: str, batch: int = 500
) -> dict[str, set[str]]:
    """Create ``per_agent`` entries under each parent (SPIFFE IDs
    ``.../fleet/<tag>/<agent index>/<n>``) in ``BatchCreateEntry`` calls of ``batch``;
    parent -> the SPIFFE IDs created for it."""
    from credo._proto.credo.server.v1 import admin_pb2, admin_pb2_grpc, types_pb2

    stub = admin_pb2_grpc.EntriesStub(admin)
    wanted: dict[str, set[str]] = {p: set() for p in parents}
    protos = []
    for i, parent in enumerate(parents):
        td = parent.split("/")[2]
        for n in range(per_agent):
            spiffe_id = f"spiffe://{td}/fleet/{tag}/{i}/{n}"
            wanted[parent].add(spiffe_id)
            protos.append(
                types_pb2.RegistrationEntry(
                    spiffe_id=spiffe_id,
                    parent_id=parent,
                    selectors=[types_pb2.Selector(type="unix", value=f"uid:{10000 + n}")],
                )
            )
    for start in range(0, len(protos), batch):
        response = stub.BatchCreateEntry(
            admin_pb2.BatchCreateEntryRequest(entries=protos[start : start + batch]), timeout=120
        )
        if len(response.entries) != len(protos[start : start + batch]):
            raise RuntimeError("BatchCreateEntry did not create every entry")
    return wanted
