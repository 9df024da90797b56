"""The asyncpg pool and per-connection setup."""

from __future__ import annotations

import contextlib
import datetime as dt
from typing import Any, AsyncIterator

import asyncpg
from aiohttp import web

from server.core import jsonutil

POOL: web.AppKey[asyncpg.Pool] = web.AppKey("pool", asyncpg.Pool)


async def init_connection(conn: asyncpg.Connection) -> None:
    """JSON and JSONB columns map to Python objects through orjson."""
    for typename in ("json", "jsonb"):
        await conn.set_type_codec(typename, schema="pg_catalog", encoder=jsonutil.dumps,
                                  decoder=jsonutil.loads, format="text")


class HubConnection(asyncpg.Connection):
    """A pooled connection that knows whether it holds session state (a LISTEN, a session advisory
    lock) which must not outlive its holder."""

    __slots__ = ("holds_session_state",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.holds_session_state = False

    def mark_session_state(self) -> None:
        """Have the pool reset this connection's session when it is released."""
        self.holds_session_state = True

    async def add_listener(self, channel: str, callback: Any) -> None:
        """LISTEN on `channel` (the connection's session then needs a reset on release)."""
        self.holds_session_state = True
        await super().add_listener(channel, callback)


async def reset_session_state(conn: HubConnection) -> None:
    """The pool's reset on release: only for connections that took session state.

    asyncpg's default runs `pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL` on every
    release, a round trip that cost as much as the statement of a short acquire (a session check, a
    reward batch). Nothing else here sets session state: settings are SET LOCAL / set_config(...,
    true) and advisory locks are transaction locks. An open transaction is rolled back by asyncpg
    before this runs.
    """
    if conn.holds_session_state:
        conn.holds_session_state = False
        await conn.execute(conn.get_reset_query())


async def create_pool(dsn: str, max_size: int) -> asyncpg.Pool:
    """Open the pool; fails fast when the database does not answer."""
    return await asyncpg.create_pool(dsn, min_size=1, max_size=max_size, init=init_connection,
                                     reset=reset_session_state, connection_class=HubConnection,
                                     command_timeout=30, timeout=10)


@contextlib.asynccontextmanager
async def leadership(pool: asyncpg.Pool, lock_key: int) -> AsyncIterator[asyncpg.Connection | None]:
    """A pooled connection holding advisory lock `lock_key`, or None while another process holds it.

    Only one process across the cluster leads a singleton job (the block producer, the outbox
    relay, the demo game); the lock lives as long as the connection, so a dead leader's is freed.
    """
    async with pool.acquire() as conn:
        conn.mark_session_state()
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
