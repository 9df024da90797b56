"""The application factory: wires resources, routes, namespaces; nothing else."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import AsyncIterator

import socketio
import structlog
from aiohttp import web

import handlers
from db import migrate
from db.pool import POOL, create_pool
from handlers import account_deletion as account_deletion_handlers
from handlers import accounts as accounts_handlers
from handlers import admin as admin_handlers
from handlers import apidocs as apidocs_handlers
from handlers import assistant as assistant_handlers
from handlers import auth as auth_handlers
from handlers import chain as chain_handlers
from handlers import dao as dao_handlers
from handlers import dataset_query as dataset_query_handlers
from handlers import events as events_handlers
from handlers import games as games_handlers
from handlers import kyc as kyc_handlers
from handlers import marketplace as marketplace_handlers
from handlers import mining as mining_handlers
from handlers import network as network_handlers
from handlers import nfts as nft_handlers
from handlers import purchases as purchase_handlers
from handlers import seller as seller_handlers
from handlers import staking as staking_handlers
from handlers import storage as storage_handlers
from server.adapters.embedded import database_dsn
from server.core import jsonutil
from server.core.crypto import MASTER_KEY
from server.core.errors import NotFound
from server.core.memory import heap_trim_ctx
from server.core.metrics import METRICS, Metrics
from server.core.secrets import load_or_create_secret
from server.core.settings import SETTINGS, Settings
from server.edge.health import routes as health_routes
from server.edge.http import HubApplication
from server.edge.namespace import HubSocketServer
from server.edge.rest import error_envelopes, request_context
from server.edge.security_headers import security_headers
from server.realtime.engine import SIO
from server.realtime.fanout import RedisFanoutManager, create_client_manager
from server.realtime.history import HistoryStore, MemoryHistory, RedisHistory
from server.realtime.hub import REALTIME, SERVER_SHUTDOWN_EVENT, Realtime, RealtimeLimits
from server.realtime.outbox import run_relay
from server.realtime.presence import MemoryPresence, PresenceTracker, RedisPresence, heartbeat_loop
from server.realtime.redis import REDIS, REDIS_HEALTH, RedisHealth, connect_redis
from server.services import demo
from server.services.accounts import accounts_ctx
from server.services.assistant import assistant_ctx
from server.services.assistant_history import assistant_history_ctx
from server.services.auth import AUTH, AuthService, auth_ctx
from server.services.block_producer import block_producer_ctx
from server.services.dao import dao_ctx
from server.services.dataset_query import dataset_query_ctx
from server.services.datasets import blobs_ctx
from server.services.demo_game import demo_game_ctx
from server.services.escrow import escrow_ctx
from server.services.games import games_ctx
from server.services.keys import load_master_key
from server.services.purchase_jobs import purchase_jobs_ctx

log = structlog.get_logger(__name__)
STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
LISTENER_START_SECONDS = 2.0  # a node starts degraded (not ready) rather than not at all


async def database_ctx(app: web.Application) -> AsyncIterator[None]:
    """PostgreSQL: the configured one or an embedded one; migrated; pooled; closed on exit."""
    settings = app[SETTINGS]
    async with database_dsn(settings.database_url, settings.data_dir) as dsn:
        if settings.migrate_on_start:
            await migrate.upgrade_async(dsn)
        app[POOL] = await create_pool(dsn, settings.db_pool_max)
        try:
            if settings.demo_data_on_first_start:
                async with app[POOL].acquire() as conn:
                    await demo.load_if_empty(conn, settings, app[MASTER_KEY])
            yield
        finally:
            try:
                async with asyncio.timeout(settings.shutdown_timeout):
                    await app[POOL].close()
            except TimeoutError:
                # close() waits for every connection to come back; cancelled, it terminates them.
                log.warning("database_pool_close_timed_out", seconds=settings.shutdown_timeout)


async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
    """Redis when REDIS_URL is set; single-node mode (None) otherwise."""
    settings = app[SETTINGS]
    app[REDIS_HEALTH] = RedisHealth()
    app[REDIS] = connect_redis(settings.redis_url, pool_size=settings.redis_pool_size,
                               pool_timeout=settings.redis_pool_timeout) if settings.redis_url else None
    yield
    if app[REDIS] is not None:
        await app[REDIS].aclose()


async def realtime_ctx(app: web.Application) -> AsyncIterator[None]:
    """The delivery engine, its presence heartbeat and the outbox relay."""
    settings, redis, health = app[SETTINGS], app[REDIS], app[REDIS_HEALTH]
    manager = app[SIO].manager
    node_id = uuid.uuid4().hex
    if redis is None:
        history: HistoryStore = MemoryHistory(settings.history_cap, settings.history_ttl)
        presence: PresenceTracker = MemoryPresence()
    else:
        history = RedisHistory(redis, settings.redis_prefix, settings.history_cap, settings.history_ttl, health=health,
                               peer_channels=manager.peer_channels if isinstance(manager, RedisFanoutManager) else None)
        presence = RedisPresence(redis, settings.redis_prefix, settings.presence_ttl, health=health)
    metrics = app[METRICS]
    realtime = app[REALTIME] = Realtime(
        app[SIO], history, presence, RealtimeLimits(
            max_channels_per_connection=settings.max_channels_per_connection,
            max_connections_per_user=settings.max_connections_per_user),
        node_id=node_id, on_published=lambda event: metrics.event_out(event.type).inc())
    for namespace_class in handlers.NAMESPACES:
        realtime.register(namespace_class.name, namespace_class.channels)
    tasks = [asyncio.create_task(health.run_with_backoff(
        lambda: run_relay(app[POOL], realtime.publish_many, poll_interval=settings.outbox_poll_interval,
                          on_relayed=metrics.outbox_relayed.inc), "outbox_relay"))]
    if redis is not None:
        tasks.append(asyncio.create_task(heartbeat_loop(presence, node_id, settings.presence_ttl / 3)))
        tasks.append(asyncio.create_task(realtime.watch_unstored()))
    if isinstance(manager, RedisFanoutManager):
        manager.on_resubscribed = realtime.resync
        # python-socketio starts the listener on the first connection; a fresh node must hear
        # other nodes (and be ready) before anyone connects.
        app[SIO].manager_initialized = True
        manager.initialize()
        if not await manager.wait_listening(LISTENER_START_SECONDS):
            log.warning("pubsub_listener_not_ready", waited_seconds=LISTENER_START_SECONDS)
    yield
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if isinstance(manager, RedisFanoutManager):
        await manager.close()


# SHUTDOWN_TIMEOUT in quarters: one for the disconnect handlers (notify_shutdown), two for aiohttp's
# wait for running requests (it waits, cancels them, then waits as long again), one for the rest.
SHUTDOWN_STEP_SHARE = 0.25


async def notify_shutdown(app: web.Application) -> None:
    """Tell this process's clients to reconnect elsewhere, then close their connections at once."""
    sio = app[SIO]
    for namespace in sio.namespace_handlers:
        # Delivered here and now: through Redis it would reach every node's clients, and ours only
        # after their connections are closed.
        await sio.emit(SERVER_SHUTDOWN_EVENT, {"reconnect": True}, namespace=namespace, ignore_queue=True)
    # Websockets get a close frame (1001 going away) right behind the notice; left open, aiohttp
    # would wait its whole shutdown timeout for their handlers, twice.
    count = await sio.eio.close_all(timeout=app[SETTINGS].shutdown_timeout * SHUTDOWN_STEP_SHARE)
    await sio.shutdown()
    log.info("sockets_closed", count=count)


