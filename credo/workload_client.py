"""A synchronous SPIFFE Workload API client.

::

    with WorkloadApiClient() as client:            # SPIFFE_ENDPOINT_SOCKET
        ctx = client.fetch_x509_context()
        ctx.default_svid.spiffe_id, ctx.bundles
        token = client.fetch_jwt_svid(["my-audience"]).token
        wit = client.fetch_wit_svid()                  # WIT-SVID + its key
        headers = wit.headers("https://peer.example/")  # Workload-Identity/-Proof-Token

Every call sends the ``workload.spiffe.io: true`` header. A failed call raises
:class:`credo.errors.WorkloadApiError` carrying the gRPC status name; a bad endpoint
raises :class:`credo.errors.InvalidWorkloadApiEndpoint`.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import grpc

from credo._proto import workload_pb2, workload_pb2_grpc
from credo.bundle import Bundle, BundleSet, JwtBundle, WitBundle, X509Bundle
from credo.errors import InvalidWorkloadApiEndpoint, WorkloadApiError
from credo.jwtsvid import JwtSvid
from credo.keys import PrivateKey
from credo.spiffe_id import SpiffeId, TrustDomain
from credo.witsvid import WitSvid, private_key_from_jwk
from credo.wpt import WIT_HEADER, WPT_HEADER, create_wpt
from credo.x509svid import X509Svid

__all__ = [
    "ENDPOINT_ENV",
    "WorkloadApiClient",
    "WorkloadWit",
    "X509Context",
    "grpc_target",
]

ENDPOINT_ENV = "SPIFFE_ENDPOINT_SOCKET"
_HEADER = (("workload.spiffe.io", "true"),)


@dataclass(frozen=True)
class X509Context:
    """The caller's X509-SVIDs (first = default, each with its hint) and trust bundles."""

    svids: list[X509Svid]
    bundles: BundleSet = field(default_factory=BundleSet)

    @property
    def default_svid(self) -> X509Svid:
        """The first (default) X509-SVID."""
        return self.svids[0]


@dataclass(frozen=True)
class WorkloadWit:
    """A WIT-SVID from the Workload API with the private key it binds (never log either)."""

    svid: WitSvid
    private_key: PrivateKey = field(repr=False)
    hint: str = ""

    def proof(self, audience: str, **kwargs: Any) -> str:
        """A Workload Proof Token for ``audience`` (see :func:`credo.create_wpt`)."""
        return create_wpt(self.svid, self.private_key, audience, **kwargs)

    def headers(self, audience: str, **kwargs: Any) -> dict[str, str]:
        """The two HTTP request headers that authenticate a request to ``audience``."""
        return {WIT_HEADER: self.svid.token, WPT_HEADER: self.proof(audience, **kwargs)}


def grpc_target(endpoint: str) -> str:
    """Turn a Workload API address into a gRPC target; raise InvalidWorkloadApiEndpoint.

    Accepts ``unix:///abs/path``, ``unix:/abs/path``, a plain absolute path, and
    ``tcp://IP:port`` (an IP address, not a host name, as the SPIFFE standard requires).
    """
    text = endpoint.strip()
    if not text:
        raise InvalidWorkloadApiEndpoint(endpoint, "address is empty")
    if text.startswith("/"):
        return "unix:" + text
    url = urlsplit(text)
    if url.scheme == "unix":
        if url.netloc:
            raise InvalidWorkloadApiEndpoint(
                endpoint, "unix address must not have a host; expected unix:///absolute/path"
            )
        if url.query or url.fragment:
            raise InvalidWorkloadApiEndpoint(endpoint, "unix address must not have a query")
        if not url.path.startswith("/"):
            raise InvalidWorkloadApiEndpoint(endpoint, "socket path must be absolute")
        return "unix:" + url.path
    if url.scheme == "tcp":
        if url.path not in ("", "/") or url.query or url.fragment or url.username:
            raise InvalidWorkloadApiEndpoint(endpoint, "tcp address must be tcp://IP:port only")
        try:
            host = ipaddress.ip_address(url.hostname or "")
            port = url.port
        except ValueError as err:
            raise InvalidWorkloadApiEndpoint(
                endpoint, f"tcp address needs an IP address and port: {err}"
            ) from None
        if port is None:
            raise InvalidWorkloadApiEndpoint(endpoint, "tcp address has no port")
        return f"ipv4:{host}:{port}" if host.version == 4 else f"ipv6:[{host}]:{port}"
    raise InvalidWorkloadApiEndpoint(
        endpoint, "expected unix:///absolute/path, an absolute path, or tcp://IP:port"
    )


