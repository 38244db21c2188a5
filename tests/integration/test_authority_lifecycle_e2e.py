"""Local authority lifecycle and federation, end to end on real processes.

A real `credo-server run` and a real `credo-agent run`; the operator drives the X.509 CA
and the JWT signing key through `credo-server localauthority ... prepare|activate|taint|
revoke`, and a workload (this process, `unix:uid:<me>`) watches what the agent serves over
the Workload API. The X.509-SVID TTL is long (30 min), so no SVID seen here comes from
ordinary half-life renewal: a new one can only be the agent reacting to the authority
change. The last test federates with a second server's trust domain.
"""

from __future__ import annotations

import base64
import json
import queue
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from credo import verify_x509_svid
from credo._proto import workload_pb2, workload_pb2_grpc
from credo.bundle import X509Bundle, load_certificates
from tests.helpers.processes import (
    AgentProcess,
    ServerProcess,
    create_entry,
    credo_agent_command,
    short_temp_dir,
    start_agent,
    start_server,
    wait_for,
)

spiffe = pytest.importorskip("spiffe")

TD = "example.org"
TD_ID = f"spiffe://{TD}"
OTHER_TD = "other.org"
OTHER_TD_ID = f"spiffe://{OTHER_TD}"
WORKLOAD = f"{TD_ID}/lifecycle/workload"
HEADER = (("workload.spiffe.io", "true"),)
CALL_TIMEOUT = 30.0
# Long enough that half-life renewal cannot explain a new SVID during a test.
LONG_SVID_TTL = "30m"
# Generous: the agent reacts at once; a loaded 2-core box may still take a while.
REACT_TIMEOUT = 60.0


# --- helpers ---------------------------------------------------------------------------


@dataclass
class Deployment:
    server: ServerProcess
    agent: AgentProcess
    entry_id: str


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    """A server (30 min X.509-SVID TTL), a joined agent and one entry for this uid."""
    root = short_temp_dir("credo-la-")
    try:
        with (
            start_server(tmp_path / "srv", x509_svid_ttl=LONG_SVID_TTL) as server,
            start_agent(server, root) as agent,
        ):
            entry_id = create_entry(server, agent.spiffe_id, WORKLOAD)
            wait_for(lambda: agent.fetch_ids() == [WORKLOAD], REACT_TIMEOUT, "the SVID")
            yield Deployment(server, agent, entry_id)
    finally:
        shutil.rmtree(root, ignore_errors=True)


class RawStream:
    """A server-streaming Workload API call read on a thread; messages land in a queue."""

    def __init__(self, agent: AgentProcess, method: str, request: Any) -> None:
        self._channel = grpc.insecure_channel(f"unix:{agent.socket}")
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(self._channel)
        self._call = getattr(stub, method)(request, metadata=HEADER)
        self.messages: queue.Queue[Any] = queue.Queue()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for message in self._call:
                self.messages.put(message)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.CANCELLED:
                self.error = err

    def wait_for(self, predicate: Callable[[Any], bool], timeout: float, what: str) -> Any:
        """The first message (from now on) that satisfies ``predicate``."""
        return _wait_in_queue(self.messages, predicate, timeout, what, lambda: self.error)

    def close(self) -> None:
        self._call.cancel()
        self._thread.join(10)
        self._channel.close()


def _wait_in_queue(
    messages: queue.Queue[Any],
    predicate: Callable[[Any], bool],
    timeout: float,
    what: str,
    error: Callable[[], Any],
) -> Any:
    deadline = time.monotonic() + timeout
    seen = 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(
                f"timed out after {timeout}s waiting for {what} ({seen} updates seen; "
                f"stream error: {error()})"
            )
        try:
            message = messages.get(timeout=min(left, 1.0))
        except queue.Empty:
            continue
        seen += 1
        if predicate(message):
            return message


def _ski(cert: x509.Certificate) -> str:
    return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest.hex()


def _aki(cert: x509.Certificate) -> str:
    ext = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert ext.key_identifier is not None
    return ext.key_identifier.hex()


