"""A pool of signing worker processes for batches of workload X509-SVIDs.

pyca/cryptography holds the GIL while it verifies and signs, so threads bring no
parallelism; this pool spreads a batch over ``workers`` processes instead. Each worker
checks the CSR signature, extracts its public key and signs the leaf with
:func:`server.ca.ca.build_workload_svid` (the same function and template the in-process
path uses, so both hand out identical certificates).

* Workers are started with ``forkserver`` (``spawn`` where that is unavailable), never
  ``fork``: the server process runs gRPC and asyncio threads.
* Private keys never cross the pipe. A task carries the CA certificate (DER), the
  authority id, the key id and the :class:`~server.ca.keymanager.DiskKeyManager`
  directory; each worker loads the key itself and caches it, with its
  :class:`~server.ca.tbs.WorkloadSvidSigner`, per authority id, so a rotation (a new
  authority id) makes it load the new key.
* A batch is split into one chunk per worker; the results come back as leaf DER plus
  NotAfter, or an error kind and message per item. The caller builds the response and
  appends the CA chain.
* :meth:`SigningPool.start_background` spawns and warms the workers in a background
  thread; until they answer, :meth:`SigningPool.usable` is False and callers sign
  in-process. If a worker dies (``BrokenProcessPool``), :meth:`SigningPool.sign` raises
  :class:`PoolUnavailable` (the caller signs that batch in-process), logs once and
  starts a new pool.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import multiprocessing
import os
import select
import signal
import threading
import time
from collections import OrderedDict
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from credo.spiffe_id import SpiffeId, TrustDomain
from server.ca.ca import X509CA, build_workload_svid
from server.ca.errors import CaError, PoolUnavailable
from server.ca.keymanager import read_key_file
from server.ca.tbs import WorkloadSvidSigner, request_key_info

__all__ = [
    "ERROR_CA",
    "ERROR_INVALID",
    "MIN_POOLED_BATCH",
    "ItemResult",
    "PoolUnavailable",
    "SignItem",
    "SigningPool",
    "default_signing_workers",
    "x509_ca_key_id",
]

log = logging.getLogger(__name__)

MIN_POOLED_BATCH: Final = 16
"""Smaller batches are signed in-process: the round trip to a worker costs more."""

ERROR_INVALID: Final = "invalid"
"""The item failed with a ``ValueError`` (bad CSR, bad SPIFFE ID): INVALID_ARGUMENT."""
ERROR_CA: Final = "ca"
"""The item failed with a ``CaError``: FAILED_PRECONDITION."""

_WARMUP_TIMEOUT: Final = 120.0
_MAX_CACHED_AUTHORITIES: Final = 4

SignItem = tuple[str, bytes, str, tuple[str, ...], int]
"""``(field, csr_der, spiffe_id, dns_names, ttl_seconds)``; ``field`` names the CSR in errors."""

ItemResult = tuple[bytes | None, int, str, str]
"""``(leaf_der, not_after_unix, error_kind, message)``; ``leaf_der`` is None on error."""


def default_signing_workers() -> int:
    """``min(2, os.cpu_count())``: the default size of the pool."""
    return min(2, os.cpu_count() or 1)


def x509_ca_key_id(authority_id: str) -> str:
    """The key manager id of an X.509 authority's private key."""
    return f"x509-ca-{authority_id}"


class _KeyUnavailable(Exception):
    """A worker could not load the CA key (the authority was removed meanwhile)."""


@dataclass(frozen=True)
class _Authority:
    """What a worker needs to sign with one X.509 authority (no private key material)."""

    trust_domain: str
    authority_id: str
    certificate_der: bytes
    key_dir: str
    key_id: str


# --- worker side ------------------------------------------------------------------------

_loaded: OrderedDict[str, tuple[TrustDomain, WorkloadSvidSigner]] = OrderedDict()


