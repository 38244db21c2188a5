"""Benchmark: RFC 8693 token exchanges per second through the real token endpoint.

Run: ``./scripts/bench token_exchange [--json] [--seconds N] [--clients N]``.

A ``credo-server`` with its HTTP front end and one delegation policy; ``--clients``
(default 50) concurrent clients, each on its own keep-alive HTTPS connection with mutual
TLS as the agent (an X509-SVID minted by the server), POST the form of one exchange again
and again: one policy lookup, one RS256 verification of the person's token, one ES256
signature per token.

* ``exchanges_per_s`` — successful exchanges per second, all clients together;
* ``p50_s``, ``p99_s`` — latency of one exchange at that concurrency;
* ``raw_sign_per_s`` — PyJWT ``jwt.encode`` of the same claims with ES256 in this
  process, measured in the same run (before and after the endpoint phase, averaged);
* ``ratio`` — ``exchanges_per_s / raw_sign_per_s``; the target is >= 0.25;
* ``server_cpu_ms_per_exchange`` — CPU time (user + system) the server process used
  during the endpoint phase, per successful exchange: what one exchange costs the
  server, less moved by other load on the machine than the rates;
* ``raw_sign_cpu_ms`` — CPU time of one raw signature (the reference's cost);
* ``client_cpu_ms_per_exchange`` — CPU time of this process (the clients) per exchange;
* ``reference_https_per_s``, ``reference_server_cpu_ms`` — the floor of any endpoint
  written like this one: a bare aiohttp server in its own process (mutual TLS with the
  same client certificate, the same clients and form) that parses the form and answers a
  JSON body of the same size without doing anything else, measured the same way.

With ``--json`` the last line is ``{"name": "token_exchange", "metrics": {...}}``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import multiprocessing
import ssl
import time
from pathlib import Path
from typing import Any

import aiohttp
import jwt
from _common import Workspace, cpu_seconds, log, percentile, report
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

TARGET_RATIO = 0.25
IDP = "https://login.example.com"
GIT = "https://git.example.com"
AGENT = "spiffe://example.org/agents/bench"
GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"


def _cpu_s(process: Any) -> float:
    """CPU seconds so far of the server (or reference) process itself."""
    import psutil

    return cpu_seconds(psutil.Process(process.pid))[0]


def _raw_sign_rate(seconds: float) -> tuple[float, float]:
    """Signatures per wall second and CPU seconds per signature."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = int(time.time())
    claims = {
        "iss": "https://localhost:8443",
        "sub": "alice",
        "act": {"sub": AGENT},
        "client_id": AGENT,
        "aud": GIT,
        "scope": "repo:read",
        "iat": now,
        "exp": now + 300,
        "jti": "x" * 22,
        "credo_owner": "alice@example.com",
    }
    count = 0
    deadline = time.perf_counter() + seconds
    start, cpu = time.perf_counter(), time.process_time()
    while time.perf_counter() < deadline:
        for _ in range(50):
            jwt.encode(claims, key, algorithm="ES256", headers={"kid": "k", "typ": "at+jwt"})
        count += 50
    return count / (time.perf_counter() - start), (time.process_time() - cpu) / count


async def _drive(
    url: str, form: dict[str, str], context: ssl.SSLContext, clients: int, seconds: float
) -> tuple[int, list[float], int]:
    latencies: list[float] = []
    failures = 0
    deadline = time.perf_counter() + seconds

    async def one_client() -> None:
        nonlocal failures
        connector = aiohttp.TCPConnector(ssl=context, limit=1)
        async with aiohttp.ClientSession(connector=connector) as session:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                async with session.post(url, data=form) as response:
                    await response.read()
                    if response.status == 200:
                        latencies.append(time.perf_counter() - started)
                    else:
                        failures += 1

    await asyncio.gather(*(one_client() for _ in range(clients)))
    return len(latencies), latencies, failures


