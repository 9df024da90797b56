"""Queries on the transactional outbox (`event_outbox`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import asyncpg

from server.core import jsonutil

NOTIFY_CHANNEL = "hub_outbox"


@dataclasses.dataclass(frozen=True, slots=True)
class OutboxEvent:
    """An event committed with its state change and not yet published."""

    id: int
    channel: str
    type: str
    data: dict[str, Any]


async def enqueue(conn: asyncpg.Connection, channel: str, type: str, data: dict[str, Any]) -> int:
    """Add an event inside the caller's transaction; the relay publishes it after commit."""
    # pg_notify is transactional: the relay is woken at commit, never for a rolled-back event.
    return await conn.fetchval(
        """WITH queued AS (INSERT INTO event_outbox (channel, type, data) VALUES ($1, $2, $3) RETURNING id)
           SELECT id FROM queued, pg_notify($4, '')""",
        channel, type, data, NOTIFY_CHANNEL)


def queue_events(channels: int) -> str:
    """A statement queuing the events given as three text[] parameters, $channels (channels), the
    next (types) and the one after (JSON data): a CTE for a caller whose statement writes its state
    change and its events together, in one round trip. That statement must also call
    `pg_notify(NOTIFY_CHANNEL, '')`, which wakes the relay at commit."""
    return f"""INSERT INTO event_outbox (channel, type, data)
               SELECT c, t, d::jsonb FROM unnest(${channels}::text[], ${channels + 1}::text[], ${channels + 2}::text[])
                                         AS e(c, t, d)"""


def event_arrays(events: list[tuple[str, str, dict[str, Any]]]) -> tuple[list[str], list[str], list[str]]:
    """(channel, type, data) events as the three parameters of `queue_events`."""
    return [e[0] for e in events], [e[1] for e in events], [jsonutil.dumps(e[2]) for e in events]


async def enqueue_many(conn: asyncpg.Connection, events: list[tuple[str, str, dict[str, Any]]]) -> None:
    """Add many (channel, type, data) events in one statement, inside the caller's transaction."""
    await conn.execute(
        f"WITH queued AS ({queue_events(1)} RETURNING id) SELECT count(*) FROM queued, pg_notify($4, '')",
        *event_arrays(events), NOTIFY_CHANNEL)


async def take_batch(conn: asyncpg.Connection, limit: int) -> list[OutboxEvent]:
    """Delete the oldest pending events and return them in id order; they come back if the caller's
    transaction rolls back (one statement: the relay's round trips are its throughput)."""
    rows = await conn.fetch(
        """DELETE FROM event_outbox WHERE id IN (
               SELECT id FROM event_outbox ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)
           RETURNING id, channel, type, data""",
        limit)
    return sorted((OutboxEvent(**dict(row)) for row in rows), key=lambda event: event.id)


async def pending_count(conn: asyncpg.Connection) -> int:
    """How many events wait for the relay (a metric worth alerting on)."""
    return await conn.fetchval("SELECT count(*) FROM event_outbox")
