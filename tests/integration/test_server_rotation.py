"""CA rotation on a real `credo-server run` process: SVIDs keep verifying; kill -9 mid-rotation.

The server runs with a 20s CA TTL (NotBefore is backdated 10s, so a CA lives 30s: the next
one is prepared at half-life and activated with a sixth left, i.e. a rotation every 5-10s),
10s X.509-SVIDs and a 0.5s rotation check. An agent attested with a join token signs
workload SVIDs through the agent endpoint (mTLS); each is verified against the SPIFFE
bundle fetched with `credo-server bundle show --format spiffe` just before it was signed.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from credo import Bundle, verify_x509_svid
from credo._proto.credo.server.v1 import admin_pb2, admin_pb2_grpc, agent_pb2, agent_pb2_grpc
from credo.keys import generate_private_key, private_key_to_pkcs8_pem
from tests.helpers.processes import ServerProcess, start_server, wait_for
from tests.helpers.server import make_csr

TD = "example.org"
WORKLOAD = f"spiffe://{TD}/rotation/workload"
CA_TTL = 20
SVID_TTL = 10
ROTATIONS = 3
ROTATION_TIMEOUT = 120.0


# --- helpers --------------------------------------------------------------------------


def fetch_bundle(server: ServerProcess) -> Bundle:
    """`credo-server bundle show --format spiffe`, parsed."""
    result = server.cli("bundle", "show", "--format", "spiffe", output=None)
    assert result.returncode == 0, result.stderr
    return Bundle.parse(TD, result.stdout.encode())


def x509_state(server: ServerProcess) -> dict[str, Any]:
    """`credo-server localauthority x509 show --output json`."""
    return dict(server.cli_json("localauthority", "x509", "show"))


def authority_ids(bundle: Bundle) -> set[str]:
    """The SubjectKeyIdentifiers (hex) of the bundle's X.509 authorities."""
    return {
        c.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest.hex()
        for c in bundle.x509_authorities
    }


def issuer_id(leaf: x509.Certificate) -> str:
    """The AuthorityKeyIdentifier (hex) of ``leaf``: the id of the CA that signed it."""
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier is not None
    return aki.key_identifier.hex()


def verify(chain: list[x509.Certificate], bundle: Bundle, *, clamp: bool = False) -> str:
    """Verify ``chain`` against ``bundle``; with ``clamp``, at a time inside the leaf's validity.

    Clamping checks only trust (the signing CA is still in the bundle), not the clock, for
    SVIDs that may have expired while the test waited on a loaded machine.
    """
    now = datetime.now(UTC)
    if clamp:
        leaf = chain[0]
        now = max(
            leaf.not_valid_before_utc, min(now, leaf.not_valid_after_utc - timedelta(seconds=1))
        )
    return str(verify_x509_svid(chain, bundle.x509_bundle(), now=now))


@dataclass
class Agent:
    """An agent's side of the agent endpoint: attest, renew, sign workload SVIDs."""

    server: ServerProcess
    agent_id: str = ""
    key: Any = None
    chain: list[bytes] | None = None
    entry_id: str = ""

    @property
    def target(self) -> str:
        return "localhost:" + self.server.address.rpartition(":")[2]

    def _credentials(self, bundle: Bundle, with_svid: bool = True) -> grpc.ChannelCredentials:
        roots = bundle.marshal_pem()
        if not with_svid:
            return grpc.ssl_channel_credentials(root_certificates=roots)
        assert self.chain is not None
        chain_pem = b"".join(
            x509.load_der_x509_certificate(c).public_bytes(serialization.Encoding.PEM)
            for c in self.chain
        )
        return grpc.ssl_channel_credentials(
            root_certificates=roots,
            private_key=private_key_to_pkcs8_pem(self.key),
            certificate_chain=chain_pem,
        )

    def attest(self, bundle: Bundle) -> None:
        """Join with a fresh token and register the workload entry under the new agent ID."""
        token = self.server.cli_json("token", "generate")["token"]
        key = generate_private_key()
        with grpc.secure_channel(self.target, self._credentials(bundle, False)) as channel:
            resp = agent_pb2_grpc.AgentStub(channel).AttestAgent(
                agent_pb2.AttestAgentRequest(
                    attestation_data=agent_pb2.AttestationData(
                        type="join_token", payload=token.encode()
                    ),
                    csr=make_csr(key),
                ),
                timeout=30,
            )
        self.agent_id, self.key, self.chain = resp.svid.spiffe_id, key, list(resp.svid.cert_chain)
        (entry,) = self.server.cli_json(
            "entry", "create", "--spiffe-id", WORKLOAD, "--parent-id", self.agent_id,
            "--selector", "unix:uid:1000",
        )["entries"]  # fmt: skip
        self.entry_id = entry["id"]

    def _renew(self, bundle: Bundle) -> None:
        key = generate_private_key()
        with grpc.secure_channel(self.target, self._credentials(bundle)) as channel:
            resp = agent_pb2_grpc.AgentStub(channel).RenewAgent(
                agent_pb2.RenewAgentRequest(csr=make_csr(key)), timeout=30
            )
        self.key, self.chain = key, list(resp.svid.cert_chain)

    def refresh(self, bundle: Bundle) -> None:
        """Renew the agent SVID (10s TTL); re-attest if it lapsed while the machine was busy."""
        if self.chain is None:
            self.attest(bundle)
            return
        try:
            self._renew(bundle)
        except grpc.RpcError:
            self.attest(bundle)

    def sign(self, bundle: Bundle) -> list[x509.Certificate]:
        """BatchNewX509SVID for the workload entry; the chain (leaf first)."""
        self.refresh(bundle)
        with grpc.secure_channel(self.target, self._credentials(bundle)) as channel:
            resp = agent_pb2_grpc.AgentStub(channel).BatchNewX509SVID(
                agent_pb2.BatchNewX509SVIDRequest(
                    params=[agent_pb2.NewX509SVIDParams(entry_id=self.entry_id, csr=make_csr())]
                ),
                timeout=30,
            )
        (result,) = resp.results
        assert result.status.code == 0, result.status
        return [x509.load_der_x509_certificate(der) for der in result.svid.cert_chain]


