"""credo.workload_client against a real Workload API server (fake manager, real certs)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from credo.errors import InvalidWorkloadApiEndpoint, WorkloadApiError
from credo.spiffe_id import TrustDomain
from credo.workload_client import WorkloadApiClient, grpc_target
from node_agent.workload.unix import UnixAttestor, UnixAttestorConfig
from node_agent.workload_api.server import WorkloadApiServer, WorkloadApiServerConfig

_FAKES = Path(__file__).parents[1] / "node_agent" / "workload_api" / "fakes.py"
if "workload_api_fakes" not in sys.modules:
    _spec = importlib.util.spec_from_file_location("workload_api_fakes", _FAKES)
    assert _spec is not None and _spec.loader is not None
    _mod = importlib.util.module_from_spec(_spec)
    sys.modules["workload_api_fakes"] = _mod
    _spec.loader.exec_module(_mod)
fakes: Any = sys.modules["workload_api_fakes"]


@pytest.fixture
def api() -> Iterator[Any]:
    """A running Workload API server whose fake manager gives this uid two identities."""
    d = tempfile.mkdtemp(prefix="credo-c-", dir="/tmp")
    loop = fakes.LoopThread()
    manager = fakes.FakeManager(fakes.FakeCa("example.org"), [fakes.FakeCa("partner.org")])
    manager.add([fakes.MY_UID], "spiffe://example.org/one", hint="first")
    manager.add([fakes.MY_UID], "spiffe://example.org/two", hint="second")
    path = os.path.join(d, "api.sock")
    server = WorkloadApiServer(
        WorkloadApiServerConfig(socket_path=path),
        manager,
        UnixAttestor(UnixAttestorConfig(discover_workload_path=False)),
    )
    loop.run(server.start())
    try:
        yield fakes.Api(path, manager, loop, server)
    finally:
        loop.run(server.stop(0))
        loop.close()
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize(
    ("endpoint", "target"),
    [
        ("unix:///run/a.sock", "unix:/run/a.sock"),
        ("unix:/run/a.sock", "unix:/run/a.sock"),
        ("/run/a.sock", "unix:/run/a.sock"),
        ("tcp://127.0.0.1:8081", "ipv4:127.0.0.1:8081"),
        ("tcp://[::1]:8081", "ipv6:[::1]:8081"),
    ],
)
def test_endpoint_forms(endpoint: str, target: str) -> None:
    """Each accepted SPIFFE_ENDPOINT_SOCKET form maps to the right gRPC target."""
    assert grpc_target(endpoint) == target


@pytest.mark.parametrize(
    "endpoint",
    [
        "",
        "relative.sock",
        "unix://host/a.sock",
        "unix:rel",
        "tcp://localhost:1",
        "tcp://1.2.3.4",
        "http://1.2.3.4:5",
        "unix:///a.sock?x=1",
    ],
)
def test_bad_endpoints_raise(endpoint: str) -> None:
    """Malformed endpoints raise InvalidWorkloadApiEndpoint with a reason."""
    with pytest.raises(InvalidWorkloadApiEndpoint):
        grpc_target(endpoint)


def test_endpoint_from_environment(monkeypatch: pytest.MonkeyPatch, api: Any) -> None:
    """With no socket argument the client reads SPIFFE_ENDPOINT_SOCKET."""
    monkeypatch.setenv("SPIFFE_ENDPOINT_SOCKET", api.endpoint)
    with WorkloadApiClient() as client:
        assert client.endpoint == api.endpoint
        assert str(client.fetch_x509_svid().spiffe_id) == "spiffe://example.org/one"
    monkeypatch.delenv("SPIFFE_ENDPOINT_SOCKET")
    with pytest.raises(InvalidWorkloadApiEndpoint):
        WorkloadApiClient()


def test_fetch_x509_context(api: Any) -> None:
    """The X.509 context holds both SVIDs with hints (first = default) and both bundles."""
    with WorkloadApiClient(api.endpoint, timeout=10) as client:
        ctx = client.fetch_x509_context()
    assert [(str(s.spiffe_id), s.hint) for s in ctx.svids] == [
        ("spiffe://example.org/one", "first"),
        ("spiffe://example.org/two", "second"),
    ]
    assert ctx.default_svid.private_key.public_key() == ctx.default_svid.leaf.public_key()
    assert {td.name for td in ctx.bundles} == {"example.org", "partner.org"}
    own = ctx.bundles[TrustDomain("example.org")]
    assert own.x509_authorities == (api.manager.ca.cert,)


def test_fetch_and_validate_jwt(api: Any) -> None:
    """JWT-SVIDs are fetched (per identity or one chosen) and validated by the server."""
    with WorkloadApiClient(api.endpoint, timeout=10) as client:
        all_svids = client.fetch_jwt_svids(["db"])
        assert [str(s.spiffe_id) for s in all_svids] == [
            "spiffe://example.org/one",
            "spiffe://example.org/two",
        ]
        two = client.fetch_jwt_svid(["db"], spiffe_id="spiffe://example.org/two")
        assert str(two.spiffe_id) == "spiffe://example.org/two"
        validated = client.validate_jwt_svid(two.token, "db")
        assert validated.claims["sub"] == "spiffe://example.org/two"
        with pytest.raises(WorkloadApiError) as info:
            client.validate_jwt_svid(two.token, "other")
        assert info.value.code == "INVALID_ARGUMENT"
        with pytest.raises(WorkloadApiError) as info:
            client.fetch_jwt_svid(["db"], spiffe_id="spiffe://example.org/nope")
        assert info.value.code == "PERMISSION_DENIED"


def test_fetch_bundles(api: Any) -> None:
    """X.509 and JWT bundles come back for the own and federated trust domains."""
    with WorkloadApiClient(api.endpoint, timeout=10) as client:
        x509 = client.fetch_x509_bundles()
        jwt = client.fetch_jwt_bundles()
    assert {td.name for td in x509} == {"example.org", "partner.org"}
    own = jwt[TrustDomain("example.org")]
    assert api.manager.ca.kid in own.jwt_authorities


def test_watch_x509_context_sees_update(api: Any) -> None:
    """watch_x509_context yields the current context and another after a change."""
    with WorkloadApiClient(api.endpoint) as client:
        stream = client.watch_x509_context(timeout=20)
        first = next(stream)
        api.manager.entries.pop()
        api.loop.run(api.manager.push())
        second = next(stream)
        stream.close()
    assert len(first.svids) == 2
    assert len(second.svids) == 1


def test_no_identity_is_permission_denied(api: Any) -> None:
    """A caller without identities gets WorkloadApiError(PERMISSION_DENIED)."""
    api.manager.entries.clear()
    with (
        WorkloadApiClient(api.endpoint, timeout=10) as client,
        pytest.raises(WorkloadApiError) as info,
    ):
        client.fetch_x509_context()
    assert info.value.code == "PERMISSION_DENIED"
    assert "no identity issued" in str(info.value)


def test_unreachable_socket_is_unavailable(tmp_path: Path) -> None:
    """A socket path nobody listens on raises WorkloadApiError(UNAVAILABLE)."""
    with (
        WorkloadApiClient(str(tmp_path / "none.sock"), timeout=5) as client,
        pytest.raises(WorkloadApiError) as info,
    ):
        client.fetch_x509_context()
    assert info.value.code == "UNAVAILABLE"
