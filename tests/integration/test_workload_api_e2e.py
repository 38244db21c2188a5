"""The SPIFFE Workload API end to end: a real `credo-server run`, a real `credo-agent run`,
and workloads calling it the way real ones do — py-spiffe's WorkloadApiClient, raw gRPC,
an unprivileged child process, and the `credo-agent api` CLI.

Most tests share one server and one agent (module scope) with two entries for this
process's uid; the rotation test runs its own server with a short X509-SVID TTL.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
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
ALPHA = f"spiffe://{TD}/e2e/alpha"
BETA = f"spiffe://{TD}/e2e/beta"
HEADER = (("workload.spiffe.io", "true"),)
NOBODY = 65534
CALL_TIMEOUT = 30.0


HINTS = {ALPHA: "alpha", BETA: "beta"}


@dataclass
class Deployment:
    server: ServerProcess
    agent: AgentProcess
    root: Path
    order: list[str]
    """The two SPIFFE IDs as the agent serves them (entries created in the same second are
    ordered by entry id, so which one is the default is only known after the first fetch)."""

    @property
    def default(self) -> str:
        return self.order[0]

    @property
    def other(self) -> str:
        return self.order[1]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    # 0755 so an unprivileged child can reach the agent's (world-accessible) public socket.
    root = short_temp_dir("credo-e2e-", mode=0o755)
    try:
        with start_server(tmp_path_factory.mktemp("e2e-server")) as server:
            agent = start_agent(server, root)
            with agent:
                for spiffe_id, hint in HINTS.items():
                    create_entry(server, agent.spiffe_id, spiffe_id, extra=["--hint", hint])
                wait_for(
                    lambda: sorted(agent.fetch_ids()) == [ALPHA, BETA],
                    60,
                    "both SVIDs to reach the agent",
                )
                yield Deployment(server, agent, root, agent.fetch_ids())
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _stub(channel: grpc.Channel) -> Any:
    return workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)  # type: ignore[no-untyped-call]


def _channel(agent: AgentProcess) -> grpc.Channel:
    return grpc.insecure_channel(f"unix:{agent.socket}")


def _first_x509_response(agent: AgentProcess) -> Any:
    with _channel(agent) as channel:
        stream = _stub(channel).FetchX509SVID(
            workload_pb2.X509SVIDRequest(), metadata=HEADER, timeout=CALL_TIMEOUT
        )
        try:
            return next(stream)
        finally:
            stream.cancel()


def _rpc_code(call: Any) -> grpc.StatusCode:
    """Run ``call()``; the status code of the RpcError it must raise."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()  # type: ignore[no-any-return]


def _agent_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*credo_agent_command(), "api", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def _serial(context: Any) -> int:
    return int(context.default_svid.leaf.serial_number)


# --- 1. py-spiffe, unchanged ---------------------------------------------------------


def test_py_spiffe_fetches_context_jwt_and_bundles_and_validates(
    deployment: Deployment,
) -> None:
    """py-spiffe's WorkloadApiClient fetches the X.509 context, JWT-SVIDs and both bundle
    kinds, and validates a JWT-SVID through the agent."""
    td = spiffe.TrustDomain(TD)
    with deployment.agent.client() as client:
        context = client.fetch_x509_context(timeout=CALL_TIMEOUT)
        assert [str(s.spiffe_id) for s in context.x509_svids] == deployment.order
        assert str(context.default_svid.spiffe_id) == deployment.default
        x509_bundle = context.x509_bundle_set.get_bundle_for_trust_domain(td)
        assert x509_bundle is not None and x509_bundle.x509_authorities
        own = X509Bundle.parse_der(
            TD, b"".join(c.public_bytes(Encoding.DER) for c in x509_bundle.x509_authorities)
        )
        assert str(verify_x509_svid(context.default_svid.cert_chain, own)) == deployment.default

        bundles = client.fetch_x509_bundles(timeout=CALL_TIMEOUT)
        fetched = bundles.get_bundle_for_trust_domain(td)
        assert fetched is not None
        assert set(fetched.x509_authorities) == set(x509_bundle.x509_authorities)

        jwt_svid = client.fetch_jwt_svid(audience={"db"}, timeout=CALL_TIMEOUT)
        assert str(jwt_svid.spiffe_id) == deployment.default
        assert set(jwt_svid.audience) == {"db"}
        other_jwt = client.fetch_jwt_svid(
            audience={"db"}, subject=spiffe.SpiffeId(deployment.other), timeout=CALL_TIMEOUT
        )
        assert str(other_jwt.spiffe_id) == deployment.other
        all_jwts = client.fetch_jwt_svids(audience={"db"}, timeout=CALL_TIMEOUT)
        assert [str(s.spiffe_id) for s in all_jwts] == deployment.order

        jwt_bundles = client.fetch_jwt_bundles(timeout=CALL_TIMEOUT)
        jwt_bundle = jwt_bundles.get_bundle_for_trust_domain(td)
        assert jwt_bundle is not None and jwt_bundle.jwt_authorities
        # The fetched JWT bundle verifies the token locally, too.
        local = spiffe.JwtSvid.parse_and_validate(jwt_svid.token, jwt_bundle, {"db"})
        assert str(local.spiffe_id) == deployment.default

        validated = client.validate_jwt_svid(jwt_svid.token, "db", timeout=CALL_TIMEOUT)
        assert str(validated.spiffe_id) == deployment.default


