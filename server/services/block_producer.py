"""The block producer: seals pending transactions into a block every BLOCK_INTERVAL seconds.

One producer runs across all server processes: it holds a PostgreSQL advisory lock on its own
pool connection while it leads; the others stand by and retry the lock every interval, so when
the leader's process or connection dies another takes over. (Sealing also locks the
chain_settings row, so even two sealers could not fork the chain: `previous_hash` is unique.)
"""

from __future__ import annotations

import asyncio
import time
import uuid
from decimal import Decimal
from typing import AsyncIterator

import asyncpg
import structlog
from aiohttp import web

from db import chain as queries
from db import purchases as purchase_queries
from db.pool import POOL, leadership
from server.core.settings import SETTINGS, Settings
from server.realtime.redis import REDIS_HEALTH
from server.services.chain import SealConfig, Sealed, seal_block

log = structlog.get_logger(__name__)

PRODUCER_LOCK_KEY = 0x4855_4230_626C_6F63  # "HUB0bloc": a fixed key no other lock uses
DEMO_MINER = "alice"  # the demo data's first user mines when no MINER_USERNAME is configured


def seal_config(settings: Settings, producer: str = "") -> SealConfig:
    """The sealing parameters of these settings."""
    miner = settings.miner_username or (DEMO_MINER if settings.demo_data_on_first_start else None)
    return SealConfig(difficulty=settings.pow_difficulty, miner_username=miner,
                      mining_pool=settings.mining_pool, max_transactions=settings.max_block_transactions,
                      producer=producer, mobile_second_weight=Decimal(settings.mining_mobile_second_weight))


async def apply_chain_settings(conn: asyncpg.Connection, settings: Settings) -> None:
    """Write the configured economics into chain_settings (unset ones keep the stored values)."""
    await queries.update_chain_settings(
        conn, target_block_seconds=max(1, round(settings.block_interval_seconds)),
        initial_block_reward=Decimal(settings.block_reward) if settings.block_reward is not None else None,
        halving_interval=settings.halving_interval)


class BlockProducer:
    """Leads (seals blocks) while it holds the advisory lock; stands by otherwise."""

    def __init__(self, pool: asyncpg.Pool, settings: Settings, node_id: str | None = None) -> None:
        self.pool = pool
        self.settings = settings
        self.node_id = node_id or uuid.uuid4().hex
        self.config = seal_config(settings, self.node_id)
        self.leading = False
        self.sealed = 0
        self.last: Sealed | None = None

    async def run(self) -> None:
        """Lead or stand by until cancelled; errors propagate to the caller's restart loop."""
        interval = self.settings.block_interval_seconds
        while True:
            async with leadership(self.pool, PRODUCER_LOCK_KEY) as conn:
                if conn is None:
                    await asyncio.sleep(interval)
                    continue
                self.leading = True
                log.info("block_producer_leading", node=self.node_id, interval=interval)
                try:
                    await apply_chain_settings(conn, self.settings)
                    next_at = time.monotonic() + interval
                    while True:
                        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                        self.last = await seal_block(conn, self.config)
                        self.sealed += 1
                        await wake_payment_checks(conn, self.last)
                        next_at = max(next_at + interval, time.monotonic())
                finally:
                    self.leading = False


async def wake_payment_checks(conn: asyncpg.Connection, sealed: Sealed) -> None:
    """Purchases whose payment this block decided check it now, not after their backoff and the
    workers' next poll (a payment not sealed yet when its job first looked waits for this)."""
    hashes = [tx.hash for tx in sealed.confirmed] + [tx.hash for tx, _ in sealed.rejected]
    if not hashes:
        return
    try:
        await purchase_queries.wake_payment_checks(conn, hashes)
    except (asyncpg.PostgresError, OSError):  # the poll still finds them: a missed wake only costs time
        log.warning("payment_checks_not_woken", height=sealed.block.height, exc_info=True)


BLOCK_PRODUCER: web.AppKey[BlockProducer] = web.AppKey("block_producer", BlockProducer)


async def block_producer_ctx(app: web.Application) -> AsyncIterator[None]:
    """Run the producer (when BLOCK_PRODUCER is on) for the application's lifetime."""
    settings = app[SETTINGS]
    if not settings.block_producer:
        yield
        return
    producer = app[BLOCK_PRODUCER] = BlockProducer(app[POOL], settings)
    task = asyncio.create_task(app[REDIS_HEALTH].run_with_backoff(producer.run, "block_producer"))
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
