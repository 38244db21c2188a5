"""Prometheus metrics of the node agent; metric and label names live here only.

Served on ``metrics_address`` (``--metrics-address host:port``; off by default), as the
server's are, from a registry of the agent's own:

==========================================  =========================================
``credo_agent_workload_api_calls_total``    Workload API calls, by ``method``
``credo_agent_workload_api_refusals_total`` calls refused, by ``method`` and ``code``
                                            (PERMISSION_DENIED: no identity for the
                                            caller; RESOURCE_EXHAUSTED: rate limited)
``credo_agent_svids_cached``                X509-SVIDs in the cache
``credo_agent_entries``                     registration entries served to workloads
``credo_agent_sync_connected``              1 while the entry sync stream is up
``credo_agent_sync_last_event_id``          the last change-feed event id synced
``credo_agent_sync_resyncs_total``          times a sync heartbeat showed the agent's
                                            entries differ from the server's and it
                                            synced the full set again
==========================================  =========================================

The agent's own health check (``credo-agent healthcheck``) is a real ``FetchJWTSVID``
call through the public socket, so it counts among the calls.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, Metric

from credo._metrics import serve_metrics

__all__ = [
    "ENTRIES",
    "LABEL_CODE",
    "LABEL_METHOD",
    "SVIDS_CACHED",
    "SYNC_CONNECTED",
    "SYNC_LAST_EVENT_ID",
    "SYNC_RESYNCS_TOTAL",
    "WORKLOAD_API_CALLS_TOTAL",
    "WORKLOAD_API_REFUSALS_TOTAL",
    "AgentMetrics",
]

WORKLOAD_API_CALLS_TOTAL: Final = "credo_agent_workload_api_calls_total"
WORKLOAD_API_REFUSALS_TOTAL: Final = "credo_agent_workload_api_refusals_total"
SVIDS_CACHED: Final = "credo_agent_svids_cached"
ENTRIES: Final = "credo_agent_entries"
SYNC_CONNECTED: Final = "credo_agent_sync_connected"
SYNC_LAST_EVENT_ID: Final = "credo_agent_sync_last_event_id"
SYNC_RESYNCS_TOTAL: Final = "credo_agent_sync_resyncs_total"

LABEL_METHOD: Final = "method"
LABEL_CODE: Final = "code"


class _CounterFromSource:
    """A counter whose value a callable gives at scrape time (a count kept elsewhere, such
    as :attr:`~node_agent.sync.syncer.EntrySyncer.resyncs`); 0 until a source is set."""

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry) -> None:
        self._name = name.removesuffix("_total")
        self._documentation = documentation
        self._source: Callable[[], float] = lambda: 0.0
        registry.register(self)

    def set_function(self, source: Callable[[], float]) -> None:
        self._source = source

    def describe(self) -> list[Metric]:
        return [CounterMetricFamily(self._name, self._documentation)]

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self._name, self._documentation, value=self._source())


class AgentMetrics:
    """The agent's metrics on their own registry; ``serve_http`` exposes them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._calls = Counter(
            WORKLOAD_API_CALLS_TOTAL,
            "Workload API calls, by method",
            [LABEL_METHOD],
            registry=self.registry,
        )
        self._refusals = Counter(
            WORKLOAD_API_REFUSALS_TOTAL,
            "Workload API calls refused, by method and status code",
            [LABEL_METHOD, LABEL_CODE],
            registry=self.registry,
        )
        self.svids_cached = Gauge(SVIDS_CACHED, "X509-SVIDs cached", registry=self.registry)
        self.entries = Gauge(ENTRIES, "Entries served to workloads", registry=self.registry)
        self.sync_connected = Gauge(
            SYNC_CONNECTED, "1 while the entry sync stream is up", registry=self.registry
        )
        self.sync_last_event_id = Gauge(
            SYNC_LAST_EVENT_ID, "Last change-feed event id synced", registry=self.registry
        )
        self.sync_resyncs = _CounterFromSource(
            SYNC_RESYNCS_TOTAL,
            "Times a sync heartbeat showed the agent behind and it synced the full set again",
            self.registry,
        )

    # The Workload API handler's hooks (node_agent.workload_api.handler.WorkloadApiMetrics).

    def call(self, method: str) -> None:
        """Count one Workload API call."""
        self._calls.labels(method).inc()

    def refused(self, method: str, code: str) -> None:
        """Count one refused Workload API call (``code``: the gRPC status name)."""
        self._refusals.labels(method, code).inc()

    def set_gauge_sources(
        self,
        *,
        svids_cached: Callable[[], float],
        entries: Callable[[], float],
        sync_connected: Callable[[], float],
        sync_last_event_id: Callable[[], float],
        sync_resyncs: Callable[[], float],
    ) -> None:
        """Compute the gauges (and the resync counter) from the given callables at scrape
        time."""
        self.svids_cached.set_function(svids_cached)
        self.entries.set_function(entries)
        self.sync_connected.set_function(sync_connected)
        self.sync_last_event_id.set_function(sync_last_event_id)
        self.sync_resyncs.set_function(sync_resyncs)

    def serve_http(self, address: str) -> tuple[str, Callable[[], None]]:
        """Serve ``/metrics`` on ``host:port``; return the bound address and a stop function."""
        return serve_metrics(self.registry, address)
