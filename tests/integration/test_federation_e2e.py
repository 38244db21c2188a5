"""SPIFFE federation between two Credo deployments with two trust domains.

Each ``credo-server`` serves its bundle endpoint on its HTTP front end (``https_spiffe``:
authenticated with its own X509-SVID); each federates with the other through
``credo-server federation create``. Workloads in each domain receive the other's bundle
through the Workload API (py-spiffe), open mutual TLS with their X509-SVIDs, and validate
each other's JWT-SVIDs with ValidateJWTSVID. A CA rotation in B reaches A's workloads
without a restart; with the relationship deleted, the handshake fails.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import spiffe
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.helpers.processes import (
    AgentProcess,
    ServerProcess,
    create_entry,
    short_temp_dir,
    start_agent,
    start_server,
    wait_for,
)

A, B = "a.test", "b.test"
CLIENT = f"spiffe://{A}/ai/planner"
SERVICE = f"spiffe://{B}/tools/search"


def x509_context(agent: AgentProcess) -> Any:
    with agent.client() as client:
        return client.fetch_x509_context()


def federated_roots(agent: AgentProcess, td: str) -> list[x509.Certificate]:
    """The CA certificates of ``td`` this agent's workload received ([] if none)."""
    bundle = x509_context(agent).x509_bundle_set.get_bundle_for_trust_domain(spiffe.TrustDomain(td))
    return [] if bundle is None else list(bundle.x509_authorities)


def pem(certs: list[x509.Certificate]) -> str:
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certs)


@contextlib.contextmanager
def tls_files(svid: Any) -> Iterator[tuple[str, str]]:
    with tempfile.TemporaryDirectory() as tmp:
        chain, key = Path(tmp) / "chain.pem", Path(tmp) / "key.pem"
        chain.write_text(pem(list(svid.cert_chain)))
        key.write_bytes(
            svid.private_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        yield str(chain), str(key)


def peer_id(tls: ssl.SSLSocket) -> str:
    der = tls.getpeercert(binary_form=True)
    assert der is not None
    cert = x509.load_der_x509_certificate(der)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return str(san.get_values_for_type(x509.UniformResourceIdentifier)[0])


def mutual_tls(client_agent: AgentProcess, server_agent: AgentProcess) -> tuple[str, str]:
    """A's workload dials B's workload over mTLS, each trusting only the other domain's
    bundle as its Workload API gave it; returns (ID the client saw, ID the server saw)."""
    client_ctx = x509_context(client_agent)
    server_ctx = x509_context(server_agent)
    seen: dict[str, str] = {}
    with (
        tls_files(server_ctx.default_svid) as (s_chain, s_key),
        tls_files(client_ctx.default_svid) as (c_chain, c_key),
    ):
        server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_tls.load_cert_chain(s_chain, s_key)
        server_tls.verify_mode = ssl.CERT_REQUIRED
        a_bundle = server_ctx.x509_bundle_set.get_bundle_for_trust_domain(spiffe.TrustDomain(A))
        if a_bundle is None:
            raise ssl.SSLError("the server has no bundle for a.test")
        server_tls.load_verify_locations(cadata=pem(list(a_bundle.x509_authorities)))
        client_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client_tls.check_hostname = False
        client_tls.load_cert_chain(c_chain, c_key)
        b_bundle = client_ctx.x509_bundle_set.get_bundle_for_trust_domain(spiffe.TrustDomain(B))
        if b_bundle is None:
            raise ssl.SSLError("the client has no bundle for b.test")
        client_tls.load_verify_locations(cadata=pem(list(b_bundle.x509_authorities)))
        listener = socket.create_server(("127.0.0.1", 0))

        def serve() -> None:
            conn, _ = listener.accept()
            with contextlib.suppress(OSError), server_tls.wrap_socket(conn, server_side=True) as s:
                seen["server"] = peer_id(s)
                s.sendall(b"ok")

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with (
                socket.create_connection(listener.getsockname(), timeout=10) as raw,
                client_tls.wrap_socket(raw) as c,
            ):
                seen["client"] = peer_id(c)
                assert c.recv(2) == b"ok"
        finally:
            thread.join(10)
            listener.close()
    return seen["client"], seen.get("server", "")


def federate(server: ServerProcess, other: ServerProcess, other_td: str, tmp: Path) -> None:
    first = tmp / f"{other_td}.json"
    result = other.cli("bundle", "show", "--format", "spiffe", output=None)
    assert result.returncode == 0, result.stderr
    first.write_text(result.stdout)
    server.cli_json(
        "federation",
        "create",
        "--trust-domain",
        other_td,
        "--bundle-endpoint-url",
        f"{other.http_url}/bundle",
        "--bundle-endpoint-profile",
        "https_spiffe",
        "--endpoint-spiffe-id",
        f"spiffe://{other_td}/credo/server",
        "--trust-domain-bundle",
        str(first),
    )


@pytest.mark.slow
def test_two_trust_domains_federate_both_ways(tmp_path: Path) -> None:
    """mTLS and JWT-SVIDs across two federated trust domains; B's CA rotation reaches A
    without a restart; deleting the relationship makes the handshake fail."""
    root_a, root_b = short_temp_dir(), short_temp_dir()
    common = {"bundle_refresh_hint": "1s", "http_bind_address": "127.0.0.1:0"}
    with (
        start_server(tmp_path / "a", trust_domain=A, **common) as server_a,
        start_server(tmp_path / "b", trust_domain=B, **common) as server_b,
        start_agent(server_a, root_a, trust_domain=A) as agent_a,
        start_agent(server_b, root_b, trust_domain=B) as agent_b,
    ):
        create_entry(server_a, agent_a.spiffe_id, CLIENT, extra=["--federates-with", B])
        create_entry(server_b, agent_b.spiffe_id, SERVICE, extra=["--federates-with", A])
        federate(server_a, server_b, B, tmp_path)
        federate(server_b, server_a, A, tmp_path)
        wait_for(lambda: federated_roots(agent_a, B), 30, "B's bundle at A's workload")
        wait_for(lambda: federated_roots(agent_b, A), 30, "A's bundle at B's workload")

        assert mutual_tls(agent_a, agent_b) == (SERVICE, CLIENT)

        with agent_a.client() as client:
            token_a = client.fetch_jwt_svid(audience={"search"}).token
        with agent_b.client() as client:
            assert str(client.validate_jwt_svid(token_a, "search").spiffe_id) == CLIENT
            token_b = client.fetch_jwt_svid(audience={"planner"}).token
        with agent_a.client() as client:
            assert str(client.validate_jwt_svid(token_b, "planner").spiffe_id) == SERVICE

        status = server_a.cli_json("federation", "show", "--trust-domain", B)
        assert status["last_error"] == ""
        assert status["bundle_sequence"] >= 1

        # A CA rotation in B reaches A's workloads, no restart.
        before = {c.serial_number for c in federated_roots(agent_a, B)}
        new_ca = server_b.cli_json("localauthority", "x509", "prepare")["authority_id"]
        assert new_ca

        def rotated() -> bool:
            return bool({c.serial_number for c in federated_roots(agent_a, B)} - before)

        wait_for(rotated, 15, "B's new CA at A's workload")
        server_b.cli_json("localauthority", "x509", "activate", "--authority-id", new_ca)

        # Relationship deleted: A's workloads lose B's bundle; the handshake fails.
        server_a.cli_json("federation", "delete", "--trust-domain", B)
        wait_for(lambda: not federated_roots(agent_a, B), 15, "B's bundle gone from A")
        with pytest.raises(ssl.SSLError):
            mutual_tls(agent_a, agent_b)