def _der_certs(data: bytes) -> list[x509.Certificate]:
    """Concatenated DER certificates (as in the Workload API's bundle fields)."""
    return load_certificates(data)


def _authority_state(server: ServerProcess, kind: str) -> dict[str, Any]:
    return server.cli_json("localauthority", kind, "show")  # type: ignore[no-any-return]


def _rotate(server: ServerProcess, kind: str) -> tuple[str, str]:
    """prepare + activate; (old authority id, new authority id)."""
    old = _authority_state(server, kind)["active"]["authority_id"]
    new = server.cli_json("localauthority", kind, "prepare")["authority_id"]
    assert new != old
    activated = server.cli_json("localauthority", kind, "activate", "--authority-id", new)
    assert activated["authority_id"] == new and activated["status"] == "active", activated
    state = _authority_state(server, kind)
    assert state["active"]["authority_id"] == new, state
    assert state["old"]["authority_id"] == old, state
    return old, new


def _jwt_header(token: str) -> dict[str, Any]:
    head = token.split(".")[0]
    return json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))  # type: ignore[no-any-return]


def _jwt_kids(jwks: bytes) -> set[str]:
    return {key["kid"] for key in json.loads(jwks)["keys"] if "kid" in key}


def _fetch_jwt(agent: AgentProcess, audience: str) -> str:
    with grpc.insecure_channel(f"unix:{agent.socket}") as channel:
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
        reply = stub.FetchJWTSVID(
            workload_pb2.JWTSVIDRequest(audience=[audience]), metadata=HEADER, timeout=CALL_TIMEOUT
        )
    assert [s.spiffe_id for s in reply.svids] == [WORKLOAD]
    return str(reply.svids[0].svid)


def _validate_jwt(agent: AgentProcess, token: str, audience: str) -> Any:
    with grpc.insecure_channel(f"unix:{agent.socket}") as channel:
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
        return stub.ValidateJWTSVID(
            workload_pb2.ValidateJWTSVIDRequest(audience=audience, svid=token),
            metadata=HEADER,
            timeout=CALL_TIMEOUT,
        )


def _context_issuer(context: Any) -> str:
    """The SKI (hex) of the CA that signed the default SVID's leaf (its AKI)."""
    return _aki(context.default_svid.leaf)


def _context_own_authorities(context: Any) -> set[str]:
    bundle = context.x509_bundle_set.get_bundle_for_trust_domain(spiffe.TrustDomain(TD))
    assert bundle is not None
    return {_ski(c) for c in bundle.x509_authorities}


# --- 1. taint: re-issued at once -------------------------------------------------------


def test_tainting_the_old_x509_authority_reissues_svids_at_once(deployment: Deployment) -> None:
    """Tainting the old X.509 CA pushes, on an open X.509 context stream, a new SVID signed
    by the new CA, long before the 30 min SVID's half-life."""
    server, agent = deployment.server, deployment.agent
    updates: queue.Queue[Any] = queue.Queue()
    errors: list[Exception] = []
    client = agent.client()
    handle = client.stream_x509_contexts(on_success=updates.put, on_error=errors.append)
    try:
        first = updates.get(timeout=CALL_TIMEOUT)
        old, new = _rotate(server, "x509")
        assert _context_issuer(first) == old
        first_serial = first.default_svid.leaf.serial_number

        server.cli_json("localauthority", "x509", "taint", "--authority-id", old)
        assert _authority_state(server, "x509")["old"]["tainted"] is True

        reissued = _wait_in_queue(
            updates,
            lambda ctx: _context_issuer(ctx) == new,
            REACT_TIMEOUT,
            "an SVID signed by the new CA",
            lambda: errors,
        )
    finally:
        handle.cancel()
        client.close()
    leaf = reissued.default_svid.leaf
    assert str(reissued.default_svid.spiffe_id) == WORKLOAD
    assert leaf.serial_number != first_serial
    # The new CA is in the bundle served with it, and the chain verifies against it alone.
    own = reissued.x509_bundle_set.get_bundle_for_trust_domain(spiffe.TrustDomain(TD))
    new_ca = next(c for c in own.x509_authorities if _ski(c) == new)
    leaf.verify_directly_issued_by(new_ca)
    assert not errors, errors


