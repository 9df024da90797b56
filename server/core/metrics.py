"""Prometheus metrics, in a registry per app so several apps can live in one process (tests)."""

from __future__ import annotations

import functools
from typing import Callable

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


class _PoolCollector(Collector):
    """Reads the asyncpg pool's size at scrape time instead of tracking it on every acquire."""

    def __init__(self, pool_getter: Callable[[], object | None]) -> None:
        self._pool_getter = pool_getter

    def collect(self):
        pool = self._pool_getter()
        size = GaugeMetricFamily("hub_db_pool_connections", "Database pool connections", labels=["state"])
        if pool is not None:
            total, idle = pool.get_size(), pool.get_idle_size()  # type: ignore[attr-defined]
            size.add_metric(["in_use"], total - idle)
            size.add_metric(["idle"], idle)
            size.add_metric(["max"], pool.get_max_size())  # type: ignore[attr-defined]
        yield size


class Metrics:
    """Every metric the server exports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.connections = Gauge("hub_socket_connections", "Connected Socket.IO clients",
                                 ["namespace"], registry=self.registry)
        self.events_in = Counter("hub_events_in_total", "Client events received",
                                 ["namespace", "event", "outcome"], registry=self.registry)
        self.events_out = Counter("hub_events_out_total", "Server events published",
                                  ["type"], registry=self.registry)
        self.rate_limited = Counter("hub_rate_limited_total", "Client events refused by a rate limit",
                                    ["namespace"], registry=self.registry)
        self.slow_consumers = Counter("hub_slow_consumers_total",
                                      "Connections closed because they fell too far behind",
                                      ["namespace"], registry=self.registry)
        self.outbox_relayed = Counter("hub_outbox_relayed_total", "Outbox events published by the relay",
                                      registry=self.registry)
        self.handler_seconds = Histogram("hub_handler_seconds", "Handler latency",
                                         ["namespace", "event"], registry=self.registry,
                                         buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5))
        self.http_requests = Counter("hub_http_requests_total", "REST requests",
                                     ["method", "route", "status"], registry=self.registry)
        self.http_seconds = Histogram("hub_http_seconds", "REST latency", ["route"],
                                      registry=self.registry)
        self.dependency_up = Gauge("hub_dependency_up", "Whether a backing service answers (1/0)",
                                   ["service"], registry=self.registry)
        self.assistant_streams = Gauge("hub_assistant_streams",
                                       "Answers this process is writing (at most AI_MAX_STREAMS)",
                                       registry=self.registry)

        # Per event: prometheus_client's labels() checks and converts the values and takes a lock
        # on every call, 3-4% of the hub's CPU under reward ingest. Each metric's label sets are
        # few (namespaces x known events x outcomes), so their children are looked up once.
        self.event_in = functools.lru_cache(maxsize=4096)(self.events_in.labels)
        self.event_out = functools.lru_cache(maxsize=1024)(self.events_out.labels)
        self.handler_time = functools.lru_cache(maxsize=1024)(self.handler_seconds.labels)

    def watch_pool(self, pool_getter: Callable[[], object | None]) -> None:
        """Export the database pool's use, read at scrape time."""
        self.registry.register(_PoolCollector(pool_getter))

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)


METRICS: web.AppKey[Metrics] = web.AppKey("metrics", Metrics)
