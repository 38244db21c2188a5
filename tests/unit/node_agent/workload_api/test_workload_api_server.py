"""The Workload API server, driven by py-spiffe's client and raw gRPC calls over a real socket."""

from __future__ import annotations

import os
import queue
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
import spiffe
from spiffe.spiffe_id.spiffe_id import SpiffeId as PySpiffeId
from workload_api_fakes import MY_UID, Api

from credo._proto import workload_pb2, workload_pb2_grpc
from credo.bundle import Bundle, WitBundle
from credo.keys import generate_private_key
from credo.witsvid import WitSvid, private_key_from_jwk
from credo.wpt import create_wpt, verify_wpt
from node_agent.cache.errors import (
    JwtSvidRateLimited,
    JwtSvidRefused,
    JwtSvidUnavailable,
    WitSvidUnavailable,
)

HEADER = (("workload.spiffe.io", "true"),)


def _stub(api: Api) -> tuple[grpc.Channel, Any]:
    channel = grpc.insecure_channel("unix:" + api.socket_path)
    return channel, workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)


def _code_of_stream(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        next(call)
    return info.value.code()


def test_socket_is_world_accessible(api: Api) -> None:
    """The public socket is mode 0777 in a 0755 directory, so any local process may connect."""
    assert stat.S_IMODE(os.stat(api.socket_path).st_mode) == 0o777
    assert stat.S_IMODE(os.stat(os.path.dirname(api.socket_path)).st_mode) == 0o755


def test_pyspiffe_fetches_x509_context(api: Api) -> None:
    """py-spiffe fetches the caller's X509-SVID, its key, and own + federated bundles."""
    identity = api.manager.add([MY_UID], "spiffe://example.org/workload", hint="main")
    with spiffe.WorkloadApiClient(api.endpoint) as client:
        ctx = client.fetch_x509_context()
    svid = ctx.default_svid
    assert str(svid.spiffe_id) == "spiffe://example.org/workload"
    assert svid.leaf.serial_number == identity.svid.leaf.serial_number
    for td in ("example.org", "partner.org"):
        bundle = ctx.x509_bundle_set.get_bundle_for_trust_domain(spiffe.TrustDomain(td))
        assert bundle is not None and len(bundle.x509_authorities) == 1


def test_two_identities_first_is_default(api: Api) -> None:
    """Both matching identities come back in order, and the first is the default."""
    api.manager.add([MY_UID], "spiffe://example.org/first", hint="a")
    api.manager.add([MY_UID], "spiffe://example.org/second", hint="b")
    with spiffe.WorkloadApiClient(api.endpoint) as client:
        svids = client.fetch_x509_svids()
        default = client.fetch_x509_svid()
    assert [str(s.spiffe_id) for s in svids] == [
        "spiffe://example.org/first",
        "spiffe://example.org/second",
    ]
    assert str(default.spiffe_id) == "spiffe://example.org/first"
    channel, stub = _stub(api)
    with channel:
        response = next(stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER))
    assert [s.hint for s in response.svids] == ["a", "b"]
    assert set(response.federated_bundles) == {"spiffe://partner.org"}


def test_pyspiffe_jwt_svid_bundles_and_validation(api: Api) -> None:
    """py-spiffe fetches a JWT-SVID and JWT bundles, and the server validates the token."""
    api.manager.add([MY_UID], "spiffe://example.org/workload")
    with spiffe.WorkloadApiClient(api.endpoint) as client:
        jwt = client.fetch_jwt_svid({"db"})
        assert str(jwt.spiffe_id) == "spiffe://example.org/workload"
        bundles = client.fetch_jwt_bundles()
        own = bundles.get_bundle_for_trust_domain(spiffe.TrustDomain("example.org"))
        assert own is not None and own.get_jwt_authority(api.manager.ca.kid) is not None
        validated = client.validate_jwt_svid(jwt.token, "db")
        assert str(validated.spiffe_id) == "spiffe://example.org/workload"
    channel, stub = _stub(api)
    with channel:
        response = stub.ValidateJWTSVID(
            workload_pb2.ValidateJWTSVIDRequest(audience="db", svid=jwt.token), metadata=HEADER
        )
    assert response.spiffe_id == "spiffe://example.org/workload"
    assert list(response.claims["aud"]) == ["db"]
    assert response.claims["sub"] == "spiffe://example.org/workload"


