"""A fake Manager for Workload API tests, holding REAL certificates and keys made with credo."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Coroutine, Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from credo.bundle import Bundle, BundleSet
from credo.jwtsvid import sign_jwt_svid
from credo.keys import generate_private_key
from credo.selector import Selector, is_subset
from credo.spiffe_id import SpiffeId, TrustDomain
from credo.witsvid import private_key_to_jwk, sign_wit_svid
from credo.x509svid import X509Svid, ca_certificate_template, sign_x509_svid, signature_hash_for
from node_agent.workload_api.manager import Identity, WitIdentity, WorkloadUpdate

T = TypeVar("T")

MY_UID = f"unix:uid:{os.getuid()}"


class FakeCa:
    """A self-signed CA and a JWT key for one trust domain."""

    def __init__(self, trust_domain: str) -> None:
        self.trust_domain = TrustDomain(trust_domain)
        self.key = generate_private_key()
        now = datetime.now(UTC)
        self.cert = ca_certificate_template(
            self.trust_domain,
            self.key.public_key(),
            not_before=now - timedelta(minutes=1),
            not_after=now + timedelta(days=1),
        ).sign(self.key, signature_hash_for(self.key))
        self.jwt_key = generate_private_key()
        self.kid = f"{trust_domain}-jwt-1"
        self.wit_key = generate_private_key()
        self.wit_kid = f"{trust_domain}-wit-1"
        self._bundle: Bundle | None = None

    def issue(self, spiffe_id: str, ttl: timedelta = timedelta(hours=1)) -> X509Svid:
        """A fresh X509-SVID (new key) for ``spiffe_id``."""
        sid = SpiffeId.parse(spiffe_id)
        key = generate_private_key()
        leaf = sign_x509_svid(sid, key.public_key(), ca_cert=self.cert, ca_key=self.key, ttl=ttl)
        return X509Svid(sid, (leaf,), key)

    def bundle(self) -> Bundle:
        """The trust domain's bundle (CA cert + JWT key + WIT key): one object, as the
        agent's cache keeps one until the bundle changes."""
        if self._bundle is None:
            self._bundle = Bundle(
                self.trust_domain,
                (self.cert,),
                {self.kid: self.jwt_key.public_key()},
                wit_authorities={self.wit_kid: self.wit_key.public_key()},
            )
        return self._bundle

    def sign_jwt(self, spiffe_id: SpiffeId, audience: Iterable[str]) -> str:
        """A JWT-SVID signed by this trust domain."""
        return sign_jwt_svid(spiffe_id, list(audience), key=self.jwt_key, key_id=self.kid)


class FakeSubscription:
    """Returns the manager's state now, then again after each ``push``."""

    def __init__(self, manager: FakeManager, selectors: frozenset[Selector] | None) -> None:
        self._manager = manager
        self._selectors = selectors
        self._seen = -1
        self.closed = False

    async def _wait(self) -> None:
        async with self._manager.changed:
            await self._manager.changed.wait_for(lambda: self._manager.version > self._seen)
            self._seen = self._manager.version

    async def next(self) -> WorkloadUpdate:
        await self._wait()
        assert self._selectors is not None
        return self._manager.update_for(self._selectors)

    def close(self) -> None:
        self.closed = True
        self._manager.subscriptions.discard(self)


class FakeBundleSubscription(FakeSubscription):
    async def next(self) -> tuple[Bundle, Mapping[str, Bundle]]:  # type: ignore[override]
        await self._wait()
        return self._manager.ca.bundle(), self._manager.federated_bundles()


