"""The asyncpg pool and per-connection setup."""

from __future__ import annotations

import contextlib
import datetime as dt
from typing import AsyncIterator

import asyncpg
from aiohttp import web

from server.core import jsonutil

POOL: web.AppKey[asyncpg.Pool] = web.AppKey("pool", asyncpg.Pool)


async def init_connection(conn: asyncpg.Connection) -> None:
    """JSON and JSONB columns map to Python objects through orjson."""
    for typename in ("json", "jsonb"):
        await conn.set_type_codec(typename, schema="pg_catalog", encoder=jsonutil.dumps,
                                  decoder=jsonutil.loads, format="text")


async def create_pool(dsn: str, max_size: int) -> asyncpg.Pool:
    """Open the pool; fails fast when the database does not answer."""
    return await asyncpg.create_pool(dsn, min_size=1, max_size=max_size, init=init_connection,
                                     command_timeout=30, timeout=10)


@contextlib.asynccontextmanager
async def leadership(pool: asyncpg.Pool, lock_key: int) -> AsyncIterator[asyncpg.Connection | None]:
    """A pooled connection holding advisory lock `lock_key`, or None while another process holds it.

    Only one process across the cluster leads a singleton job (the block producer, the outbox
    relay, the demo game); the lock lives as long as the connection, so a dead leader's is freed.
    """
    async with pool.acquire() as conn:
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", lock_key):
            yield None
            return
        try:
            yield conn
        finally:
            # Releasing the connection also drops the lock (the pool resets it); this is prompter.
            with contextlib.suppress(Exception):
                await conn.execute("SELECT pg_advisory_unlock($1)", lock_key)


async def ping(conn: asyncpg.Connection) -> None:
    """A round trip that proves the database answers."""
    await conn.fetchval("SELECT 1")


async def server_version(conn: asyncpg.Connection) -> str:
    """The PostgreSQL server's version number, e.g. "16.4"."""
    return (await conn.fetchval("SHOW server_version")).split()[0]


async def now(conn: asyncpg.Connection) -> dt.datetime:
    """The database's clock (the transaction's start inside one): deadlines and reward windows use it."""
    return await conn.fetchval("SELECT now()")
