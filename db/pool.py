"""The asyncpg pool and per-connection setup."""

from __future__ import annotations

import asyncpg

from server import jsonutil


async def init_connection(conn: asyncpg.Connection) -> None:
    """JSON and JSONB columns map to Python objects through orjson."""
    for typename in ("json", "jsonb"):
        await conn.set_type_codec(typename, schema="pg_catalog", encoder=jsonutil.dumps,
                                  decoder=jsonutil.loads, format="text")


async def create_pool(dsn: str, max_size: int) -> asyncpg.Pool:
    """Open the pool; fails fast when the database does not answer."""
    return await asyncpg.create_pool(dsn, min_size=1, max_size=max_size, init=init_connection,
                                     command_timeout=30, timeout=10)