class FakeManager:
    """Entries are (selectors, Identity) pairs; ``push`` tells every subscriber to look again.

    Must be used on one event loop (the server's); tests call it through :class:`LoopThread`.
    """

    def __init__(self, ca: FakeCa, federated: Iterable[FakeCa] = ()) -> None:
        self.ca = ca
        self.federated = {f.trust_domain.name: f for f in federated}
        self.entries: list[tuple[frozenset[Selector], Identity]] = []
        self.version = 0
        self.changed = asyncio.Condition()
        self.subscriptions: set[FakeSubscription] = set()
        self.jwt_requests: list[tuple[str, tuple[str, ...]]] = []
        self.unsigned = 0
        """Matching entries the fake reports as having no SVID yet."""
        self.jwt_error: Exception | None = None
        self.wit_requests: list[tuple[str, ...]] = []
        self.wit_error: Exception | None = None
        self.wit_refresh_at = 4e9
        """When fetch_wit_svids says its WITs are due again (Unix time)."""
        """Raised by fetch_jwt_svid when set (what the server client's errors become)."""
        self.crl_ders: tuple[bytes, ...] = ()
        """The CRLs the fake serves (DER)."""

    def add(self, selectors: Iterable[str], spiffe_id: str, hint: str = "") -> Identity:
        """Register an entry and issue its SVID."""
        identity = Identity(
            entry_id=f"entry-{len(self.entries)}",
            spiffe_id=SpiffeId.parse(spiffe_id),
            svid=self.ca.issue(spiffe_id),
            hint=hint,
        )
        self.entries.append((frozenset(Selector.parse(s) for s in selectors), identity))
        return identity

    async def push(self) -> None:
        """Wake every subscriber (the state changed)."""
        async with self.changed:
            self.version += 1
            self.changed.notify_all()

    def federated_bundles(self) -> dict[str, Bundle]:
        return {name: ca.bundle() for name, ca in self.federated.items()}

    def update_for(self, selectors: frozenset[Selector]) -> WorkloadUpdate:
        return WorkloadUpdate(
            identities=self.matching_identities(selectors),
            bundle=self.ca.bundle(),
            federated_bundles=self.federated_bundles(),
            unsigned=self.unsigned,
            crls=self.crl_ders,
        )

    # -- the Manager protocol --

    def subscribe(self, selectors: frozenset[Selector]) -> FakeSubscription:
        sub = FakeSubscription(self, selectors)
        self.subscriptions.add(sub)
        return sub

    def subscribe_bundles(self) -> FakeBundleSubscription:
        sub = FakeBundleSubscription(self, None)
        self.subscriptions.add(sub)
        return sub

    def matching_identities(self, selectors: frozenset[Selector]) -> tuple[Identity, ...]:
        return tuple(i for wanted, i in self.entries if is_subset(wanted, selectors))

    async def fetch_wit_svids(self, identities: tuple[Identity, ...]) -> tuple[WitIdentity, ...]:
        self.wit_requests.append(tuple(str(i.spiffe_id) for i in identities))
        if self.wit_error is not None:
            raise self.wit_error
        out = []
        for identity in identities:
            key = generate_private_key()
            token = sign_wit_svid(
                identity.spiffe_id, key.public_key(), key=self.ca.wit_key, key_id=self.ca.wit_kid
            )
            out.append(WitIdentity(identity, token, private_key_to_jwk(key), self.wit_refresh_at))
        return tuple(out)

    async def fetch_jwt_svid(self, identity: Identity, audience: tuple[str, ...]) -> str:
        self.jwt_requests.append((str(identity.spiffe_id), audience))
        if self.jwt_error is not None:
            raise self.jwt_error
        return self.ca.sign_jwt(identity.spiffe_id, audience)

    def bundle_set(self) -> BundleSet:
        return BundleSet([self.ca.bundle(), *self.federated_bundles().values()])

    def crls(self) -> tuple[bytes, ...]:
        return self.crl_ders

    def revoked_jtis(self) -> frozenset[str]:
        return frozenset()


class LoopThread:
    """An asyncio event loop in a background thread, for servers that sync clients call."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@dataclass
class Api:
    """A running Workload API server: its socket, fake manager and the loop it runs on."""

    socket_path: str
    manager: FakeManager
    loop: LoopThread
    server: Any

    @property
    def endpoint(self) -> str:
        return "unix://" + self.socket_path
