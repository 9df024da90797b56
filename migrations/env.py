"""Alembic environment: async, asyncpg only (no second driver), raw-SQL revisions."""

from __future__ import annotations

import asyncio
import os

import asyncpg
from alembic import context
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

config = context.config

# One advisory lock key for migrations: two server processes starting at once must not both migrate.
MIGRATION_LOCK_KEY = 0x50_4E_48_55_42  # "SNHUB"


def _dsn() -> str:
    dsn = config.attributes.get("dsn") or context.get_x_argument(as_dictionary=True).get("dsn") \
        or os.environ.get("DATABASE_URL")
    if not dsn:
        raise RuntimeError("no database: pass -x dsn=... or set DATABASE_URL")
    return dsn


def _run(connection) -> None:
    context.configure(connection=connection, target_metadata=None, transaction_per_migration=True)
    connection.exec_driver_sql(f"SELECT pg_advisory_lock({MIGRATION_LOCK_KEY})")
    try:
        with context.begin_transaction():
            context.run_migrations()
    finally:
        connection.exec_driver_sql(f"SELECT pg_advisory_unlock({MIGRATION_LOCK_KEY})")


async def _run_online() -> None:
    dsn = _dsn()
    # async_creator hands connection parsing to asyncpg itself, which understands every DSN
    # we use (including the embedded server's unix-socket `?host=/path` form).
    engine = create_async_engine("postgresql+asyncpg://", poolclass=NullPool,
                                 async_creator=lambda: asyncpg.connect(dsn))
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run)
            await connection.commit()
    finally:
        await engine.dispose()


if context.is_offline_mode():
    raise RuntimeError("offline (--sql) mode is not supported: the revisions are raw SQL")
asyncio.run(_run_online())