def test_py_spiffe_stream_receives_rotated_svid(tmp_path: Path) -> None:
    """With a 20 s X509-SVID TTL, py-spiffe's X.509 context stream receives a renewed SVID
    (new serial) around half-life, before the first one expires."""
    ttl = 20
    root = short_temp_dir("credo-rot-")
    try:
        with start_server(tmp_path, x509_svid_ttl=f"{ttl}s") as server:
            agent = start_agent(server, root)
            with agent:
                spiffe_id = f"spiffe://{TD}/e2e/rotating"
                create_entry(server, agent.spiffe_id, spiffe_id)
                wait_for(lambda: agent.fetch_ids() == [spiffe_id], 60, "the SVID")
                updates: queue.Queue[Any] = queue.Queue()
                errors: list[Exception] = []
                client = agent.client()
                handle = client.stream_x509_contexts(on_success=updates.put, on_error=errors.append)
                try:
                    first = updates.get(timeout=CALL_TIMEOUT)
                    first_serial = _serial(first)
                    first_expiry = first.default_svid.leaf.not_valid_after_utc
                    # Renewal is due at half-life (+-10%); allow a full TTL more on a busy box.
                    deadline = time.monotonic() + 2 * ttl
                    rotated = None
                    while time.monotonic() < deadline:
                        try:
                            ctx = updates.get(timeout=max(0.1, deadline - time.monotonic()))
                        except queue.Empty:
                            break
                        if _serial(ctx) != first_serial:
                            rotated = ctx
                            break
                    assert rotated is not None, (
                        f"no rotated SVID within {2 * ttl}s; stream errors: {errors}\n"
                        f"agent log:\n{agent.logs[-4000:]}"
                    )
                    arrived = datetime.now(UTC)
                finally:
                    handle.cancel()
                    client.close()
        assert str(rotated.default_svid.spiffe_id) == spiffe_id
        assert rotated.default_svid.leaf.not_valid_after_utc > first_expiry
        # Renewed around half-life, not early: NotBefore is backdated, so counting the
        # lifetime from it renewed a 20 s SVID after ~5 s (and a 10 s one in a tight loop).
        first_issued = first.default_svid.leaf.not_valid_before_utc
        renewed_after = rotated.default_svid.leaf.not_valid_before_utc - first_issued
        assert renewed_after.total_seconds() >= 0.35 * ttl, renewed_after
        # Delivered while the old SVID was still valid: renewal, not re-issue after expiry.
        assert arrived < first_expiry, (arrived, first_expiry)
        assert not errors, errors
    finally:
        shutil.rmtree(root, ignore_errors=True)


# --- 2.-5. the Workload API's rules, over raw gRPC -------------------------------------

