"""`sourcenet-hub check`: which backing service each concern uses, and whether it answers."""

from __future__ import annotations

import asyncio
import dataclasses

import aiohttp
import asyncpg

from db.pool import server_version
from server.core.settings import Settings


@dataclasses.dataclass(frozen=True, slots=True)
class CheckResult:
    """One line of the report."""

    name: str
    mode: str
    ok: bool
    status: str


async def _probe(name: str, mode: str, probe) -> CheckResult:
    try:
        detail = await asyncio.wait_for(probe(), 10)
        return CheckResult(name, mode, True, f"ok{f' ({detail})' if detail else ''}")
    except Exception as exc:  # noqa: BLE001 - the report shows any failure
        return CheckResult(name, mode, False, f"FAILED: {type(exc).__name__}: {str(exc)[:120]}")


async def _postgres(dsn: str) -> str:
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        return await server_version(conn)
    finally:
        await conn.close()


async def _redis(url: str) -> str:
    import redis.asyncio as aioredis

    client = aioredis.from_url(url, socket_connect_timeout=5)
    try:
        await client.ping()
        return (await client.info("server")).get("redis_version", "")
    finally:
        await client.aclose()


async def _http(url: str) -> str:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        async with session.get(url) as response:
            return f"HTTP {response.status}"


async def run_checks(settings: Settings) -> list[CheckResult]:
    """Probe every backing service the settings select."""
    from server.adapters.embedded import database_dsn

    results: list[CheckResult] = []
    if settings.database_url:
        results.append(await _probe("database", "DATABASE_URL", lambda: _postgres(settings.database_url)))
    else:
        async def embedded() -> str:
            async with database_dsn(None, settings.data_dir) as dsn:
                return await _postgres(dsn)
        results.append(await _probe("database", f"embedded PostgreSQL in {settings.data_dir}/postgres", embedded))
    if settings.redis_url:
        results.append(await _probe("redis", "REDIS_URL", lambda: _redis(settings.redis_url)))
    else:
        results.append(CheckResult("redis", "none: single node, in-process events", True, "ok"))
    if settings.openai_base_url:
        results.append(await _probe("ai model", f"OPENAI_BASE_URL, model {settings.ai_model}",
                                    lambda: _http(settings.openai_base_url.rstrip("/") + "/models")))
    else:
        results.append(CheckResult("ai model", "none: retrieval-only assistant", True, "ok"))
    results.append(CheckResult("payments", "Sui via SUI_RPC_URL" if settings.sui_rpc_url
                               else "KVP chain in PostgreSQL", True, "ok"))
    if settings.walrus_aggregator_url:
        results.append(await _probe("blobs", "Walrus aggregator",
                                    lambda: _http(settings.walrus_aggregator_url)))
    else:
        results.append(CheckResult("blobs", f"local files in {settings.data_dir}/blobs", True, "ok"))
    results.append(CheckResult("sign-in", "password + Google" if settings.google_client_id
                               else "password (Google: set GOOGLE_CLIENT_ID)", True, "ok"))
    return results