def _watch_server(server_pid: int) -> None:
    """Exit this worker as soon as the server process is gone (even after SIGKILL).

    A worker's parent is the forkserver, which the workers themselves keep alive, and it
    holds both ends of its task queue, so neither EOF nor PR_SET_PDEATHSIG would tell it.
    """
    pidfd = -1
    with contextlib.suppress(AttributeError, OSError):
        pidfd = os.pidfd_open(server_pid)
    while True:
        if pidfd >= 0:
            select.select([pidfd], [], [])  # readable once the server has exited
            os._exit(0)
        try:
            os.kill(server_pid, 0)
        except ProcessLookupError:
            os._exit(0)
        except PermissionError:
            pass
        time.sleep(1.0)


def _worker_init(server_pid: int) -> None:
    """Ignore SIGINT (the server handles it) and exit when the server process exits."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(
        target=_watch_server, args=(server_pid,), name="watch-server", daemon=True
    ).start()


def _warm() -> int:
    """A no-op task: one per worker makes the pool spawn them all (forked from the
    forkserver, which has already imported this module and the CSR check)."""
    return os.getpid()


def _authority(spec: _Authority) -> tuple[TrustDomain, WorkloadSvidSigner]:
    """The authority's leaf signer (certificate and key), loaded once per id."""
    cached = _loaded.get(spec.authority_id)
    if cached is not None:
        _loaded.move_to_end(spec.authority_id)
        return cached
    key = read_key_file(spec.key_dir, spec.key_id)
    if key is None:
        raise _KeyUnavailable(f"no key {spec.key_id!r} for x509 authority {spec.authority_id!r}")
    cert = x509.load_der_x509_certificate(spec.certificate_der)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, spki) != cert.public_key().public_bytes(der, spki):
        raise _KeyUnavailable(f"key {spec.key_id!r} does not match authority {spec.authority_id!r}")
    loaded = (TrustDomain.parse(spec.trust_domain), WorkloadSvidSigner(cert, key))
    _loaded[spec.authority_id] = loaded
    while len(_loaded) > _MAX_CACHED_AUTHORITIES:
        _loaded.popitem(last=False)
    return loaded


def _sign_chunk(spec: _Authority, now: datetime, items: list[SignItem]) -> list[ItemResult]:
    """Check each CSR and sign its leaf (runs in a worker process)."""
    # The CSR check lives at the API edge; import it here so the main process's import
    # graph stays CA -> nothing in server.api.
    from server.api.convert import parse_csr

    trust_domain, signer = _authority(spec)
    ids: dict[str, SpiffeId] = {}
    out: list[ItemResult] = []
    for field, csr, spiffe_id_text, dns_names, ttl in items:
        try:
            public_key = parse_csr(csr, field)
            spiffe_id = ids.get(spiffe_id_text)
            if spiffe_id is None:
                spiffe_id = ids[spiffe_id_text] = SpiffeId.parse(spiffe_id_text)
            leaf = build_workload_svid(
                trust_domain,
                signer,
                spiffe_id,
                public_key,
                ttl,
                dns_names,
                now,
                request_key_info(csr),
            )
        except CaError as err:
            out.append((None, 0, ERROR_CA, str(err)))
        except ValueError as err:
            out.append((None, 0, ERROR_INVALID, str(err)))
        else:
            out.append((leaf.der, leaf.not_after, "", ""))
    return out


# --- server side ------------------------------------------------------------------------


