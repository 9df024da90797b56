"""Run Alembic migrations programmatically (CLI `migrate`, server start, tests)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from alembic import command
from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(dsn: str) -> Config:
    """An Alembic config pointing at our migrations and the given database."""
    config = Config(str(MIGRATIONS_DIR / "alembic.ini"))
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["dsn"] = dsn
    return config


def upgrade(dsn: str, revision: str = "head") -> None:
    """Upgrade the database to `revision`; a no-op when already there. Blocking."""
    command.upgrade(alembic_config(dsn), revision)


def downgrade(dsn: str, revision: str = "base") -> None:
    """Downgrade the database to `revision`. Blocking."""
    command.downgrade(alembic_config(dsn), revision)


async def upgrade_async(dsn: str, revision: str = "head") -> None:
    """upgrade() from async code: Alembic's async env runs its own loop, so use a thread."""
    await asyncio.to_thread(upgrade, dsn, revision)