_CHILD = r"""
import json, os, sys
import grpc
import grpc._channel  # grpc imports this lazily: do it while the checkout is still readable
from credo._proto import workload_pb2, workload_pb2_grpc

target, uid = sys.argv[1], int(sys.argv[2])
if uid != os.getuid():
    # Everything the child needs is imported above, before it drops to ``uid``: the checkout
    # (and its .venv) may live in a directory that uid cannot read (a 0700 home, mktemp -d).
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
assert os.getuid() == uid and os.geteuid() == uid
header = (("workload.spiffe.io", "true"),)
out = {"uid": os.getuid()}
with grpc.insecure_channel(target) as channel:
    stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
    try:
        stream = stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=header, timeout=30)
        out["x509"] = {"code": "OK", "ids": [s.spiffe_id for s in next(stream).svids]}
        stream.cancel()
    except grpc.RpcError as err:
        out["x509"] = {"code": err.code().name, "details": err.details()}
    try:
        reply = stub.FetchJWTSVID(
            workload_pb2.JWTSVIDRequest(audience=["db"]), metadata=header, timeout=30
        )
        out["jwt"] = {"code": "OK", "ids": [s.spiffe_id for s in reply.svids]}
    except grpc.RpcError as err:
        out["jwt"] = {"code": err.code().name, "details": err.details()}
print(json.dumps(out))
"""


def _run_child(agent: AgentProcess, uid: int) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, f"unix:{agent.socket}", str(uid)],
        capture_output=True,
        text=True,
        timeout=90,
        cwd="/",
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start a process as another uid")
def test_uid_without_entry_is_denied_while_root_gets_svids(deployment: Deployment) -> None:
    """A child process that dropped to uid 65534 (no entry) gets PERMISSION_DENIED, while
    the same code as root gets both SVIDs."""
    assert os.stat(deployment.agent.socket).st_mode & 0o777 == 0o777
    nobody = _run_child(deployment.agent, NOBODY)
    assert nobody["uid"] == NOBODY
    assert nobody["x509"]["code"] == "PERMISSION_DENIED", nobody
    assert nobody["jwt"]["code"] == "PERMISSION_DENIED", nobody
    root = _run_child(deployment.agent, 0)
    assert root["x509"] == {"code": "OK", "ids": deployment.order}, root
    assert root["jwt"] == {"code": "OK", "ids": deployment.order}, root


def test_missing_security_header_is_invalid_argument(deployment: Deployment) -> None:
    """Calls without `workload.spiffe.io: true` metadata (or with another value) get
    INVALID_ARGUMENT."""
    with _channel(deployment.agent) as channel:
        stub = _stub(channel)

        def stream_call(metadata: Any) -> Any:
            return next(
                stub.FetchX509SVID(
                    workload_pb2.X509SVIDRequest(), metadata=metadata, timeout=CALL_TIMEOUT
                )
            )

        assert _rpc_code(lambda: stream_call(None)) == grpc.StatusCode.INVALID_ARGUMENT
        assert (
            _rpc_code(lambda: stream_call((("workload.spiffe.io", "false"),)))
            == grpc.StatusCode.INVALID_ARGUMENT
        )
        assert (
            _rpc_code(
                lambda: stub.FetchJWTSVID(
                    workload_pb2.JWTSVIDRequest(audience=["db"]), timeout=CALL_TIMEOUT
                )
            )
            == grpc.StatusCode.INVALID_ARGUMENT
        )
        # The same call with the header succeeds: the refusal is the header's doing.
        assert len(stream_call(HEADER).svids) == 2


def test_two_entries_for_same_selectors_both_returned_first_stable(
    deployment: Deployment,
) -> None:
    """Two entries for `unix:uid:0` both come back in one FetchX509SVID response, with
    hints, and the first (default) is the same across fetches."""
    first = _first_x509_response(deployment.agent)
    second = _first_x509_response(deployment.agent)
    for response in (first, second):
        assert [s.spiffe_id for s in response.svids] == deployment.order
        assert [s.hint for s in response.svids] == [HINTS[i] for i in deployment.order]
        for svid in response.svids:
            assert svid.x509_svid and svid.x509_svid_key and svid.bundle
    assert first.svids[0].spiffe_id == second.svids[0].spiffe_id == deployment.default
    with deployment.agent.client() as client:
        assert str(client.fetch_x509_svid(timeout=CALL_TIMEOUT).spiffe_id) == deployment.default


