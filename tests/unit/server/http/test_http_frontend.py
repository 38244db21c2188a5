"""The HTTP front end: TLS, routes other packages add, and the rules every request follows."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import generate_latest

from server.http import FileCertificate, HttpConfig, HttpError, HttpFrontend, json_response
from server.telemetry import Metrics
from tests.helpers.webpki import WebCa


def client_context(ca: WebCa) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=ca.root_pem.decode())
    return ctx


async def hello(request: web.Request) -> web.StreamResponse:
    return json_response(
        {"hello": request.match_info.get("name", "world")}, cache_control="max-age=5"
    )


async def echo(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    return json_response({"bytes": len(body)})


async def broken(request: web.Request) -> web.StreamResponse:
    raise RuntimeError("secret internal detail")


async def refused(request: web.Request) -> web.StreamResponse:
    raise HttpError(400, "grant_type is missing", error="invalid_grant")


async def slow(request: web.Request) -> web.StreamResponse:
    await asyncio.sleep(30)
    return json_response({})


ROUTES = [
    web.get("/hello", hello),
    web.get("/hello/{name}", hello),
    web.post("/echo", echo),
    web.get("/broken", broken),
    web.get("/refused", refused),
    web.get("/slow", slow),
]


@asynccontextmanager
async def running(
    tmp_path: Path, ca: WebCa | None, metrics: Metrics | None = None, **settings: Any
) -> AsyncIterator[HttpFrontend]:
    settings.setdefault("bind_address", "127.0.0.1:0")
    config = HttpConfig(**settings)
    config.validate()
    certificate = None
    if ca is not None:
        cert, key = ca.write(tmp_path, ["localhost"], ips=["127.0.0.1"])
        certificate = FileCertificate(cert, key)
    frontend = HttpFrontend(
        config, certificate=certificate, metrics=metrics or Metrics(), data_dir=tmp_path
    )
    frontend.add_routes(ROUTES)
    await frontend.start()
    try:
        yield frontend
    finally:
        await frontend.close()


def run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(body())


async def fetch(
    url: str, ca: WebCa | None, method: str = "GET", data: bytes | None = None
) -> tuple[int, dict[str, str], bytes]:
    ssl_arg: ssl.SSLContext | bool = client_context(ca) if ca is not None else False
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, data=data, ssl=ssl_arg) as response,
    ):
        return response.status, dict(response.headers), await response.read()


def test_a_route_added_by_another_package_answers_over_tls(tmp_path: Path) -> None:
    """A handler given to add_routes answers over HTTPS with the configured certificate,
    and the bound address (port 0 picked a free one) is written to <data-dir>/http.addr."""
    ca = WebCa()

    async def body() -> None:
        async with running(tmp_path, ca) as frontend:
            _, port = frontend.address
            assert port != 0
            assert (tmp_path / "http.addr").read_text() == f"127.0.0.1:{port}\n"
            status, headers, data = await fetch(f"https://localhost:{port}/hello/ada", ca)
            assert status == 200
            assert json.loads(data) == {"hello": "ada"}
            assert headers["Content-Type"].startswith("application/json")
            assert headers["Cache-Control"] == "max-age=5"

    run(body)


def test_a_client_not_trusting_the_certificate_cannot_connect(tmp_path: Path) -> None:
    """A client that trusts another CA fails the TLS handshake; no plain HTTP is served."""
    ca = WebCa()

    async def body() -> None:
        async with running(tmp_path, ca) as frontend:
            _, port = frontend.address
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await fetch(f"https://localhost:{port}/hello", WebCa("other"))
            with pytest.raises(aiohttp.ClientError):
                await fetch(f"http://localhost:{port}/hello", None)

    run(body)


def test_errors_have_one_json_shape_and_no_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """404, 405, a handler's HttpError and an unexpected exception all answer
    {"error", "error_description"}; the 500 says nothing of the bug, the log has it."""
    ca = WebCa()

    async def body() -> None:
        async with running(tmp_path, ca) as frontend:
            base = f"https://localhost:{frontend.address[1]}"
            status, _, data = await fetch(f"{base}/nowhere", ca)
            assert (status, json.loads(data)["error"]) == (404, "not_found")
            status, headers, data = await fetch(f"{base}/echo", ca)
            assert (status, json.loads(data)["error"]) == (405, "method_not_allowed")
            assert "POST" in headers["Allow"]
            status, headers, data = await fetch(f"{base}/refused", ca)
            assert status == 400
            assert json.loads(data) == {
                "error": "invalid_grant",
                "error_description": "grant_type is missing",
            }
            assert headers["Cache-Control"] == "no-store"
            status, _, data = await fetch(f"{base}/broken", ca)
            assert status == 500
            assert json.loads(data) == {
                "error": "server_error",
                "error_description": "internal error",
            }
            assert b"secret internal detail" not in data
            assert b"Traceback" not in data

    with caplog.at_level(logging.ERROR, logger="server.http.frontend"):
        run(body)
    assert any("secret internal detail" in (r.exc_text or "") for r in caplog.records)


def test_a_body_over_the_limit_is_refused_with_413(tmp_path: Path) -> None:
    """A request body larger than max_request_bytes gets 413 in the JSON shape."""
    ca = WebCa()

    async def body() -> None:
        async with running(tmp_path, ca, max_request_bytes=2048) as frontend:
            url = f"https://localhost:{frontend.address[1]}/echo"
            status, _, data = await fetch(url, ca, "POST", b"x" * 2048)
            assert (status, json.loads(data)) == (200, {"bytes": 2048})
            status, _, data = await fetch(url, ca, "POST", b"x" * 4096)
            assert status == 413
            assert json.loads(data)["error"] == "request_too_large"

    run(body)


def test_a_request_not_answered_in_time_gets_503(tmp_path: Path) -> None:
    """A handler that takes longer than request_timeout is cut off with 503 and Retry-After."""
    ca = WebCa()

    async def body() -> None:
        async with running(tmp_path, ca, request_timeout=1) as frontend:
            started = asyncio.get_running_loop().time()
            status, headers, data = await fetch(f"https://localhost:{frontend.address[1]}/slow", ca)
            assert status == 503
            assert json.loads(data)["error"] == "temporarily_unavailable"
            assert headers["Retry-After"] == "1"
            assert asyncio.get_running_loop().time() - started < 10

    run(body)


def test_access_log_and_metrics(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Each request is one log line with the shared fields (no query string) and counts in
    credo_http_requests_total by route pattern; unknown paths count as 'unmatched'."""
    ca = WebCa()
    metrics = Metrics()

    async def body() -> None:
        async with running(tmp_path, ca, metrics) as frontend:
            base = f"https://localhost:{frontend.address[1]}"
            await fetch(f"{base}/hello/bob?access_token=sekrit", ca)
            await fetch(f"{base}/scan/for/admin.php", ca)

    with caplog.at_level(logging.INFO, logger="server.http.frontend"):
        run(body)
    lines = [r for r in caplog.records if r.getMessage() == "http request"]
    assert len(lines) == 2
    first = lines[0]
    assert (first.method, first.path, first.route, first.status) == (  # type: ignore[attr-defined]
        "GET",
        "/hello/bob",
        "/hello/{name}",
        200,
    )
    assert first.remote.startswith("127.0.0.1:")  # type: ignore[attr-defined]
    assert "sekrit" not in str(vars(first))
    exposed = generate_latest(metrics.registry).decode()
    assert 'credo_http_requests_total{code="200",method="GET",route="/hello/{name}"} 1.0' in exposed
    assert 'credo_http_requests_total{code="404",method="GET",route="unmatched"} 1.0' in exposed
    assert 'credo_http_request_seconds_count{route="/hello/{name}"} 1.0' in exposed