def create_socket_server(settings: Settings, metrics: Metrics) -> socketio.AsyncServer:
    """The Socket.IO server with the fast broadcast path; with Redis, emits reach every process."""
    manager = create_client_manager(
        settings.redis_url, channel=settings.redis_prefix + "socketio",
        on_overflow=lambda namespace: metrics.slow_consumers.labels(namespace).inc(),
        pool_size=settings.redis_pool_size, pool_timeout=settings.redis_pool_timeout)
    return HubSocketServer(
        async_mode="aiohttp", client_manager=manager, json=jsonutil, cors_allowed_origins=list(settings.cors_origins),
        # The hard cap sits above our own limit so a moderately oversized payload gets a clear
        # payload_too_large ack from the dispatcher instead of a dropped connection.
        max_http_buffer_size=settings.max_payload_bytes * 2, logger=False, engineio_logger=False,
        node_name=settings.node_name)


def create_app(settings: Settings) -> web.Application:
    """Build the aiohttp application for these settings."""
    app = HubApplication(client_max_size=settings.max_payload_bytes,
                          middlewares=[security_headers, request_context, error_envelopes])
    app[SETTINGS] = settings
    app[METRICS] = Metrics()
    app[MASTER_KEY] = load_master_key(settings)
    app[AUTH] = AuthService(
        jwt_secret=load_or_create_secret(settings.data_dir, "jwt_secret", settings.jwt_secret),
        access_token_ttl=settings.access_token_ttl, refresh_token_ttl=settings.refresh_token_ttl,
        session_cache_ttl=settings.session_cache_ttl,
        google_client_id=settings.google_client_id, google_jwks_url=settings.google_jwks_url)
    app.cleanup_ctx.append(database_ctx)
    app.cleanup_ctx.append(redis_ctx)
    app.cleanup_ctx.append(realtime_ctx)
    app.cleanup_ctx.append(auth_ctx)
    app.cleanup_ctx.append(accounts_ctx)
    app.cleanup_ctx.append(assistant_ctx)
    app.cleanup_ctx.append(assistant_history_ctx)
    app.cleanup_ctx.append(dataset_query_ctx)
    app.cleanup_ctx.append(block_producer_ctx)
    app.cleanup_ctx.append(blobs_ctx)
    app.cleanup_ctx.append(escrow_ctx)
    app.cleanup_ctx.append(purchase_jobs_ctx)
    app.cleanup_ctx.append(games_ctx)
    app.cleanup_ctx.append(dao_ctx)
    app.cleanup_ctx.append(demo_game_ctx)
    app.cleanup_ctx.append(heap_trim_ctx)
    app[METRICS].watch_pool(lambda: app.get(POOL))

    sio = create_socket_server(settings, app[METRICS])
    for namespace_class in handlers.NAMESPACES:
        sio.register_namespace(namespace_class(app))
    sio.attach(app, socketio_path="socket.io")
    app[SIO] = sio
    app.on_shutdown.append(notify_shutdown)

    app.router.add_routes(health_routes)
    app.router.add_routes(auth_handlers.routes)
    app.router.add_routes(chain_handlers.routes)
    app.router.add_routes(dao_handlers.routes)
    app.router.add_routes(admin_handlers.routes)
    app.router.add_routes(events_handlers.routes)
    app.router.add_routes(assistant_handlers.routes)
    app.router.add_routes(marketplace_handlers.routes)
    app.router.add_routes(purchase_handlers.routes)
    app.router.add_routes(seller_handlers.routes)
    app.router.add_routes(dataset_query_handlers.routes)
    app.router.add_routes(games_handlers.routes)
    app.router.add_routes(nft_handlers.routes)
    app.router.add_routes(storage_handlers.routes)
    app.router.add_routes(network_handlers.routes)
    app.router.add_routes(kyc_handlers.routes)
    app.router.add_routes(staking_handlers.routes)
    app.router.add_routes(mining_handlers.routes)
    app.router.add_routes(account_deletion_handlers.routes)
    app.router.add_routes(accounts_handlers.routes)
    app.router.add_routes(apidocs_handlers.routes)
    app.router.add_get("/{path:.*}", handle_static)  # last: every other route wins
    return app


async def handle_static(request: web.Request) -> web.FileResponse:
    """The browser client's files from static/ (index.html at /); JSON not_found otherwise."""
    # Our own lookup rather than add_static: its missing-file answer is a bare 404 that would
    # bypass the error envelope for every unknown URL, /api/v1 included.
    relative = request.match_info["path"] or "index.html"
    # A NUL (or any control character) is no file name, and os calls raise on NUL.
    if not relative.isprintable():
        raise NotFound(f"no route {request.method} {request.path}")
    path = (STATIC_DIR / relative).resolve()
    if not path.is_relative_to(STATIC_DIR) or not path.is_file():
        raise NotFound(f"no route {request.method} {request.path}")
    return web.FileResponse(path)
