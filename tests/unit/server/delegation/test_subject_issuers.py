"""Trusted subject issuers: the config table, and keys found by OIDC discovery over HTTPS."""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from credo.errors import ConfigError
from server.config import load_config
from server.delegation.config import SubjectIssuerConfig
from server.delegation.errors import InvalidGrant
from server.delegation.subjects import SubjectIssuer
from tests.helpers.webpki import WebCa


def _load(tmp_path: Path, body: str) -> Any:
    path = tmp_path / "server.toml"
    path.write_text(body)
    return load_config(path, {})


def test_issuer_tables_parse_with_defaults(tmp_path: Path) -> None:
    """A table with issuer and audience gets RS256/ES256 and 30 s of clock skew."""
    config = _load(
        tmp_path,
        '[server.delegation.issuers.corp]\nissuer = "https://login.example.com"\n'
        'audience = "credo"\n',
    )
    corp = config.delegation.issuers["corp"]
    assert corp == SubjectIssuerConfig(issuer="https://login.example.com", audience=("credo",))
    assert corp.algorithms == ("RS256", "ES256") and corp.clock_skew == 30


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ('issuer = "https://a"\naudience = "x"\ncolour = 1\n', "issuers.corp.colour"),
        ('issuer = "https://a"\n', "issuers.corp.audience"),
        ('issuer = "https://a"\naudience = "x"\nalgorithms = ["none"]\n', "algorithms"),
        ('issuer = "http://plain"\naudience = "x"\n', "issuer"),
        ('issuer = "https://a"\naudience = "x"\njwks_file = "/k"\njwks_url = "https://k"\n',
         "jwks_file"),
    ],
)  # fmt: skip
def test_bad_issuer_tables_name_the_key(tmp_path: Path, body: str, needle: str) -> None:
    """Unknown keys, missing audiences, unknown algorithms: one error naming the key."""
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, "[server.delegation.issuers.corp]\n" + body)
    assert needle in str(info.value)


@pytest.fixture
def idp(tmp_path: Path) -> Iterator[tuple[str, ec.EllipticCurvePrivateKey, Path, list[str]]]:
    """An identity provider on HTTPS (a web PKI test CA): discovery document and JWKS."""
    ca = WebCa()
    cert, key = ca.write(tmp_path, ["localhost"])
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(ca.root_pem)
    signing = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(signing.public_key()))
    jwk.update(kid="idp-ec", alg="ES256")
    hits: list[str] = []
    state: dict[str, str] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            if self.path == "/.well-known/openid-configuration":
                body = {"issuer": state["issuer"], "jwks_uri": state["issuer"] + "/jwks"}
            elif self.path == "/jwks":
                body = {"keys": [jwk]}
            else:
                self.send_error(404)
                return
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    state["issuer"] = f"https://localhost:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state["issuer"], signing, ca_file, hits
    finally:
        server.shutdown()
        server.server_close()


def test_keys_by_oidc_discovery_are_fetched_once_and_cached(
    idp: tuple[str, ec.EllipticCurvePrivateKey, Path, list[str]],
) -> None:
    """No jwks_file or jwks_url: discovery finds the JWKS; a second token uses the cache."""
    issuer_url, signing, ca_file, hits = idp
    issuer = SubjectIssuer(
        "corp",
        SubjectIssuerConfig(
            issuer=issuer_url, audience=("credo",), algorithms=("ES256",), ca_file=ca_file
        ),
    )
    now = int(time.time())
    claims = {"iss": issuer_url, "sub": "alice", "aud": "credo", "exp": now + 60}
    for _ in range(2):
        token = jwt.encode(claims, signing, algorithm="ES256", headers={"kid": "idp-ec"})
        assert issuer.verify(token).sub == "alice"
    assert hits == ["/.well-known/openid-configuration", "/jwks"]
    other = ec.generate_private_key(ec.SECP256R1())
    forged = jwt.encode(claims, other, algorithm="ES256", headers={"kid": "idp-ec"})
    with pytest.raises(InvalidGrant):
        issuer.verify(forged)


def _write_jwks(path: Path, key: ec.EllipticCurvePrivateKey, kid: str) -> None:
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid=kid, alg="ES256")
    path.write_text(json.dumps({"keys": [jwk]}))


def test_a_token_is_verified_once_per_key_and_its_times_every_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same token again costs no signature check while its key is published; its expiry
    is still checked on every call; a replaced key verifies it again (and refuses it)."""
    signing = ec.generate_private_key(ec.SECP256R1())
    jwks = tmp_path / "idp.jwks"
    _write_jwks(jwks, signing, "k1")
    now = [1_000_000.0]
    issuer = SubjectIssuer(
        "corp",
        SubjectIssuerConfig(
            issuer="https://login.example.com",
            audience=("credo",),
            algorithms=("ES256",),
            jwks_file=jwks,
            clock_skew=0,
        ),
        clock=lambda: now[0],
    )
    token = jwt.encode(
        {"iss": "https://login.example.com", "sub": "alice", "aud": "credo", "exp": 1_000_060},
        signing,
        algorithm="ES256",
        headers={"kid": "k1"},
    )
    decodes: list[str] = []
    real_decode = jwt.decode

    def counting_decode(*args: Any, **kwargs: Any) -> Any:
        decodes.append("decode")
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(jwt, "decode", counting_decode)
    for _ in range(3):
        assert issuer.verify(token).sub == "alice"
    assert decodes == ["decode"]
    now[0] = 1_000_061.0
    with pytest.raises(InvalidGrant, match="expired"):
        issuer.verify(token)
    now[0] = 1_000_000.0
    _write_jwks(jwks, ec.generate_private_key(ec.SECP256R1()), "k1")
    issuer._recent = (None, 0.0)  # the file is re-checked at most every second
    with pytest.raises(InvalidGrant):
        issuer.verify(token)
    assert len(decodes) == 2
