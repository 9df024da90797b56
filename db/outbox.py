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


async def enqueue_many(conn: asyncpg.Connection, events: list[tuple[str, str, dict[str, Any]]]) -> None:
    """Add many (channel, type, data) events in one statement, inside the caller's transaction."""
    await conn.execute(
        """WITH queued AS (
               INSERT INTO event_outbox (channel, type, data)
               SELECT c, t, d::jsonb FROM unnest($1::text[], $2::text[], $3::text[]) AS e(c, t, d) RETURNING id)
           SELECT count(*) FROM queued, pg_notify($4, '')""",
        [e[0] for e in events], [e[1] for e in events], [jsonutil.dumps(e[2]) for e in events], NOTIFY_CHANNEL)


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