def test_validate_rejects_bad_token_and_wrong_audience(api: Api) -> None:
    """A garbage token or a wrong audience is INVALID_ARGUMENT with the reason."""
    api.manager.add([MY_UID], "spiffe://example.org/workload")
    token = api.loop.run(api.manager.fetch_jwt_svid(api.manager.entries[0][1], ("db",)))
    channel, stub = _stub(api)
    with channel:
        for audience, svid in (("db", "not.a.jwt"), ("other", token), ("", token), ("db", "")):
            with pytest.raises(grpc.RpcError) as info:
                stub.ValidateJWTSVID(
                    workload_pb2.ValidateJWTSVIDRequest(audience=audience, svid=svid),
                    metadata=HEADER,
                )
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_pyspiffe_stream_receives_update(api: Api) -> None:
    """py-spiffe's X.509 context stream gets a new message after the manager rotates the SVID."""
    api.manager.add([MY_UID], "spiffe://example.org/workload")
    updates: queue.Queue[Any] = queue.Queue()
    with spiffe.WorkloadApiClient(api.endpoint) as client:
        handler = client.stream_x509_contexts(updates.put, updates.put, retry_connect=False)
        try:
            first = updates.get(timeout=10)
            rotated = api.manager.ca.issue("spiffe://example.org/workload")
            entry_selectors, old = api.manager.entries[0]
            api.manager.entries[0] = (
                entry_selectors,
                type(old)(old.entry_id, old.spiffe_id, rotated, old.hint),
            )
            api.loop.run(api.manager.push())
            second = updates.get(timeout=10)
        finally:
            handler.cancel()
    assert first.default_svid.leaf.serial_number == old.svid.leaf.serial_number
    assert second.default_svid.leaf.serial_number == rotated.leaf.serial_number


def _first_x509_response(api: Api) -> workload_pb2.X509SVIDResponse:
    """The first FetchX509SVID message on a new connection."""
    channel, stub = _stub(api)
    with channel:
        call = stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER, timeout=10)
        response: workload_pb2.X509SVIDResponse = next(call)
        call.cancel()
    return response


def test_x509_response_is_built_once_and_again_when_the_svid_rotates(api: Api) -> None:
    """New connections of a workload share one built response; a rotated SVID (a new
    object) is a new one, so no connection after the rotation gets the old SVID."""
    api.manager.add([MY_UID], "spiffe://example.org/workload")
    servicer = api.server.servicer
    first = _first_x509_response(api)
    again = _first_x509_response(api)
    assert again == first
    assert servicer.x509_responses.built == 1
    entry_selectors, old = api.manager.entries[0]
    rotated = api.manager.ca.issue("spiffe://example.org/workload")
    api.manager.entries[0] = (
        entry_selectors,
        type(old)(old.entry_id, old.spiffe_id, rotated, old.hint),
    )
    after = _first_x509_response(api)
    assert after.svids[0].x509_svid == rotated.marshal_chain_der()
    assert after.svids[0].x509_svid_key == rotated.marshal_key_der()
    assert after.svids[0].x509_svid != first.svids[0].x509_svid
    assert servicer.x509_responses.built == 2
    api.manager.crl_ders = (b"a CRL",)  # any other part of the response changing counts too
    assert list(_first_x509_response(api).crl) == [b"a CRL"]
    assert servicer.x509_responses.built == 3


def test_stream_ends_with_permission_denied_when_identity_removed(api: Api) -> None:
    """When the caller loses its last identity, the X509-SVID stream ends PERMISSION_DENIED."""
    api.manager.add([MY_UID], "spiffe://example.org/workload")
    channel, stub = _stub(api)
    with channel:
        call = stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER)
        assert len(next(call).svids) == 1
        api.manager.entries.clear()
        api.loop.run(api.manager.push())
        assert _code_of_stream(call) == grpc.StatusCode.PERMISSION_DENIED


def test_bundle_streams(api: Api) -> None:
    """X.509 and JWT bundle streams key bundles by trust domain SPIFFE ID."""
    api.manager.add([MY_UID], "spiffe://example.org/workload")
    channel, stub = _stub(api)
    with channel:
        x509 = next(stub.FetchX509Bundles(workload_pb2.X509BundlesRequest(), metadata=HEADER))
        jwt = next(stub.FetchJWTBundles(workload_pb2.JWTBundlesRequest(), metadata=HEADER))
    assert set(x509.bundles) == {"spiffe://example.org", "spiffe://partner.org"}
    assert set(jwt.bundles) == {"spiffe://example.org", "spiffe://partner.org"}
    assert b'"keys"' in jwt.bundles["spiffe://example.org"]