def _context() -> multiprocessing.context.BaseContext:
    """A forkserver context (preloading this module), or spawn; never fork."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__, "server.api.convert"])
        return ctx
    return multiprocessing.get_context("spawn")


class SigningPool:
    """``workers`` signing processes loading CA keys from ``key_dir``; see the module doc."""

    def __init__(
        self,
        workers: int,
        key_dir: Path | str,
        trust_domain: TrustDomain,
        *,
        min_batch: int = MIN_POOLED_BATCH,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers is {workers}; expected at least 1")
        self.workers = workers
        self.min_batch = min_batch
        self._key_dir = str(Path(key_dir).absolute())
        self._trust_domain = trust_domain
        self._lock = threading.Lock()
        self._executor: concurrent.futures.ProcessPoolExecutor | None = None
        self._ready = False
        self._closed = False

    @property
    def ready(self) -> bool:
        """True once the workers are up and answered a warm-up task."""
        return self._ready and not self._closed

    def usable(self, count: int) -> bool:
        """True if a batch of ``count`` items should go to the pool."""
        return count >= self.min_batch and self.ready

    def start(self) -> None:
        """Spawn the workers and wait until each has answered (blocking)."""
        with self._lock:
            if self._closed or self._executor is not None:
                return
            executor = self._executor = concurrent.futures.ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=_context(),
                initializer=_worker_init,
                initargs=(os.getpid(),),
            )
        self._warm_up(executor)

    def start_background(self) -> threading.Thread:
        """:meth:`start` in a daemon thread, so serving is not delayed by the spawn."""
        thread = threading.Thread(target=self.start, name="signing-pool-start", daemon=True)
        thread.start()
        return thread

    def _warm_up(self, executor: concurrent.futures.ProcessPoolExecutor) -> None:
        started = time.perf_counter()
        try:
            futures = [executor.submit(_warm) for _ in range(self.workers)]
            for future in futures:
                future.result(timeout=_WARMUP_TIMEOUT)
        except (BrokenProcessPool, RuntimeError, concurrent.futures.TimeoutError) as err:
            if not self._closed:
                log.warning(
                    "signing workers did not start; signing in-process",
                    extra={"error": str(err) or type(err).__name__},
                )
            return
        except concurrent.futures.CancelledError:
            return  # closed while starting
        with self._lock:
            if self._executor is executor and not self._closed:
                self._ready = True
        log.info(
            "signing workers ready",
            extra={
                "workers": self.workers,
                "seconds": round(time.perf_counter() - started, 3),
            },
        )

    def _restart(self, broken: concurrent.futures.ProcessPoolExecutor, reason: str) -> None:
        """Replace a broken executor (once, however many chunks noticed) and warm a new one."""
        with self._lock:
            if self._executor is not broken or self._closed:
                return
            self._executor = None
            self._ready = False
        log.error(
            "a signing worker died; restarting the pool and signing this batch in-process",
            extra={"error": reason},
        )
        broken.shutdown(wait=False, cancel_futures=True)
        self.start_background()

    async def sign(self, ca: X509CA, now: datetime, items: list[SignItem]) -> list[ItemResult]:
        """Sign ``items`` with ``ca`` across the workers; results in the order of ``items``.

        Raises :class:`PoolUnavailable` when the batch must be signed in-process instead.
        """
        executor = self._executor
        if executor is None or not self.ready:
            raise PoolUnavailable("signing workers are not ready")
        spec = _Authority(
            trust_domain=self._trust_domain.name,
            authority_id=ca.authority_id,
            certificate_der=ca.certificate.public_bytes(serialization.Encoding.DER),
            key_dir=self._key_dir,
            key_id=x509_ca_key_id(ca.authority_id),
        )
        size = -(-len(items) // self.workers)
        chunks = [items[i : i + size] for i in range(0, len(items), size)]
        try:
            futures = [executor.submit(_sign_chunk, spec, now, chunk) for chunk in chunks]
        except (BrokenProcessPool, RuntimeError) as err:
            self._restart(executor, str(err) or type(err).__name__)
            raise PoolUnavailable(str(err)) from None
        done = await asyncio.gather(
            *(asyncio.wrap_future(f) for f in futures), return_exceptions=True
        )
        out: list[ItemResult] = []
        for result in done:
            if isinstance(result, BrokenProcessPool):
                self._restart(executor, str(result) or type(result).__name__)
                raise PoolUnavailable(str(result))
            if isinstance(result, BaseException):
                log.warning(
                    "signing worker failed a batch; signing it in-process",
                    extra={"error": str(result), "authority_id": ca.authority_id},
                )
                raise PoolUnavailable(str(result))
            out.extend(result)
        return out

    def close(self) -> None:
        """Stop the workers (blocking); pending chunks are cancelled."""
        with self._lock:
            self._closed = True
            self._ready = False
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
