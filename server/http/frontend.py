"""The server's one HTTP front end (aiohttp): routes from every package, one set of rules.

Other packages add endpoints by giving :meth:`HttpFrontend.add_routes` a list of aiohttp
route definitions before the front end starts (``server/app.py`` does the wiring)::

    from aiohttp import web
    from server.http import HttpError, json_response

    async def token(request: web.Request) -> web.StreamResponse:
        form = await request.post()               # bounded by max_request_bytes (413)
        if "grant_type" not in form:
            raise HttpError(400, "grant_type is missing")   # {"error": "invalid_request", ...}
        return json_response({"access_token": "..."}, cache_control="no-store")

    frontend.add_routes([web.post("/oauth2/token", token)])

What every request gets, whoever wrote the handler:

* a body limit (``max_request_bytes``; larger bodies get 413) and a deadline
  (``request_timeout``; a request not answered by then gets 503); a connection that sends
  no complete request for ``idle_timeout`` (slow headers included) is closed, and a TLS
  handshake must finish within 10 s;
* errors in one JSON shape (:mod:`server.http.errors`), including aiohttp's own 404/405/413;
  an unexpected exception is logged with its traceback and answered with a bare 500;
* one access log line (``http request`` with ``method``, ``path``, ``route``, ``status``,
  ``duration_ms``, ``bytes``, ``remote``; never the query string, which may hold a token);
* metrics ``credo_http_requests_total{route,method,code}`` and
  ``credo_http_request_seconds{route}`` (route = the path pattern, ``unmatched`` for a 404,
  so scanners cannot blow up label cardinality).

TLS is from :mod:`server.http.tls`; plain HTTP only when ``insecure_http`` is set. With
port 0 the bound address is written to ``<data-dir>/http.addr``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from aiohttp import web

from credo._files import write_atomically
from server.http.config import HttpConfig
from server.http.errors import ERROR_CODES, HttpError
from server.http.tls import CertificateSource, dynamic_context
from server.telemetry import Metrics

__all__ = ["ADDRESS_FILE", "HttpFrontend", "json_response"]

log = logging.getLogger(__name__)

ADDRESS_FILE = "http.addr"
_SHUTDOWN_GRACE = 5.0
_HANDSHAKE_TIMEOUT = 10.0
_UNMATCHED = "unmatched"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(
    data: Any,
    *,
    status: int = 200,
    cache_control: str | None = None,
    headers: Mapping[str, str] | None = None,
    content_type: str = "application/json",
) -> web.Response:
    """A JSON response (compact, UTF-8) with an optional ``Cache-Control``."""
    out = dict(headers or {})
    if cache_control is not None:
        out["Cache-Control"] = cache_control
    body = json.dumps(data, separators=(",", ":")).encode()
    return web.Response(body=body, status=status, content_type=content_type, headers=out)


def _error_response(err: HttpError) -> web.Response:
    headers = {"Cache-Control": "no-store", **err.headers}
    return json_response(err.body(), status=err.status, headers=headers)


def _route_label(request: web.Request) -> str:
    info = request.match_info
    if isinstance(info, web.UrlMappingMatchInfo) and info.http_exception is None:
        resource = info.route.resource
        if resource is not None:
            return resource.canonical
    return _UNMATCHED


class HttpFrontend:
    """One aiohttp application on ``config.bind_address``; see the module docstring."""

    def __init__(
        self,
        config: HttpConfig,
        *,
        certificate: CertificateSource | None,
        metrics: Metrics,
        data_dir: Path,
    ) -> None:
        if certificate is None and not config.insecure_http:
            raise ValueError("the HTTP front end needs a certificate unless insecure_http is set")
        self.config = config
        self._certificate = certificate
        self._metrics = metrics
        self._data_dir = data_dir
        self._app = web.Application(
            client_max_size=config.max_request_bytes,
            middlewares=[self._middleware],
        )
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None
        self._address: tuple[str, int] | None = None

    # --- wiring ---------------------------------------------------------------------

    def add_routes(self, routes: Iterable[web.AbstractRouteDef]) -> None:
        """Add endpoints (``web.get(path, handler)``, ...); only before :meth:`start`."""
        if self._runner is not None:
            raise RuntimeError("routes must be added before the HTTP front end starts")
        self._app.add_routes(list(routes))

    @property
    def scheme(self) -> str:
        return "http" if self.config.insecure_http else "https"

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); the real port when 0 was asked for."""
        if self._address is None:
            raise RuntimeError("the HTTP front end is not started")
        return self._address

    @property
    def url(self) -> str:
        """``https://host:port`` of the bound socket (for logs and tests)."""
        host, port = self.address
        if ":" in host:
            host = f"[{host}]"
        return f"{self.scheme}://{host}:{port}"

    # --- lifecycle ------------------------------------------------------------------

    async def start(self) -> tuple[str, int]:
        """Bind and serve; write ``<data-dir>/http.addr``; return the bound address."""
        runner = web.AppRunner(
            self._app,
            access_log=None,  # the middleware logs, with the shared fields
            handle_signals=False,
            keepalive_timeout=float(self.config.idle_timeout),
            shutdown_timeout=_SHUTDOWN_GRACE,
        )
        await runner.setup()
        self._runner = runner
        ssl_context = None if self._certificate is None else dynamic_context(self._certificate)
        host, port = self.config.host_port
        loop = asyncio.get_running_loop()
        assert runner.server is not None
        self._server = await loop.create_server(
            runner.server,
            host,
            port,
            ssl=ssl_context,
            ssl_handshake_timeout=_HANDSHAKE_TIMEOUT if ssl_context is not None else None,
            reuse_address=True,
            backlog=1024,
            family=socket.AF_INET6 if ":" in host else socket.AF_UNSPEC,
        )
        name = self._server.sockets[0].getsockname()
        self._address = (str(name[0]), int(name[1]))
        bound = f"{name[0]}:{name[1]}" if ":" not in str(name[0]) else f"[{name[0]}]:{name[1]}"
        write_atomically(self._data_dir / ADDRESS_FILE, f"{bound}\n".encode(), 0o644)
        if self._certificate is None:
            log.warning(
                "serving plain HTTP (insecure_http = true): only behind a TLS-terminating proxy",
                extra={"address": bound},
            )
        log.info("serving http", extra={"address": bound, "scheme": self.scheme})
        return self._address

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    async def close(self) -> None:
        self.stop_accepting()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            if runner.server is not None:
                await runner.server.shutdown(_SHUTDOWN_GRACE)
            await runner.cleanup()
        if self._server is not None:
            server, self._server = self._server, None
            server.close()
            await server.wait_closed()

    # --- the rules every request follows ------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        route = _route_label(request)
        response: web.StreamResponse
        try:
            async with asyncio.timeout(self.config.request_timeout):
                response = await handler(request)
        except HttpError as err:
            response = _error_response(err)
        except web.HTTPException as exc:
            response = self._aiohttp_error(exc)
        except TimeoutError:
            response = _error_response(
                HttpError(
                    503,
                    f"the request was not answered within {self.config.request_timeout}s",
                    headers={"Retry-After": "1"},
                )
            )
        except asyncio.CancelledError:
            raise
        except (ConnectionResetError, ssl.SSLError):
            raise  # the client went away; nothing to answer
        except Exception:
            log.exception("http handler failed", extra={"method": request.method, "route": route})
            response = _error_response(HttpError(500, "internal error"))
        self._record(request, route, response, time.perf_counter() - started)
        return response

    def _aiohttp_error(self, exc: web.HTTPException) -> web.StreamResponse:
        """aiohttp's own errors (404, 405, 413, redirects) in the one JSON shape."""
        if exc.status < 400:
            return exc
        if exc.status == 413:
            description = f"request body larger than {self.config.max_request_bytes} bytes"
        elif exc.status == 405:
            description = "method not allowed"
        elif exc.status == 404:
            description = "no such endpoint"
        else:
            description = exc.reason
        headers = {}
        if "Allow" in exc.headers:
            headers["Allow"] = exc.headers["Allow"]
        err = HttpError(exc.status, description, error=ERROR_CODES.get(exc.status), headers=headers)
        return _error_response(err)

    def _record(
        self, request: web.Request, route: str, response: web.StreamResponse, seconds: float
    ) -> None:
        status = response.status
        self._metrics.on_http_request(route, request.method, status, seconds)
        peer = request.transport.get_extra_info("peername") if request.transport else None
        log.info(
            "http request",
            extra={
                "method": request.method,
                "path": request.path[:200],
                "route": route,
                "status": status,
                "duration_ms": round(seconds * 1000, 2),
                "bytes": response.content_length,
                "remote": f"{peer[0]}:{peer[1]}" if peer else "",
            },
        )