def test_missing_security_header_is_invalid_argument(api: Api) -> None:
    """Every method answers INVALID_ARGUMENT when the security header is missing."""
    api.manager.add([MY_UID], "spiffe://example.org/workload")
    channel, stub = _stub(api)
    with channel:
        assert (
            _code_of_stream(stub.FetchX509SVID(workload_pb2.X509SVIDRequest()))
            == grpc.StatusCode.INVALID_ARGUMENT
        )
        assert (
            _code_of_stream(
                stub.FetchX509SVID(
                    workload_pb2.X509SVIDRequest(), metadata=(("workload.spiffe.io", "false"),)
                )
            )
            == grpc.StatusCode.INVALID_ARGUMENT
        )
        with pytest.raises(grpc.RpcError) as info:
            stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=["db"]))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "security header missing from request" in (info.value.details() or "")


def test_uid_without_entry_is_permission_denied(api: Api) -> None:
    """A caller whose uid matches no entry gets PERMISSION_DENIED on every SVID/bundle call."""
    api.manager.add([f"unix:uid:{os.getuid() + 4242}"], "spiffe://example.org/other")
    channel, stub = _stub(api)
    with channel:
        for call in (
            stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER),
            stub.FetchX509Bundles(workload_pb2.X509BundlesRequest(), metadata=HEADER),
            stub.FetchJWTBundles(workload_pb2.JWTBundlesRequest(), metadata=HEADER),
        ):
            assert _code_of_stream(call) == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as info:
            stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=["db"]), metadata=HEADER)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert info.value.details() == "no identity issued"


def test_jwt_svid_for_foreign_spiffe_id_is_permission_denied(api: Api) -> None:
    """Asking for a JWT-SVID of an identity the caller does not have is PERMISSION_DENIED."""
    api.manager.add([MY_UID], "spiffe://example.org/mine")
    api.manager.add(["unix:uid:999999"], "spiffe://example.org/theirs")
    channel, stub = _stub(api)
    with channel:
        with pytest.raises(grpc.RpcError) as info:
            stub.FetchJWTSVID(
                workload_pb2.JWTSVIDRequest(
                    audience=["db"], spiffe_id="spiffe://example.org/theirs"
                ),
                metadata=HEADER,
            )
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as info:
            stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(), metadata=HEADER)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        mine = stub.FetchJWTSVID(
            workload_pb2.JWTSVIDRequest(audience=["db"], spiffe_id="spiffe://example.org/mine"),
            metadata=HEADER,
        )
    assert [s.spiffe_id for s in mine.svids] == ["spiffe://example.org/mine"]
    with (
        spiffe.WorkloadApiClient(api.endpoint) as client,
        pytest.raises(spiffe.workloadapi.errors.FetchJwtSvidError),
    ):
        client.fetch_jwt_svid({"db"}, PySpiffeId("spiffe://example.org/theirs"))


@pytest.mark.parametrize(
    ("error", "code", "words"),
    [
        (
            JwtSvidRefused("spiffe://example.org/w", "INVALID_ARGUMENT", "audience: empty"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "audience: empty",
        ),
        (
            JwtSvidRefused("spiffe://example.org/w", "NOT_FOUND", "entry not authorized"),
            grpc.StatusCode.PERMISSION_DENIED,
            "entry not authorized",
        ),
        (
            JwtSvidRateLimited("the server rate-limited JWT-SVIDs"),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "rate limited",
        ),
        (
            JwtSvidUnavailable("server 127.0.0.1:1 unreachable"),
            grpc.StatusCode.UNAVAILABLE,
            "unreachable",
        ),
    ],
)
def test_server_refusal_of_a_jwt_svid_keeps_its_status_and_reason(
    api: Api, error: Exception, code: grpc.StatusCode, words: str
) -> None:
    """A JWT-SVID the server refused reaches the workload with the server's status (bad
    request, not authorized, rate limited) and reason; only an unreachable server is
    UNAVAILABLE."""
    api.manager.add([MY_UID], "spiffe://example.org/w")
    api.manager.jwt_error = error
    channel, stub = _stub(api)
    with channel, pytest.raises(grpc.RpcError) as info:
        stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=["db"]), metadata=HEADER)
    assert info.value.code() == code
    assert words in (info.value.details() or "")


