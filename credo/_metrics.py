"""The Prometheus endpoint both processes serve (``metrics_address``): one registry each.

Metric and label names live in each process's telemetry module (``server/telemetry.py``,
``node_agent/telemetry.py``); this module only serves a registry over HTTP.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from prometheus_client import CollectorRegistry, start_http_server

__all__ = ["serve_metrics"]

log = logging.getLogger(__name__)


def serve_metrics(registry: CollectorRegistry, address: str) -> tuple[str, Callable[[], None]]:
    """Serve ``/metrics`` for ``registry`` on ``host:port`` (port 0: any free one); return
    the bound ``host:port`` and a function that stops serving."""
    host, _, port = address.rpartition(":")
    server, thread = start_http_server(int(port), addr=host or "0.0.0.0", registry=registry)
    bound = f"{host or '0.0.0.0'}:{server.server_port}"
    log.info("serving metrics", extra={"address": bound})

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return bound, stop
