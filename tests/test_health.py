"""Liveness, readiness with a backing service down, and the embedded-database default."""

from __future__ import annotations

from urllib.parse import urlsplit

from server.app import create_app


async def test_healthz_and_readyz(client):
    assert (await client.get("/healthz")).status == 200
    response = await client.get("/readyz")
    body = await response.json()
    assert response.status == 200 and body["data"]["checks"] == {"database": "ok"}


async def test_readyz_reports_a_database_that_went_away(client, pg_admin_dsn, db_dsn):
    import asyncpg

    assert (await client.get("/readyz")).status == 200
    name = urlsplit(db_dsn).path.lstrip("/")
    admin = await asyncpg.connect(pg_admin_dsn)
    try:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        await admin.close()
    response = await client.get("/readyz")
    body = await response.json()
    assert response.status == 503
    assert body["error"]["code"] == "unavailable"
    assert body["error"]["checks"]["database"].startswith("down")
    assert (await client.get("/healthz")).status == 200
    metrics = await (await client.get("/metrics")).text()
    assert 'hub_dependency_up{service="database"} 0.0' in metrics


async def test_readyz_checks_redis_when_configured(aiohttp_client, settings, redis_url):
    client = await aiohttp_client(create_app(settings.replace(redis_url=redis_url)))
    body = await (await client.get("/readyz")).json()
    assert body["data"]["checks"] == {"database": "ok", "redis": "ok", "redis_pubsub": "ok"}


async def test_readyz_reports_redis_down(aiohttp_client, settings, unused_tcp_port):
    client = await aiohttp_client(create_app(settings.replace(
        redis_url=f"redis://127.0.0.1:{unused_tcp_port}/0")))
    response = await client.get("/readyz")
    body = await response.json()
    assert response.status == 503
    assert body["error"]["checks"]["database"] == "ok"
    assert body["error"]["checks"]["redis"].startswith("down")


async def test_embedded_database_starts_migrates_and_keeps_data(aiohttp_client, tmp_path):
    """With DATABASE_URL unset the app starts its own PostgreSQL under DATA_DIR; data survives a restart."""
    from server.core.settings import Settings
    from tests.helpers import register

    settings = Settings(data_dir=tmp_path, jwt_secret="j" * 40, master_key="m" * 40)
    client = await aiohttp_client(create_app(settings))
    assert (await client.get("/readyz")).status == 200
    await register(client, "persisted")
    await client.close()
    assert not (tmp_path / "postgres" / "postmaster.pid").exists(), "embedded server was not stopped"

    again = await aiohttp_client(create_app(settings))
    response = await again.post("/api/v1/auth/login", json={"login": "persisted",
                                                             "password": "correct horse battery"})
    assert response.status == 200
    await again.close()


def test_dev_secrets_are_generated_once_with_private_permissions(tmp_path):
    from server.core.secrets import load_or_create_secret

    first = load_or_create_secret(tmp_path, "jwt_secret", None)
    second = load_or_create_secret(tmp_path, "jwt_secret", None)
    assert first == second and len(first) == 32
    assert (tmp_path / "secrets" / "jwt_secret").stat().st_mode & 0o777 == 0o600
    assert load_or_create_secret(tmp_path, "jwt_secret", "configured-value") == b"configured-value"