# --- 2. revoke: the old CA leaves the bundle ---------------------------------------------


def test_revoking_the_old_x509_authority_removes_it_from_workload_bundles(
    deployment: Deployment,
) -> None:
    """After taint and revoke, the old CA is gone from the workload's X.509 bundles (pushed
    on an open FetchX509Bundles stream) and every SVID it gets chains to a CA in the bundle."""
    server, agent = deployment.server, deployment.agent
    bundles = RawStream(agent, "FetchX509Bundles", workload_pb2.X509BundlesRequest())
    try:
        first = bundles.wait_for(lambda m: True, CALL_TIMEOUT, "the first bundle")
        old, new = _rotate(server, "x509")
        assert old in {_ski(c) for c in _der_certs(first.bundles[TD_ID])}
        # The prepared (now active) CA is published too.
        bundles.wait_for(
            lambda m: new in {_ski(c) for c in _der_certs(m.bundles[TD_ID])},
            REACT_TIMEOUT,
            "the new CA in the bundle",
        )
        server.cli_json("localauthority", "x509", "taint", "--authority-id", old)
        # Let the re-issue happen first, as an operator would (revoke needs no wait, though).
        wait_for(
            lambda: _context_issuer(_fetch_context(agent)) == new,
            REACT_TIMEOUT,
            "the SVID re-issued by the new CA",
        )
        revoked = server.cli_json("localauthority", "x509", "revoke", "--authority-id", old)
        assert revoked["authority_id"] == old
        assert _authority_state(server, "x509")["old"] is None

        pushed = bundles.wait_for(
            lambda m: old not in {_ski(c) for c in _der_certs(m.bundles[TD_ID])},
            REACT_TIMEOUT,
            "the old CA to leave the bundle",
        )
    finally:
        bundles.close()
    assert {_ski(c) for c in _der_certs(pushed.bundles[TD_ID])} == {new}

    context = _fetch_context(agent)
    authorities = _context_own_authorities(context)
    assert old not in authorities and new in authorities
    assert [str(s.spiffe_id) for s in context.x509_svids] == [WORKLOAD]
    own_bundle = X509Bundle.parse_der(TD, _context_bundle_der(context))
    for svid in context.x509_svids:
        assert _aki(svid.leaf) in authorities
        assert str(verify_x509_svid(svid.cert_chain, own_bundle)) == WORKLOAD
    # The agent's own SVID was signed by the old CA too: taint made the agent renew it, so
    # the revoke did not cut the agent off. It still syncs and signs: a new entry arrives.
    agent_svid = load_certificates((agent.data_dir / "agent_svid.pem").read_bytes())[0]
    assert _aki(agent_svid) == new
    create_entry(server, agent.spiffe_id, WORKLOAD + "-after-revoke")
    wait_for(
        lambda: sorted(agent.fetch_ids()) == [WORKLOAD, WORKLOAD + "-after-revoke"],
        REACT_TIMEOUT,
        "an entry created after the revoke",
    )
    # py-spiffe's own bundle fetch agrees.
    with agent.client() as client:
        fetched = client.fetch_x509_bundles(timeout=CALL_TIMEOUT)
    own = fetched.get_bundle_for_trust_domain(spiffe.TrustDomain(TD))
    assert {_ski(c) for c in own.x509_authorities} == {new}


def _context_bundle_der(context: Any) -> bytes:
    bundle = context.x509_bundle_set.get_bundle_for_trust_domain(spiffe.TrustDomain(TD))
    return b"".join(c.public_bytes(Encoding.DER) for c in bundle.x509_authorities)


def _fetch_context(agent: AgentProcess) -> Any:
    with agent.client() as client:
        return client.fetch_x509_context(timeout=CALL_TIMEOUT)