def _self_signed(root: Path) -> tuple[Path, Path, str]:
    """A localhost server certificate and key for the reference server, and its PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    cert_file, key_file = root / "reference.pem", root / "reference.key"
    cert_file.write_text(pem)
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file, pem


def _reference_server(cert: str, key: str, client_ca: str, body: bytes, port: Any) -> None:
    """The reference: mutual TLS, parse the form, answer ``body`` as JSON; nothing else."""
    from aiohttp import web

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    context.load_verify_locations(cadata=client_ca)
    context.verify_mode = ssl.CERT_REQUIRED

    async def token(request: web.Request) -> web.Response:
        form = await request.post()
        if "subject_token" not in form:
            return web.json_response({"error": "invalid_request"}, status=400)
        return web.Response(body=body, content_type="application/json")

    async def serve() -> None:
        app = web.Application()
        app.router.add_post("/oauth2/token", token)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        port.value = runner.addresses[0][1]
        await asyncio.Event().wait()

    asyncio.run(serve())


def _reference(
    ws: Workspace, form: dict[str, str], cert: Path, key: Path, client_ca: str, args: Any
) -> tuple[float, float]:
    """(requests per second, server CPU ms per request) of the reference server."""
    server_cert, server_key, server_pem = _self_signed(ws.root)
    body = json.dumps(
        {
            "access_token": "x" * 700,
            "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
            "token_type": "Bearer",
            "expires_in": 300,
            "scope": "repo:read",
        }
    ).encode()
    spawn = multiprocessing.get_context("spawn")
    port = spawn.Value("i", 0)
    process = spawn.Process(
        target=_reference_server,
        args=(str(server_cert), str(server_key), client_ca, body, port),
        daemon=True,
    )
    process.start()
    try:
        deadline = time.monotonic() + 30
        while port.value == 0:
            if time.monotonic() > deadline or not process.is_alive():
                raise RuntimeError("the reference server did not start")
            time.sleep(0.05)
        context = ssl.create_default_context(cadata=server_pem)
        context.load_cert_chain(cert, key)
        url = f"https://localhost:{port.value}/oauth2/token"
        asyncio.run(_drive(url, form, context, min(args.clients, 4), 1.0))  # warm up
        assert process.pid is not None
        started, cpu = time.perf_counter(), _cpu_s(process)
        count, _, _ = asyncio.run(_drive(url, form, context, args.clients, args.seconds / 2))
        elapsed, cpu = time.perf_counter() - started, _cpu_s(process) - cpu
    finally:
        process.terminate()
        process.join(5)
    return count / elapsed, 1000 * cpu / max(count, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description="token exchanges per second")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=50)
    args = parser.parse_args()
    with Workspace() as ws:
        idp_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(idp_key.public_key()))
        jwk.update(kid="k1", alg="RS256")
        jwks = ws.root / "idp.jwks"
        jwks.write_text(json.dumps({"keys": [jwk]}))
        config = ws.root / "server.toml"
        config.write_text(
            "[server.delegation.issuers.corp]\n"
            f'issuer = "{IDP}"\njwks_file = "{jwks}"\naudience = ["credo"]\n'
        )
        server = ws.start_server(config=config, http_bind_address="127.0.0.1:0")
        server.cli_json(
            "entry", "create", "--spiffe-id", AGENT, "--parent-id",
            "spiffe://example.org/host", "--selector", "unix:uid:1",
        )  # fmt: skip
        server.cli_json(
            "delegation", "create", "--agent-id", AGENT, "--subject-issuer", "corp",
            "--scope", "repo:read", "--audience", GIT,
        )  # fmt: skip
        minted = server.cli_json("x509", "mint", "--spiffe-id", AGENT)
        cert, key = Path(ws.root / "agent.pem"), Path(ws.root / "agent.key")
        cert.write_text(minted["x509_svid"])
        key.write_text(minted["private_key"])
        context = ssl.create_default_context(cadata=server.bundle_pem())
        context.load_cert_chain(cert, key)
        now = int(time.time())
        person = jwt.encode(
            {"iss": IDP, "sub": "alice", "aud": "credo", "iat": now, "exp": now + 3600},
            idp_key,
            algorithm="RS256",
            headers={"kid": "k1"},
        )
        form = {
            "grant_type": GRANT,
            "subject_token": person,
            "subject_token_type": "urn:ietf:params:oauth:token-type:id_token",
            "audience": GIT,
            "scope": "repo:read",
        }
        url = f"{server.http_url}/oauth2/token"
        log("raw ES256 signing (before)")
        raw_before, cpu_before = _raw_sign_rate(min(3.0, args.seconds / 3))
        log(f"{args.clients} clients for {args.seconds}s against {url}")
        asyncio.run(_drive(url, form, context, min(args.clients, 4), 1.0))  # warm up
        started, server_cpu = time.perf_counter(), _cpu_s(server)
        client_cpu = time.process_time()
        count, latencies, failures = asyncio.run(
            _drive(url, form, context, args.clients, args.seconds)
        )
        elapsed = time.perf_counter() - started
        server_cpu = _cpu_s(server) - server_cpu
        client_cpu = time.process_time() - client_cpu
        log("raw ES256 signing (after)")
        raw_after, cpu_after = _raw_sign_rate(min(3.0, args.seconds / 3))
        log(f"reference: a bare aiohttp mutual-TLS server, {args.clients} clients")
        reference, reference_cpu = _reference(ws, form, cert, key, server.bundle_pem(), args)
    raw = (raw_before + raw_after) / 2
    rate = count / elapsed
    metrics = {
        "exchanges_per_s": round(rate, 1),
        "p50_s": round(percentile(latencies, 50), 4),
        "p99_s": round(percentile(latencies, 99), 4),
        "failures": failures,
        "clients": args.clients,
        "raw_sign_per_s": round(raw, 1),
        "ratio": round(rate / raw, 4),
        "server_cpu_ms_per_exchange": round(1000 * server_cpu / max(count, 1), 3),
        "raw_sign_cpu_ms": round(1000 * (cpu_before + cpu_after) / 2, 4),
        "client_cpu_ms_per_exchange": round(1000 * client_cpu / max(count, 1), 3),
        "reference_https_per_s": round(reference, 1),
        "reference_server_cpu_ms": round(reference_cpu, 3),
        "reference_ratio": round(reference / raw, 4),
    }
    report(
        "token_exchange",
        metrics,
        [("ratio", ">=", TARGET_RATIO)],
        as_json=args.json,
    )


if __name__ == "__main__":
    main()