def test_insecure_http_serves_plain_http(tmp_path: Path) -> None:
    """With insecure_http = true (behind a TLS-terminating proxy) the front end speaks HTTP."""

    async def body() -> None:
        async with running(tmp_path, None, insecure_http=True) as frontend:
            assert frontend.url.startswith("http://")
            status, _, data = await fetch(f"{frontend.url}/hello", None)
            assert (status, json.loads(data)) == (200, {"hello": "world"})

    run(body)


def test_a_renewed_certificate_file_applies_to_new_connections(tmp_path: Path) -> None:
    """Replacing tls_cert_file/tls_key_file (certbot, cert-manager) changes the certificate
    new connections get, without a restart."""
    old_ca, new_ca = WebCa("old"), WebCa("new")

    async def body() -> None:
        async with running(tmp_path, old_ca) as frontend:
            url = f"https://localhost:{frontend.address[1]}/hello"
            assert (await fetch(url, old_ca))[0] == 200
            new_ca.write(tmp_path, ["localhost"], ips=["127.0.0.1"])
            assert (await fetch(url, new_ca))[0] == 200
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await fetch(url, old_ca)

    run(body)


def test_routes_cannot_be_added_after_start(tmp_path: Path) -> None:
    """Endpoints are wired before the front end starts (server/app.py), never later."""
    ca = WebCa()

    async def body() -> None:
        async with running(tmp_path, ca) as frontend:
            with pytest.raises(RuntimeError):
                frontend.add_routes([web.get("/late", hello)])

    run(body)


def test_a_client_that_never_finishes_its_headers_is_disconnected(tmp_path: Path) -> None:
    """A slow client (headers trickling in, slowloris) is closed after idle_timeout."""

    async def body() -> None:
        async with running(tmp_path, None, insecure_http=True, idle_timeout=1) as frontend:
            host, port = frontend.address
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"GET /hello HTTP/1.1\r\nHost: x\r\n")
            await writer.drain()
            started = asyncio.get_running_loop().time()
            data = await asyncio.wait_for(reader.read(), 10)
            assert data == b""  # closed without an answer
            assert asyncio.get_running_loop().time() - started < 5
            writer.close()

    run(body)
