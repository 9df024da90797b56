"""db/pool.py: a released connection's session is reset only when it took session state, and then fully."""

from __future__ import annotations

import asyncio

import pytest

from db.pool import create_pool, leadership

LOCK_KEY = 7_340_001


@pytest.fixture
async def one_connection_pool(pg_admin_dsn):
    """A pool of one connection, so every acquire gets the connection the previous one released."""
    pool = await create_pool(pg_admin_dsn, max_size=1)
    try:
        yield pool
    finally:
        await pool.close()


async def release_and_log(pool, use) -> list[str]:
    """Run `use(conn)` on the pooled connection, release it, and return the statements the release sent."""
    sent: list[str] = []

    def record(query) -> None:
        sent.append(query.query)

    async with pool.acquire() as conn:
        conn.add_query_logger(record)
        await use(conn)
        await asyncio.sleep(0.05)  # the logger is called soon after a statement, not within it
        sent.clear()
    await asyncio.sleep(0.05)
    async with pool.acquire() as conn:
        conn.remove_query_logger(record)
    return sent


async def test_a_plain_release_sends_nothing_to_the_server(one_connection_pool):
    async def query(conn):
        await conn.fetchval("SELECT 1")

    assert await release_and_log(one_connection_pool, query) == []


async def test_a_listen_left_behind_is_unlistened_on_release(one_connection_pool):
    async def listen_and_forget(conn):
        await conn.add_listener("left_behind", lambda *_: None)

    with pytest.warns(Warning, match="notification listener"):
        sent = await release_and_log(one_connection_pool, listen_and_forget)
    assert any("UNLISTEN *" in statement for statement in sent)
    async with one_connection_pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM pg_listening_channels()") == 0
    # Reset once, not on every later release.
    assert await release_and_log(one_connection_pool, lambda conn: conn.fetchval("SELECT 1")) == []


async def test_a_leaders_advisory_lock_never_outlives_its_connection_lease(one_connection_pool):
    async with leadership(one_connection_pool, LOCK_KEY) as conn:
        assert conn is not None
        # A second lock the unlock in leadership() does not know of: the reset must drop it.
        assert await conn.fetchval("SELECT pg_try_advisory_lock($1)", LOCK_KEY + 1)
    async with one_connection_pool.acquire() as conn:
        held = await conn.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()")
    assert held == 0
