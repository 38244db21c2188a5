"""The SPIFFE bundle endpoint: the trust domain's bundle for federated trust domains.

``GET /`` and ``GET /bundle`` on the HTTP front end answer the SPIFFE bundle (JWKS with
``use``, ``spiffe_sequence`` and ``spiffe_refresh_hint``; SPIFFE Trust Domain and Bundle,
4). The front end's certificate decides the profile: the server's own X509-SVID (the
default, ``https_spiffe``: federated servers verify it with the bundle they fetched last)
or a web PKI certificate from files (``https_web``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import web

from credo.bundle import Bundle

__all__ = ["BUNDLE_PATHS", "bundle_endpoint_routes"]

BUNDLE_PATHS = ("/", "/bundle")


def bundle_endpoint_routes(own_bundle: Callable[[], Bundle]) -> list[web.RouteDef]:
    """The bundle endpoint's routes; ``own_bundle`` may block (run in a worker thread)."""

    async def serve(request: web.Request) -> web.StreamResponse:
        bundle = await asyncio.to_thread(own_bundle)
        hint = bundle.refresh_hint or 300
        return web.Response(
            body=bundle.marshal(),
            content_type="application/json",
            headers={"Cache-Control": f"max-age={hint}"},
        )

    return [web.get(path, serve, allow_head=True) for path in BUNDLE_PATHS]