def test_foreign_spiffe_id_denied_and_wrong_audience_invalid(deployment: Deployment) -> None:
    """FetchJWTSVID for a SPIFFE ID that is not the caller's gets PERMISSION_DENIED, and
    ValidateJWTSVID with the wrong audience gets INVALID_ARGUMENT."""
    with _channel(deployment.agent) as channel:
        stub = _stub(channel)
        code = _rpc_code(
            lambda: stub.FetchJWTSVID(
                workload_pb2.JWTSVIDRequest(
                    audience=["db"], spiffe_id=f"spiffe://{TD}/e2e/someone-else"
                ),
                metadata=HEADER,
                timeout=CALL_TIMEOUT,
            )
        )
        assert code == grpc.StatusCode.PERMISSION_DENIED

        reply = stub.FetchJWTSVID(
            workload_pb2.JWTSVIDRequest(audience=["db"], spiffe_id=deployment.other),
            metadata=HEADER,
            timeout=CALL_TIMEOUT,
        )
        assert [s.spiffe_id for s in reply.svids] == [deployment.other]
        token = reply.svids[0].svid

        code = _rpc_code(
            lambda: stub.ValidateJWTSVID(
                workload_pb2.ValidateJWTSVIDRequest(audience="not-db", svid=token),
                metadata=HEADER,
                timeout=CALL_TIMEOUT,
            )
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT

        valid = stub.ValidateJWTSVID(
            workload_pb2.ValidateJWTSVIDRequest(audience="db", svid=token),
            metadata=HEADER,
            timeout=CALL_TIMEOUT,
        )
        assert valid.spiffe_id == deployment.other
        assert valid.claims["sub"] == deployment.other


# --- 6. the `credo-agent api` CLI ----------------------------------------------------


def test_cli_fetch_write_fetch_jwt_and_validate(deployment: Deployment, tmp_path: Path) -> None:
    """`credo-agent api fetch x509 --write`, `fetch jwt` and `validate jwt` work against the
    real agent, given --socket or SPIFFE_ENDPOINT_SOCKET."""
    endpoint = deployment.agent.endpoint
    out_dir = tmp_path / "svids"
    result = _agent_cli("fetch", "x509", "--socket", endpoint, "--write", str(out_dir))
    assert result.returncode == 0, result.stderr
    assert deployment.default in result.stdout and deployment.other in result.stdout

    assert (out_dir / "svid.0.key").stat().st_mode & 0o777 == 0o600
    chain = load_certificates((out_dir / "svid.0.pem").read_bytes())
    bundle = X509Bundle.parse_pem(TD, (out_dir / "bundle.0.pem").read_bytes())
    assert str(verify_x509_svid(chain, bundle)) == deployment.default
    key = serialization.load_pem_private_key((out_dir / "svid.0.key").read_bytes(), None)
    leaf_public = (
        chain[0]
        .public_key()
        .public_bytes(Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    assert (
        key.public_key().public_bytes(Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        == leaf_public
    )
    second = load_certificates((out_dir / "svid.1.pem").read_bytes())
    assert str(verify_x509_svid(second, bundle)) == deployment.other

    result = _agent_cli("fetch", "jwt", "--socket", endpoint, "--audience", "a", "--output", "json")
    assert result.returncode == 0, result.stderr
    tokens = json.loads(result.stdout)
    assert [t["spiffe_id"] for t in tokens] == deployment.order
    token = tokens[0]["svid"]

    result = _agent_cli("validate", "jwt", "--socket", endpoint, "--audience", "a", "--svid", token)
    assert result.returncode == 0, result.stderr
    assert "SVID is valid." in result.stdout and deployment.default in result.stdout
    result = _agent_cli("validate", "jwt", "--socket", endpoint, "--audience", "b", "--svid", token)
    assert result.returncode == 1
    assert result.stderr.startswith("Error:") and "Traceback" not in result.stderr

    # The same, with the socket from SPIFFE_ENDPOINT_SOCKET instead of --socket.
    env = {**os.environ, "SPIFFE_ENDPOINT_SOCKET": endpoint}
    result = _agent_cli("fetch", "x509", "--output", "json", env=env)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert [s["spiffe_id"] for s in doc["svids"]] == deployment.order
    assert f"spiffe://{TD}" in doc["bundles"]
    result = _agent_cli("fetch", "jwt", "--audience", "a", "--output", "json", env=env)
    assert result.returncode == 0, result.stderr
    env_token = json.loads(result.stdout)[0]["svid"]
    result = _agent_cli(
        "validate", "jwt", "--audience", "a", "--svid", env_token, "--output", "json", env=env
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["spiffe_id"] == deployment.default