def test_rate_limited_jwt_svid_call_is_logged_with_the_caller(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    """A JWT-SVID call refused because the server rate-limits is logged at info with the
    caller's pid, uid and selectors and the reason."""
    api.manager.add([MY_UID], "spiffe://example.org/w")
    api.manager.jwt_error = JwtSvidRateLimited("the server rate-limited JWT-SVIDs")
    caplog.set_level("INFO", logger="node_agent.workload_api.handler")
    channel, stub = _stub(api)
    with channel, pytest.raises(grpc.RpcError):
        stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=["db"]), metadata=HEADER)
    (record,) = [r for r in caplog.records if r.getMessage() == "workload call refused"]
    assert record.levelname == "INFO"
    assert record.__dict__["reason"] == "rate limited by the server"
    assert record.__dict__["pid"] == os.getpid() and record.__dict__["uid"] == os.getuid()
    assert MY_UID in record.__dict__["selectors"]


@pytest.mark.parametrize(
    ("unsigned", "reason"),
    [
        (0, "no registration entry matches the caller's selectors"),
        (2, "2 matching entries have no X509-SVID yet (not signed by the server, or refused)"),
    ],
)
def test_refused_x509_call_is_logged_with_why_nothing_was_served(
    api: Api, caplog: pytest.LogCaptureFixture, unsigned: int, reason: str
) -> None:
    """A caller with no identity is logged at info with its selectors and why: no entry
    matches, or matching entries have no SVID yet."""
    api.manager.unsigned = unsigned
    caplog.set_level("INFO", logger="node_agent.workload_api.handler")
    channel, stub = _stub(api)
    with channel:
        assert (
            _code_of_stream(stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER))
            == grpc.StatusCode.PERMISSION_DENIED
        )
    (record,) = [r for r in caplog.records if r.getMessage() == "workload call refused"]
    assert record.levelname == "INFO" and record.__dict__["reason"] == reason
    assert record.__dict__["method"] == "FetchX509SVID" and MY_UID in record.__dict__["selectors"]


def test_one_jwt_svid_per_identity(api: Api) -> None:
    """Without spiffe_id, FetchJWTSVID returns a JWT-SVID for each identity, with hints."""
    api.manager.add([MY_UID], "spiffe://example.org/a", hint="ha")
    api.manager.add([MY_UID], "spiffe://example.org/b", hint="hb")
    channel, stub = _stub(api)
    with channel:
        response = stub.FetchJWTSVID(
            workload_pb2.JWTSVIDRequest(audience=["x", "y"]), metadata=HEADER
        )
    assert [(s.spiffe_id, s.hint) for s in response.svids] == [
        ("spiffe://example.org/a", "ha"),
        ("spiffe://example.org/b", "hb"),
    ]
    assert api.manager.jwt_requests[-1] == ("spiffe://example.org/b", ("x", "y"))


def test_fetch_wit_svid_streams_token_and_key(api: Api) -> None:
    """FetchWITSVID sends a WIT-SVID and its JWK private key per identity, with hints; a
    proof made with that key verifies against the WIT bundle from FetchWITBundles."""
    api.manager.add([MY_UID], "spiffe://example.org/a", hint="ha")
    api.manager.add([MY_UID], "spiffe://example.org/b")
    channel, stub = _stub(api)
    with channel:
        call = stub.FetchWITSVID(workload_pb2.WITSVIDRequest(), metadata=HEADER)
        response = next(call)
        call.cancel()
        bundles = next(stub.FetchWITBundles(workload_pb2.WITBundlesRequest(), metadata=HEADER))
    assert [(s.spiffe_id, s.hint) for s in response.svids] == [
        ("spiffe://example.org/a", "ha"),
        ("spiffe://example.org/b", ""),
    ]
    assert set(bundles.bundles) == {"spiffe://example.org", "spiffe://partner.org"}
    wit_bundle = WitBundle.parse("example.org", bundles.bundles["spiffe://example.org"])
    first = response.svids[0]
    wit = WitSvid.parse_and_validate(first.wit_svid, wit_bundle)
    proof = create_wpt(wit, private_key_from_jwk(first.wit_svid_key), "https://b/")
    assert verify_wpt(proof, wit, "https://b/").spiffe_id == "spiffe://example.org/a"


