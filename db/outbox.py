"""Queries on the transactional outbox (`event_outbox`)."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import asyncpg

NOTIFY_CHANNEL = "hub_outbox"

# What a caller queues: (channel, type, data), or (channels, type, data) for an event that goes to
# several channels with the same data (stored once, published to each in order).
QueuedEvent = tuple[str | Sequence[str], str, dict[str, Any]]


@dataclasses.dataclass(frozen=True, slots=True)
class OutboxEvent:
    """An event committed with its state change and not yet published."""

    id: int
    channel: str
    type: str
    data: dict[str, Any]
    also_channels: tuple[str, ...] = ()

    @property
    def channels(self) -> tuple[str, ...]:
        """Every channel the event goes to, in order."""
        return (self.channel, *self.also_channels)


async def enqueue(conn: asyncpg.Connection, channel: str, type: str, data: dict[str, Any]) -> int:
    """Add an event inside the caller's transaction; the relay publishes it after commit."""
    # pg_notify is transactional: the relay is woken at commit, never for a rolled-back event.
    return await conn.fetchval(
        """WITH queued AS (INSERT INTO event_outbox (channel, type, data) VALUES ($1, $2, $3) RETURNING id)
           SELECT id FROM queued, pg_notify($4, '')""",
        channel, type, data, NOTIFY_CHANNEL)


def queue_events(param: int) -> str:
    """A statement queuing the events in the JSON parameter $`param` (see `event_rows`): a CTE for
    a caller whose statement writes its state change and its events together, in one round trip.
    That statement must also call `pg_notify(NOTIFY_CHANNEL, '')`, which wakes the relay at commit."""
    # An event's channels travel as one space-separated string (no channel name holds a space).
    return f"""INSERT INTO event_outbox (channel, also_channels, type, data)
               SELECT cs[1], cs[2:], e.t, e.d
                 FROM json_to_recordset(${param}::json) AS e(c text, t text, d jsonb),
                      string_to_array(e.c, ' ') AS cs"""


def _channel_list(channel: str | Sequence[str]) -> str:
    """An event's channels as `queue_events` takes them: one space-separated string."""
    names = (channel,) if isinstance(channel, str) else tuple(channel)
    if not names or any(not name or " " in name for name in names):
        # A space would split a name in two: refused here, not published to the wrong channels.
        raise ValueError(f"an event needs channel names without spaces, got {names!r}")
    return " ".join(names)


def event_rows(events: Sequence[QueuedEvent]) -> list[dict[str, Any]]:
    """Queued events as the parameter of `queue_events` (encoded with the data, in one call)."""
    return [{"c": _channel_list(channel), "t": type, "d": data} for channel, type, data in events]


async def enqueue_many(conn: asyncpg.Connection, events: Sequence[QueuedEvent]) -> None:
    """Add many events in one statement, inside the caller's transaction."""
    await conn.execute(
        f"WITH queued AS ({queue_events(1)} RETURNING id) SELECT count(*) FROM queued, pg_notify($2, '')",
        event_rows(events), NOTIFY_CHANNEL)


async def take_batch(conn: asyncpg.Connection, limit: int) -> list[OutboxEvent]:
    """Delete the oldest pending events and return them in id order; they come back if the caller's
    transaction rolls back (one statement: the relay's round trips are its throughput)."""
    # By the locked rows' ctids (a TID scan): `WHERE id IN (...)` was planned as a hash join over a
    # sequential scan of the table, which under reward ingest holds tens of thousands of dead rows
    # between vacuums (5 of a batch's 10 ms).
    rows = await conn.fetch(
        """DELETE FROM event_outbox WHERE ctid = ANY(ARRAY(
               SELECT ctid FROM event_outbox ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED))
           RETURNING id, channel, type, data, also_channels""",
        limit)
    return sorted((OutboxEvent(row[0], row[1], row[2], row[3], tuple(row[4])) for row in rows),
                  key=lambda event: event.id)


async def pending_count(conn: asyncpg.Connection) -> int:
    """How many events wait for the relay, counted per channel (a metric worth alerting on)."""
    return await conn.fetchval("SELECT coalesce(sum(1 + cardinality(also_channels)), 0) FROM event_outbox")