def _error(err: grpc.RpcError) -> WorkloadApiError:
    code = err.code() if hasattr(err, "code") else None
    details = err.details() if hasattr(err, "details") else None
    name = code.name if code is not None else "UNKNOWN"
    return WorkloadApiError(name, details or str(err))


def _x509_context(response: workload_pb2.X509SVIDResponse) -> X509Context:
    svids: list[X509Svid] = []
    bundles: dict[TrustDomain, Bundle] = {}
    for svid in response.svids:
        parsed = X509Svid.parse(svid.x509_svid, svid.x509_svid_key, hint=svid.hint)
        svids.append(parsed)
        td = parsed.spiffe_id.trust_domain
        if td not in bundles and svid.bundle:
            bundles[td] = Bundle(td, X509Bundle.parse_der(td, svid.bundle).authorities)
    for key, der in response.federated_bundles.items():
        td = TrustDomain.parse(key)
        bundles.setdefault(td, Bundle(td, X509Bundle.parse_der(td, der).authorities))
    if not svids:
        raise WorkloadApiError("PERMISSION_DENIED", "the Workload API returned no X509-SVID")
    return X509Context(svids, BundleSet(bundles.values()))


class WorkloadApiClient:
    """A blocking client for the SPIFFE Workload API.

    ``socket`` defaults to ``$SPIFFE_ENDPOINT_SOCKET``; ``timeout`` (seconds) is the
    default deadline of the one-shot calls (not of :meth:`watch_x509_context`).
    """

    def __init__(self, socket: str | None = None, *, timeout: float | None = None) -> None:
        if socket is None:
            socket = os.environ.get(ENDPOINT_ENV)
            if not socket:
                raise InvalidWorkloadApiEndpoint(
                    "", f"no socket given and {ENDPOINT_ENV} is not set"
                )
        self.endpoint = socket
        self._timeout = timeout
        self._channel = grpc.insecure_channel(grpc_target(socket))
        self._stub: Any = workload_pb2_grpc.SpiffeWorkloadAPIStub(self._channel)

    def _deadline(self, timeout: float | None) -> float | None:
        return timeout if timeout is not None else self._timeout

    # -- X.509 --

    def fetch_x509_context(self, timeout: float | None = None) -> X509Context:
        """The caller's X509-SVIDs and the bundles (own + federated)."""
        stream = self._stub.FetchX509SVID(
            workload_pb2.X509SVIDRequest(), metadata=_HEADER, timeout=self._deadline(timeout)
        )
        try:
            response = next(stream)
        except grpc.RpcError as err:
            raise _error(err) from None
        except StopIteration:
            raise WorkloadApiError("UNAVAILABLE", "stream ended without a response") from None
        finally:
            stream.cancel()
        return _x509_context(response)

    def fetch_x509_svid(self, timeout: float | None = None) -> X509Svid:
        """The default (first) X509-SVID."""
        return self.fetch_x509_context(timeout).default_svid

    def fetch_x509_svids(self, timeout: float | None = None) -> list[X509Svid]:
        """All the caller's X509-SVIDs, default first."""
        return self.fetch_x509_context(timeout).svids

    def watch_x509_context(self, timeout: float | None = None) -> Iterator[X509Context]:
        """Yield the X.509 context now and on every change; ``timeout`` bounds the stream.

        Close the generator (or leave the loop) to cancel the stream.
        """
        stream = self._stub.FetchX509SVID(
            workload_pb2.X509SVIDRequest(), metadata=_HEADER, timeout=timeout
        )
        try:
            for response in stream:
                yield _x509_context(response)
        except grpc.RpcError as err:
            raise _error(err) from None
        finally:
            stream.cancel()

    def fetch_x509_bundles(self, timeout: float | None = None) -> BundleSet:
        """The X.509 authorities of the own and federated trust domains."""
        response = self._first(
            self._stub.FetchX509Bundles, workload_pb2.X509BundlesRequest(), timeout
        )
        out = BundleSet()
        for key, der in response.bundles.items():
            td = TrustDomain.parse(key)
            out.add(Bundle(td, X509Bundle.parse_der(td, der).authorities))
        return out

    # -- JWT --

    def fetch_jwt_svids(
        self,
        audience: Sequence[str],
        spiffe_id: SpiffeId | str | None = None,
        timeout: float | None = None,
    ) -> list[JwtSvid]:
        """A JWT-SVID per identity of the caller (or only ``spiffe_id``) for ``audience``."""
        audiences = [audience] if isinstance(audience, str) else list(audience)
        request = workload_pb2.JWTSVIDRequest(
            audience=audiences, spiffe_id=str(spiffe_id) if spiffe_id else ""
        )
        try:
            response = self._stub.FetchJWTSVID(
                request, metadata=_HEADER, timeout=self._deadline(timeout)
            )
        except grpc.RpcError as err:
            raise _error(err) from None
        if not response.svids:
            raise WorkloadApiError("PERMISSION_DENIED", "the Workload API returned no JWT-SVID")
        return [JwtSvid.parse_insecure(s.svid, audiences) for s in response.svids]

    def fetch_jwt_svid(
        self,
        audience: Sequence[str],
        spiffe_id: SpiffeId | str | None = None,
        timeout: float | None = None,
    ) -> JwtSvid:
        """The default (first) identity's JWT-SVID, or ``spiffe_id``'s, for ``audience``."""
        return self.fetch_jwt_svids(audience, spiffe_id, timeout)[0]

    def fetch_jwt_bundles(self, timeout: float | None = None) -> BundleSet:
        """The JWT signing keys of the own and federated trust domains."""
        response = self._first(
            self._stub.FetchJWTBundles, workload_pb2.JWTBundlesRequest(), timeout
        )
        out = BundleSet()
        for key, jwks in response.bundles.items():
            td = TrustDomain.parse(key)
            out.add(Bundle(td, jwt_authorities=JwtBundle.parse(td, jwks).keys))
        return out

    def validate_jwt_svid(
        self,
        token: str,
        audience: str,
        timeout: float | None = None,
        *,
        issuer: str | None = None,
    ) -> JwtSvid:
        """Have the Workload API validate ``token`` for ``audience``; return it parsed.

        With ``issuer``, the token's ``iss`` must also be exactly that
        (:class:`credo.errors.JwtIssuerMismatch`); without, tokens with or without ``iss``
        are accepted."""
        if not token or not audience:
            raise WorkloadApiError("INVALID_ARGUMENT", "token and audience must be non-empty")
        try:
            self._stub.ValidateJWTSVID(
                workload_pb2.ValidateJWTSVIDRequest(audience=audience, svid=token),
                metadata=_HEADER,
                timeout=self._deadline(timeout),
            )
        except grpc.RpcError as err:
            raise _error(err) from None
        return JwtSvid.parse_insecure(token, [audience], issuer=issuer)

    # -- WIT --

    def fetch_wit_svids(self, timeout: float | None = None) -> list[WorkloadWit]:
        """A WIT-SVID and its private key per identity of the caller (first = default)."""
        response = self._first(self._stub.FetchWITSVID, workload_pb2.WITSVIDRequest(), timeout)
        if not response.svids:
            raise WorkloadApiError("PERMISSION_DENIED", "the Workload API returned no WIT-SVID")
        out = []
        for item in response.svids:
            try:
                key = private_key_from_jwk(item.wit_svid_key)
            except ValueError as err:
                raise WorkloadApiError("INTERNAL", f"unusable WIT-SVID key: {err}") from None
            out.append(WorkloadWit(WitSvid.parse_insecure(item.wit_svid), key, item.hint))
        return out

    def fetch_wit_svid(self, timeout: float | None = None) -> WorkloadWit:
        """The default (first) identity's WIT-SVID and key."""
        return self.fetch_wit_svids(timeout)[0]

    def fetch_wit_bundles(self, timeout: float | None = None) -> BundleSet:
        """The WIT-SVID signing keys of the own and federated trust domains."""
        response = self._first(
            self._stub.FetchWITBundles, workload_pb2.WITBundlesRequest(), timeout
        )
        out = BundleSet()
        for key, jwks in response.bundles.items():
            td = TrustDomain.parse(key)
            out.add(Bundle(td, wit_authorities=WitBundle.parse(td, jwks).keys))
        return out

    # -- plumbing --

    def _first(self, method: Any, request: Any, timeout: float | None) -> Any:
        stream = method(request, metadata=_HEADER, timeout=self._deadline(timeout))
        try:
            return next(stream)
        except grpc.RpcError as err:
            raise _error(err) from None
        except StopIteration:
            raise WorkloadApiError("UNAVAILABLE", "stream ended without a response") from None
        finally:
            stream.cancel()

    def close(self) -> None:
        """Close the connection."""
        self._channel.close()

    def __enter__(self) -> WorkloadApiClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
