"""Typed application keys: the resources `create_app` wires, looked up by handlers."""

from __future__ import annotations

from typing import TYPE_CHECKING

import asyncpg
import socketio
from aiohttp import web

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from server.assistant import Assistant
    from server.auth import AuthService
    from server.block_producer import BlockProducer
    from server.blobs import BlobStore
    from server.games import GameService
    from server.bus import RedisHealth
    from server.demo_game import DemoGamePlayer
    from server.metrics import Metrics
    from server.payments import ChainVerifier
    from server.purchase_jobs import PurchaseWorker
    from server.realtime import Realtime
    from server.settings import Settings

SETTINGS: web.AppKey["Settings"] = web.AppKey("settings")
METRICS: web.AppKey["Metrics"] = web.AppKey("metrics")
AUTH: web.AppKey["AuthService"] = web.AppKey("auth")
POOL: web.AppKey[asyncpg.Pool] = web.AppKey("pool", asyncpg.Pool)
REDIS: web.AppKey["aioredis.Redis | None"] = web.AppKey("redis")
SIO: web.AppKey[socketio.AsyncServer] = web.AppKey("sio", socketio.AsyncServer)
MASTER_KEY: web.AppKey[bytes] = web.AppKey("master_key", bytes)
REALTIME: web.AppKey["Realtime"] = web.AppKey("realtime")
REDIS_HEALTH: web.AppKey["RedisHealth"] = web.AppKey("redis_health")
BLOBS: web.AppKey["BlobStore"] = web.AppKey("blobs")
ASSISTANT: web.AppKey["Assistant"] = web.AppKey("assistant")
PAYMENT_VERIFIER: web.AppKey["ChainVerifier"] = web.AppKey("payment_verifier")
PURCHASE_WORKER: web.AppKey["PurchaseWorker"] = web.AppKey("purchase_worker")
BLOCK_PRODUCER: web.AppKey["BlockProducer"] = web.AppKey("block_producer")
GAMES: web.AppKey["GameService"] = web.AppKey("games")
DEMO_GAME_PLAYER: web.AppKey["DemoGamePlayer"] = web.AppKey("demo_game_player")