# --- 3. JWT signing key ----------------------------------------------------------------


def test_jwt_authority_rotation_new_kid_signs_and_revoked_kid_leaves_bundle(
    deployment: Deployment,
) -> None:
    """After activating a new JWT key, fresh JWT-SVIDs carry its kid; after taint the agent
    stops serving its cached JWT-SVID signed by the old key; after revoke the old kid is gone
    from the JWT bundles (pushed on an open FetchJWTBundles stream) and its tokens fail."""
    server, agent = deployment.server, deployment.agent
    before = _fetch_jwt(agent, "cached-aud")
    bundles = RawStream(agent, "FetchJWTBundles", workload_pb2.JWTBundlesRequest())
    try:
        first = bundles.wait_for(lambda m: True, CALL_TIMEOUT, "the first JWT bundle")
        old, new = _rotate(server, "jwt")
        assert _jwt_header(before)["kid"] == old
        assert old in _jwt_kids(first.bundles[TD_ID])
        # A new JWT key is in the bundle (pushed) ...
        bundles.wait_for(lambda m: new in _jwt_kids(m.bundles[TD_ID]), REACT_TIMEOUT, "the new kid")
        # ... and signs every JWT-SVID minted after activation.
        fresh = _fetch_jwt(agent, "after-activation")
        assert _jwt_header(fresh)["kid"] == new
        assert _validate_jwt(agent, fresh, "after-activation").spiffe_id == WORKLOAD

        server.cli_json("localauthority", "jwt", "taint", "--authority-id", old)
        # The JWT-SVID cached for "cached-aud" (signed by the now tainted key) is not
        # served again: the next fetch is signed by the new key.
        wait_for(
            lambda: _jwt_header(_fetch_jwt(agent, "cached-aud"))["kid"] == new,
            REACT_TIMEOUT,
            "a JWT-SVID re-signed by the new key after taint",
        )
        assert _validate_jwt(agent, before, "cached-aud").spiffe_id == WORKLOAD  # still trusted

        server.cli_json("localauthority", "jwt", "revoke", "--authority-id", old)
        pushed = bundles.wait_for(
            lambda m: old not in _jwt_kids(m.bundles[TD_ID]),
            REACT_TIMEOUT,
            "the old kid to leave the JWT bundle",
        )
    finally:
        bundles.close()
    assert _jwt_kids(pushed.bundles[TD_ID]) == {new}
    with agent.client() as client:
        jwt_bundle = client.fetch_jwt_bundles(timeout=CALL_TIMEOUT).get_bundle_for_trust_domain(
            spiffe.TrustDomain(TD)
        )
    assert set(jwt_bundle.jwt_authorities) == {new}

    # A token signed by the revoked key no longer validates ...
    with pytest.raises(grpc.RpcError) as info:
        _validate_jwt(agent, before, "cached-aud")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # ... and the agent does not hand out its cached copy any more: it mints a new one.
    again = _fetch_jwt(agent, "cached-aud")
    assert _jwt_header(again)["kid"] == new
    assert _validate_jwt(agent, again, "cached-aud").spiffe_id == WORKLOAD


# --- 4. federation -----------------------------------------------------------------------


