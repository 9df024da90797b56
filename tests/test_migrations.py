"""Alembic: upgrade to head, run again as a no-op, downgrade to base, upgrade again."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid

import asyncpg
import pytest

from db import migrate
from tests.conftest import with_database


@pytest.fixture
def empty_db(pg_admin_dsn):
    name = f"hub_mig_{uuid.uuid4().hex[:12]}"

    async def admin(sql):
        conn = await asyncpg.connect(pg_admin_dsn)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    yield with_database(pg_admin_dsn, name)
    asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def _tables(dsn: str) -> set[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        return {row["tablename"] for row in rows}
    finally:
        await conn.close()


SEED_TABLES = {
    # SourceNet
    "users", "datapods", "purchases", "reviews", "escrow_transactions", "ai_conversations",
    "ai_messages", "download_logs",
    # KVP blockchain
    "blocks", "transactions", "admin", "user_registrations", "sessions", "kyc_submissions",
    "kyc_approvals", "mining_rewards", "pool_allocations", "reward_pools", "game_rewards",
    "game_sessions", "games", "marketplace", "nfts", "bandwidth", "cloud", "mirror", "seeder",
    "peer", "tracker", "channel", "dns", "gateway", "proposals", "votes", "defi",
}


def test_upgrade_is_idempotent_and_downgrade_leaves_nothing(empty_db):
    migrate.upgrade(empty_db)
    tables = asyncio.run(_tables(empty_db))
    assert SEED_TABLES <= tables, f"missing: {sorted(SEED_TABLES - tables)}"
    migrate.upgrade(empty_db)  # a second run is a no-op
    assert asyncio.run(_tables(empty_db)) == tables
    migrate.downgrade(empty_db, "base")
    assert asyncio.run(_tables(empty_db)) == {"alembic_version"}
    migrate.upgrade(empty_db)
    assert asyncio.run(_tables(empty_db)) == tables


def test_concurrent_upgrades_do_not_collide(empty_db, tmp_path):
    """Two server processes migrating at once: the advisory lock serialises them."""
    env = {**os.environ, "DATABASE_URL": empty_db, "DATA_DIR": str(tmp_path)}
    processes = [subprocess.Popen([sys.executable, "-m", "server", "migrate"], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for _ in range(2)]
    outputs = [process.communicate(timeout=60)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    assert SEED_TABLES <= asyncio.run(_tables(empty_db))


async def _rows(dsn: str, sql: str) -> list[tuple]:
    conn = await asyncpg.connect(dsn)
    try:
        return [tuple(row) for row in await conn.fetch(sql)]
    finally:
        await conn.close()


def test_downgrading_the_outbox_channels_keeps_every_waiting_event_on_every_channel(empty_db):
    migrate.upgrade(empty_db, "0029")
    asyncio.run(_rows(empty_db, """INSERT INTO event_outbox (channel, also_channels, type, data)
                                   VALUES ('game:1', '{session:7,user:x}', 'reward_earned', '{"n": 1}'),
                                          ('game:1', '{}', 'session_ended', '{"n": 2}') RETURNING id"""))
    migrate.downgrade(empty_db, "0028")
    assert asyncio.run(_rows(empty_db, "SELECT channel, type, data FROM event_outbox ORDER BY id")) == [
        ("game:1", "reward_earned", '{"n": 1}'), ("game:1", "session_ended", '{"n": 2}'),
        ("session:7", "reward_earned", '{"n": 1}'), ("user:x", "reward_earned", '{"n": 1}')]