def admin_bundle_sequence(server: ServerProcess) -> int:
    """The bundle's spiffe_sequence read over the admin gRPC API (no CLI start-up cost)."""
    with grpc.insecure_channel(f"unix:{server.admin_socket}") as channel:
        reply = admin_pb2_grpc.BundlesStub(channel).GetBundle(
            admin_pb2.GetBundleAdminRequest(), timeout=30
        )
    return int(reply.sequence_number)


# --- the test -------------------------------------------------------------------------


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A server with a 20s CA TTL, 10s SVIDs and a rotation check every half second."""
    with start_server(
        tmp_path,
        trust_domain=TD,
        ca_ttl=f"{CA_TTL}s",
        x509_svid_ttl=f"{SVID_TTL}s",
        rotation_check_interval=0.5,
        attestation_rate_limit=100,
        log_level="debug",
    ) as running:
        yield running


@pytest.mark.timeout(300)
def test_svids_verify_across_rotations_and_a_kill_mid_rotation_resumes(
    server: ServerProcess,
) -> None:
    """SVIDs verify across several CA rotations; a kill -9 after `prepare` resumes the rotation."""
    agent = Agent(server)
    active_ids: list[str] = []  # distinct active authorities, in the order seen
    signers: set[str] = set()
    sequences: list[int] = []

    deadline = time.monotonic() + ROTATION_TIMEOUT
    while len(active_ids) < ROTATIONS + 1:
        assert time.monotonic() < deadline, (
            f"saw only {len(active_ids) - 1} rotations in {ROTATION_TIMEOUT}s: {active_ids}"
        )
        state = x509_state(server)
        assert state["active"] is not None, state
        if not active_ids or active_ids[-1] != state["active"]["authority_id"]:
            active_ids.append(state["active"]["authority_id"])

        bundle = fetch_bundle(server)
        if sequences:
            assert bundle.sequence_number >= sequences[-1], "spiffe_sequence went backwards"
        sequences.append(bundle.sequence_number)

        chain = agent.sign(bundle)
        # The CA that signed it was in the bundle fetched before the signing call.
        assert issuer_id(chain[0]) in authority_ids(bundle)
        assert verify(chain, bundle) == WORKLOAD
        # Still trusted by the bundle as it is now (nothing is dropped while it is valid).
        assert verify(chain, fetch_bundle(server), clamp=True) == WORKLOAD
        signers.add(issuer_id(chain[0]))
        time.sleep(0.5)

    assert len(set(active_ids)) == len(active_ids) >= ROTATIONS + 1, active_ids
    assert len(signers) >= ROTATIONS, f"SVIDs were signed by only {len(signers)} CAs"
    # Every rotation published a new bundle: prepare, activate (and prune) each bump it.
    assert sequences[-1] - sequences[0] >= ROTATIONS, sequences

    # --- kill -9 between `prepare` and activation, then restart on the same data dir ---
    # Wait for a young active CA so the SVID minted now (10s) outlives the restart and the
    # prepared authority is not yet due for activation when the server comes back.
    wait_for(
        lambda: (x509_state(server)["active"]["expires_at"] - time.time()) >= 12,
        timeout=CA_TTL + 20,
        what="an active CA with at least 12s left",
        interval=0.5,
    )
    pre_kill_chain = agent.sign(fetch_bundle(server))
    pre_kill_sequence = admin_bundle_sequence(server)
    prepared = server.cli_json("localauthority", "x509", "prepare")
    prepared_id = prepared["authority_id"]
    assert prepared["status"] == "prepared"
    server.kill()
    assert (server.data_dir / "keys" / f"x509-ca-{prepared_id}.pem").exists()

    server.start()
    state = x509_state(server)
    # Reconciliation kept the prepared authority (or the first tick already activated it).
    kept = {s["authority_id"] for s in (state["prepared"], state["active"]) if s is not None}
    assert prepared_id in kept, state
    fetched_at = time.time()
    bundle = fetch_bundle(server)
    assert prepared_id in authority_ids(bundle), "the prepared CA left the bundle"
    assert bundle.sequence_number >= pre_kill_sequence
    # An SVID minted before the kill is still trusted by the post-restart bundle while it is
    # valid. (Its CA may expire and leave the bundle if the restart outlasts it on a loaded
    # machine: the SVID's NotAfter, capped at its CA's, says whether it must still be there.)
    if pre_kill_chain[0].not_valid_after_utc.timestamp() > fetched_at:
        assert issuer_id(pre_kill_chain[0]) in authority_ids(bundle)
        assert verify(pre_kill_chain, bundle, clamp=True) == WORKLOAD

    # The rotation proceeds: the authority prepared before the kill becomes active.
    wait_for(
        lambda: (x509_state(server)["active"] or {}).get("authority_id") == prepared_id,
        timeout=CA_TTL + 40,
        what=f"the prepared authority {prepared_id} to be activated after the restart",
        interval=0.5,
    )

    # SVIDs minted after the restart verify against the bundle fetched just before.
    bundle = fetch_bundle(server)
    chain = agent.sign(bundle)
    assert verify(chain, bundle) == WORKLOAD
    assert issuer_id(chain[0]) in {prepared_id, x509_state(server)["active"]["authority_id"]}
    assert bundle.sequence_number > pre_kill_sequence

    assert "Traceback" not in server.logs