def test_federated_bundle_reaches_workloads_cli_files_and_jwt_validation(
    tmp_path: Path,
) -> None:
    """A bundle set for other.org reaches a workload whose entry federates with it (X.509
    context and `credo-agent api fetch x509 --write` files), and the agent validates a
    JWT-SVID minted by the other.org server."""
    root = short_temp_dir("credo-fed-")
    try:
        with (
            start_server(tmp_path / "other", trust_domain=OTHER_TD) as other,
            start_server(tmp_path / "srv", x509_svid_ttl=LONG_SVID_TTL) as server,
        ):
            shown = other.cli("bundle", "show", "--format", "spiffe", output=None)
            assert shown.returncode == 0, shown.stderr
            other_bundle = tmp_path / "other.spiffe.json"
            other_bundle.write_text(shown.stdout)
            other_cas = {
                _ski(x509.load_der_x509_certificate(base64.b64decode(key["x5c"][0])))
                for key in json.loads(shown.stdout)["keys"]
                if key.get("use") == "x509-svid"
            }
            other_kids = {
                key["kid"]
                for key in json.loads(shown.stdout)["keys"]
                if key.get("use") == "jwt-svid"
            }
            assert other_cas and other_kids

            set_result = server.cli(
                "bundle",
                "set",
                "--trust-domain",
                OTHER_TD,
                "--format",
                "spiffe",
                "--path",
                str(other_bundle),
            )
            assert set_result.returncode == 0, set_result.stderr

            with start_agent(server, root) as agent:
                create_entry(
                    server,
                    agent.spiffe_id,
                    WORKLOAD,
                    extra=["--federates-with", OTHER_TD],
                )
                wait_for(lambda: agent.fetch_ids() == [WORKLOAD], REACT_TIMEOUT, "the SVID")

                def federated_context() -> Any:
                    ctx = _fetch_context(agent)
                    bundle = ctx.x509_bundle_set.get_bundle_for_trust_domain(
                        spiffe.TrustDomain(OTHER_TD)
                    )
                    return ctx if bundle is not None else None

                context = wait_for(federated_context, REACT_TIMEOUT, "the federated bundle")
                fed = context.x509_bundle_set.get_bundle_for_trust_domain(
                    spiffe.TrustDomain(OTHER_TD)
                )
                assert {_ski(c) for c in fed.x509_authorities} == other_cas

                # Raw FetchX509SVID: the federated_bundles map, keyed by trust domain ID.
                with grpc.insecure_channel(f"unix:{agent.socket}") as channel:
                    stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
                    stream = stub.FetchX509SVID(
                        workload_pb2.X509SVIDRequest(), metadata=HEADER, timeout=CALL_TIMEOUT
                    )
                    try:
                        response = next(stream)
                    finally:
                        stream.cancel()
                assert set(response.federated_bundles) == {OTHER_TD_ID}
                assert {
                    _ski(c) for c in _der_certs(response.federated_bundles[OTHER_TD_ID])
                } == other_cas

                # `credo-agent api fetch x509 --write DIR` writes the federated bundle too.
                out_dir = tmp_path / "written"
                result = subprocess.run(
                    [
                        *credo_agent_command(),
                        "api",
                        "fetch",
                        "x509",
                        "--socket",
                        agent.endpoint,
                        "--write",
                        str(out_dir),
                    ],
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                assert result.returncode == 0, result.stderr
                written = sorted(p.name for p in out_dir.iterdir())
                assert written == [
                    "bundle.0.pem",
                    "federated_bundle.0.0.pem",
                    "svid.0.key",
                    "svid.0.pem",
                ], written
                federated_file = load_certificates(
                    (out_dir / "federated_bundle.0.0.pem").read_bytes()
                )
                assert {_ski(c) for c in federated_file} == other_cas
                own_file = load_certificates((out_dir / "bundle.0.pem").read_bytes())
                assert not {_ski(c) for c in own_file} & other_cas

                # JWT federation: a JWT-SVID minted by the other.org server validates here.
                minted = other.cli_json(
                    "jwt", "mint", "--spiffe-id", f"{OTHER_TD_ID}/peer", "--audience", "X"
                )
                token = minted["token"]
                assert _jwt_header(token)["kid"] in other_kids
                validated = _validate_jwt(agent, token, "X")
                assert validated.spiffe_id == f"{OTHER_TD_ID}/peer"
                assert validated.claims["sub"] == f"{OTHER_TD_ID}/peer"
                with agent.client() as client:
                    via_py_spiffe = client.validate_jwt_svid(token, "X", timeout=CALL_TIMEOUT)
                assert str(via_py_spiffe.spiffe_id) == f"{OTHER_TD_ID}/peer"
                # ... but not for another audience.
                with pytest.raises(grpc.RpcError) as info:
                    _validate_jwt(agent, token, "Y")
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        shutil.rmtree(root, ignore_errors=True)
