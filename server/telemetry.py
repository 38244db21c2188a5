"""Prometheus metrics of the signing server; metric and label names live here only.

Everything is registered on a dedicated :class:`prometheus_client.CollectorRegistry`
(never the global one), so several servers in one process (tests) do not collide.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from credo._metrics import serve_metrics

__all__ = [
    "AGENTS",
    "CA_EXPIRY_SECONDS",
    "DATASTORE_STATEMENTS_TOTAL",
    "ENTRIES",
    "FEDERATION_REFRESHES_TOTAL",
    "HTTP_REQUESTS_TOTAL",
    "HTTP_REQUEST_SECONDS",
    "KIND_AGENT",
    "KIND_JWT",
    "KIND_X509",
    "LABEL_CODE",
    "LABEL_KIND",
    "LABEL_METHOD",
    "LABEL_RESULT",
    "LABEL_ROUTE",
    "LABEL_TRUST_DOMAIN",
    "NODE_ATTESTATIONS_TOTAL",
    "RESULT_FAILURE",
    "RESULT_SUCCESS",
    "SIGNING_SECONDS",
    "SVIDS_SIGNED_TOTAL",
    "Metrics",
]

SVIDS_SIGNED_TOTAL: Final = "credo_svids_signed_total"
SIGNING_SECONDS: Final = "credo_signing_seconds"
ENTRIES: Final = "credo_entries"
AGENTS: Final = "credo_agents"
NODE_ATTESTATIONS_TOTAL: Final = "credo_node_attestations_total"
CA_EXPIRY_SECONDS: Final = "credo_ca_expiry_seconds"
FEDERATION_REFRESHES_TOTAL: Final = "credo_federation_bundle_refreshes_total"
HTTP_REQUESTS_TOTAL: Final = "credo_http_requests_total"
DATASTORE_STATEMENTS_TOTAL: Final = "credo_datastore_statements_total"
HTTP_REQUEST_SECONDS: Final = "credo_http_request_seconds"

LABEL_KIND: Final = "kind"
LABEL_RESULT: Final = "result"
# HTTP front end: the route's path pattern ("unmatched" for 404s), the method, the status.
LABEL_ROUTE: Final = "route"
LABEL_METHOD: Final = "method"
LABEL_CODE: Final = "code"
# Federation: the federated trust domain (one per relationship, so bounded by the admin).
LABEL_TRUST_DOMAIN: Final = "trust_domain"

KIND_X509: Final = "x509"
KIND_JWT: Final = "jwt"
KIND_WIT: Final = "wit"
KIND_AGENT: Final = "agent"
RESULT_SUCCESS: Final = "success"
RESULT_FAILURE: Final = "failure"

# The CA's sign kinds (server.ca.ca.SIGN_*) mapped to this module's ``kind`` label.
_SIGN_KIND_LABEL = {
    "x509_workload": KIND_X509,
    "x509_agent": KIND_AGENT,
    "x509_server": KIND_X509,
    "jwt": KIND_JWT,
    "wit": KIND_WIT,
}


class Metrics:
    """The server's metrics on their own registry; ``serve`` exposes them over HTTP."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.svids_signed = Counter(
            SVIDS_SIGNED_TOTAL, "SVIDs signed, by kind", [LABEL_KIND], registry=self.registry
        )
        self.signing_seconds = Histogram(
            SIGNING_SECONDS,
            "Time to build and sign one SVID",
            [LABEL_KIND],
            registry=self.registry,
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1),
        )
        self.entries = Gauge(ENTRIES, "Registration entries", registry=self.registry)
        self.agents = Gauge(AGENTS, "Attested agents", registry=self.registry)
        self.node_attestations = Counter(
            NODE_ATTESTATIONS_TOTAL,
            "Node attestations, by result",
            [LABEL_RESULT],
            registry=self.registry,
        )
        self.ca_expiry = Gauge(
            CA_EXPIRY_SECONDS, "Seconds until the active X.509 CA expires", registry=self.registry
        )
        # A counter read from the datastore at scrape time (a Gauge: prometheus_client's
        # Counter cannot take a callable); its name says it only grows.
        self.datastore_statements = Gauge(
            DATASTORE_STATEMENTS_TOTAL,
            "SQL statements sent to the datastore since the server started",
            registry=self.registry,
        )

        self.federation_refreshes = Counter(
            FEDERATION_REFRESHES_TOTAL,
            "Federated bundle fetches, by trust domain and result",
            [LABEL_TRUST_DOMAIN, LABEL_RESULT],
            registry=self.registry,
        )
        self.http_requests = Counter(
            HTTP_REQUESTS_TOTAL,
            "HTTP requests answered, by route, method and status code",
            [LABEL_ROUTE, LABEL_METHOD, LABEL_CODE],
            registry=self.registry,
        )
        self.http_request_seconds = Histogram(
            HTTP_REQUEST_SECONDS,
            "Time to answer one HTTP request, by route",
            [LABEL_ROUTE],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0),
        )

    def on_federation_refresh(self, trust_domain: str, ok: bool) -> None:
        """The federation refresher's hook: one bundle fetch and whether it worked."""
        self.federation_refreshes.labels(
            trust_domain, RESULT_SUCCESS if ok else RESULT_FAILURE
        ).inc()

    def on_http_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """The HTTP front end's hook: count the request and record how long it took."""
        self.http_requests.labels(route, method, str(status)).inc()
        self.http_request_seconds.labels(route).observe(seconds)

    def on_sign(self, sign_kind: str, seconds: float) -> None:
        """The CA's ``on_sign`` hook: count the SVID and record how long it took."""
        kind = _SIGN_KIND_LABEL.get(sign_kind, sign_kind)
        self.svids_signed.labels(kind).inc()
        self.signing_seconds.labels(kind).observe(seconds)

    def set_gauge_sources(
        self,
        *,
        entries: Callable[[], float],
        agents: Callable[[], float],
        ca_expiry: Callable[[], float],
        datastore_statements: Callable[[], float] = lambda: 0.0,
    ) -> None:
        """Compute the gauges from the given callables at scrape time."""
        self.entries.set_function(entries)
        self.agents.set_function(agents)
        self.ca_expiry.set_function(ca_expiry)
        self.datastore_statements.set_function(datastore_statements)

    def serve_http(self, address: str) -> tuple[str, Callable[[], None]]:
        """Serve ``/metrics`` on ``host:port``; return the bound address and a stop function."""
        return serve_metrics(self.registry, address)
