"""The outbox relay: publishes events that were committed with their state change.

One relay runs across all server processes (a PostgreSQL advisory lock held on its connection);
the others wait on standby and take over when its connection goes. A single relay keeps each
channel's events in commit order. Delivery is at least once: a crash after publishing but before
the row is deleted publishes that event again on restart (with a new id).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Awaitable, Callable

import asyncpg
import structlog

from db import outbox
from db.pool import leadership
from server.core.aio import wait_event

log = structlog.get_logger(__name__)

RELAY_LOCK_KEY = 0x4855_4230_7265_6C61  # "HUB0rela": a fixed key no other lock uses
PublishMany = Callable[[list[tuple[str, str, dict[str, Any]]]], Awaitable[Any]]


async def drain(conn: asyncpg.Connection, publish_many: PublishMany, batch: int) -> int:
    """Publish and delete up to `batch` pending events, oldest first; returns how many."""
    async with conn.transaction():
        events = await outbox.take_batch(conn, batch)
        if events:
            # One history round trip for the whole batch; if it fails the deletion rolls back and
            # the batch is retried (events stored before the failure then appear twice).
            await publish_many([(channel, event.type, event.data) for event in events for channel in event.channels])
    return len(events)


# Per batch the relay pays three PostgreSQL round trips and one to Redis: under reward ingest's
# load (7,000 events/s) batches of 200 left it seconds behind; a full batch is taken again at once.
RELAY_BATCH = 1000


async def run_relay(pool: asyncpg.Pool, publish_many: PublishMany, *, batch: int = RELAY_BATCH,
                    poll_interval: float = 1.0, on_relayed: Callable[[int], None] | None = None) -> None:
    """Relay forever (until cancelled): lead when the lock is free, else stand by."""
    while True:
        async with leadership(pool, RELAY_LOCK_KEY) as conn:
            if conn is None:
                await asyncio.sleep(poll_interval)
                continue
            log.info("outbox_relay_leading")
            wake = asyncio.Event()

            def on_notify(*_: Any) -> None:
                wake.set()

            await conn.add_listener(outbox.NOTIFY_CHANNEL, on_notify)
            try:
                while True:
                    # Clear before reading, so a commit during the drain wakes the next round.
                    wake.clear()
                    count = await drain(conn, publish_many, batch)
                    if count and on_relayed is not None:
                        on_relayed(count)
                    if count == batch:
                        continue
                    # The poll also catches notifications lost while reconnecting.
                    await wait_event(wake, poll_interval)
            finally:
                with contextlib.suppress(Exception):
                    await conn.remove_listener(outbox.NOTIFY_CHANNEL, on_notify)