def test_fetch_wit_svid_pushes_a_renewed_wit(api: Api) -> None:
    """When its WITs are due, the stream fetches again and pushes the new ones."""
    api.manager.add([MY_UID], "spiffe://example.org/a")
    api.manager.wit_refresh_at = 0.0  # always due: every wake-up fetches new WITs
    channel, stub = _stub(api)
    with channel:
        call = stub.FetchWITSVID(workload_pb2.WITSVIDRequest(), metadata=HEADER)
        first, second = next(call), next(call)
        call.cancel()
    assert first.svids[0].wit_svid != second.svids[0].wit_svid
    assert len(api.manager.wit_requests) >= 2


def test_fetch_wit_svid_unavailable_and_no_identity(api: Api) -> None:
    """No identity: PERMISSION_DENIED; no WIT obtainable: UNAVAILABLE."""
    channel, stub = _stub(api)
    with channel:
        call = stub.FetchWITSVID(workload_pb2.WITSVIDRequest(), metadata=HEADER)
        assert _code_of_stream(call) == grpc.StatusCode.PERMISSION_DENIED
        api.manager.add([MY_UID], "spiffe://example.org/a")
        api.manager.wit_error = WitSvidUnavailable("no WIT-SVID could be issued: down")
        call = stub.FetchWITSVID(workload_pb2.WITSVIDRequest(), metadata=HEADER)
        assert _code_of_stream(call) == grpc.StatusCode.UNAVAILABLE


def test_connection_passed_to_child_after_parent_exit_is_refused(api: Api) -> None:
    """A connection opened by a process that then exits, used by its child, is PERMISSION_DENIED."""
    api.manager.add([MY_UID], "spiffe://example.org/workload")
    helper = Path(__file__).with_name("pidreuse_helper.py")
    proc = subprocess.Popen(
        [sys.executable, str(helper), api.socket_path],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline().strip() for _ in range(2)]
    finally:
        proc.wait(timeout=20)
    parent_pid, result = lines
    assert int(parent_pid) == proc.pid
    assert result == "PERMISSION_DENIED"


def test_connection_used_by_its_opener_succeeds(api: Api) -> None:
    """The same helper, when the opener itself makes the call, gets its identity (control case)."""
    api.manager.add([MY_UID], "spiffe://example.org/workload")
    helper = Path(__file__).with_name("pidreuse_helper.py")
    out = subprocess.run(
        [sys.executable, str(helper), api.socket_path, "--no-fork"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert out.stdout.split()[1] == "OK:spiffe://example.org/workload", out.stderr


def test_untracked_connection_is_refused(api: Api) -> None:
    """A call that bypasses the relay (straight to the internal socket) is PERMISSION_DENIED."""
    api.manager.add([MY_UID], "spiffe://example.org/workload")
    proxy = api.server._proxy
    assert proxy is not None
    assert stat.S_IMODE(os.stat(proxy.private_dir).st_mode) == 0o700
    with grpc.insecure_channel(proxy.internal_address) as channel:
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
        call = stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER)
        assert _code_of_stream(call) == grpc.StatusCode.PERMISSION_DENIED


def test_jwt_only_federated_bundle_is_left_out_of_x509_responses(api: Api) -> None:
    """A federated trust domain with JWT authorities only (X509-SVID 6.2) gets no empty entry
    in the X.509 responses, so standard clients still parse the caller's X.509 context; its
    JWT authorities are still served."""
    jwt_only = Bundle("jwtonly.org", jwt_authorities={"k1": generate_private_key().public_key()})
    federated = api.manager.federated_bundles()
    api.manager.federated_bundles = lambda: {**federated, "jwtonly.org": jwt_only}  # type: ignore[method-assign]
    api.manager.add([MY_UID], "spiffe://example.org/workload")
    with spiffe.WorkloadApiClient(api.endpoint) as client:
        ctx = client.fetch_x509_context()
        assert str(ctx.default_svid.spiffe_id) == "spiffe://example.org/workload"
        jwt_bundles = client.fetch_jwt_bundles()
    assert jwt_bundles.get_bundle_for_trust_domain(spiffe.TrustDomain("jwtonly.org")) is not None
    channel, stub = _stub(api)
    with channel:
        svids = next(stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER))
        bundles = next(stub.FetchX509Bundles(workload_pb2.X509BundlesRequest(), metadata=HEADER))
    assert set(svids.federated_bundles) == {"spiffe://partner.org"}
    assert set(bundles.bundles) == {"spiffe://example.org", "spiffe://partner.org"}
