"""Liveness, readiness and metrics endpoints."""

from __future__ import annotations

import asyncio

from aiohttp import web

from db.pool import POOL, ping
from server.core.metrics import METRICS
from server.edge.rest import json_response
from server.realtime.engine import SIO
from server.realtime.fanout import RedisFanoutManager
from server.realtime.redis import REDIS, REDIS_HEALTH

routes = web.RouteTableDef()
CHECK_TIMEOUT = 2.0


@routes.get("/healthz")
async def handle_healthz(request: web.Request) -> web.Response:
    """The process is alive."""
    return json_response({"ok": True, "data": {"status": "alive"}})


async def _check(name: str, probe) -> tuple[str, str]:
    try:
        await asyncio.wait_for(probe(), CHECK_TIMEOUT)
        return name, "ok"
    except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
        return name, f"down: {type(exc).__name__}"


async def _database_probe(request: web.Request) -> None:
    async with request.app[POOL].acquire(timeout=CHECK_TIMEOUT) as conn:
        await ping(conn)


async def _redis_probe(request: web.Request) -> None:
    # Through the shared health tracker, so an outage seen here is logged once like the bus's.
    if not await request.app[REDIS_HEALTH].ping(request.app[REDIS]):
        raise ConnectionError(request.app[REDIS_HEALTH].last_error)


def _listener(app: web.Application) -> RedisFanoutManager | None:
    manager = app[SIO].manager
    return manager if isinstance(manager, RedisFanoutManager) else None


async def _pubsub_probe(request: web.Request) -> None:
    # Redis may answer while this node's listener is still resubscribing: until it is, the node
    # would miss other nodes' events, so it is not ready.
    if not _listener(request.app).listening:
        raise ConnectionError("the pub/sub listener is not subscribed")


@routes.get("/readyz")
async def handle_readyz(request: web.Request) -> web.Response:
    """Database (and Redis when configured) answer: 200, else 503 naming what is down."""
    probes = [_check("database", lambda: _database_probe(request))]
    redis = request.app.get(REDIS)
    if redis is not None:
        probes.append(_check("redis", lambda: _redis_probe(request)))
    if _listener(request.app) is not None:
        probes.append(_check("redis_pubsub", lambda: _pubsub_probe(request)))
    results = dict(await asyncio.gather(*probes))
    metrics = request.app[METRICS]
    for name, status in results.items():
        metrics.dependency_up.labels(name).set(1 if status == "ok" else 0)
    ready = all(status == "ok" for status in results.values())
    if ready:
        return json_response({"ok": True, "data": {"status": "ready", "checks": results}})
    return json_response({"ok": False, "error": {"code": "unavailable", "message": "not ready",
                                                 "checks": results}}, status=503)


@routes.get("/metrics")
async def handle_metrics(request: web.Request) -> web.Response:
    """Prometheus text format."""
    if request.app[REDIS] is not None:
        # The bus records every Redis failure as it happens; export that, not only /readyz probes.
        request.app[METRICS].dependency_up.labels("redis").set(1 if request.app[REDIS_HEALTH].ok else 0)
    listener = _listener(request.app)
    if listener is not None:
        request.app[METRICS].dependency_up.labels("redis_pubsub").set(1 if listener.listening else 0)
    return web.Response(body=request.app[METRICS].render(),
                        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})
