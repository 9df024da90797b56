"""The marketplace's rules: DataPods, their channels and the events that tell browsers of changes."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg

from db import outbox

MARKET_CHANNEL = "market"
DATAPOD_CHANNEL = "datapod:{datapod_id}"
CATEGORY_CHANNEL = "market:category:{category}"

DATAPOD_PUBLISHED = "datapod_published"
DATAPOD_UPDATED = "datapod_updated"
DATAPOD_UNPUBLISHED = "datapod_unpublished"
DATAPOD_SOLD = "datapod_sold"
REVIEW_ADDED = "review_added"


def datapod_channel(datapod_id: uuid.UUID | str) -> str:
    """The channel of one DataPod's events (and of its viewers' presence)."""
    return DATAPOD_CHANNEL.format(datapod_id=datapod_id)


def datapod_channels(datapod_id: uuid.UUID | str, category: str | None = None) -> list[str]:
    """The channels that carry a DataPod's events: the market, its category, the pod itself."""
    channels = [MARKET_CHANNEL, datapod_channel(datapod_id)]
    if category:
        channels.insert(1, CATEGORY_CHANNEL.format(category=category))
    return channels


async def enqueue_datapod_event(conn: asyncpg.Connection, datapod_id: uuid.UUID, category: str | None,
                                type: str, data: dict[str, Any]) -> None:
    """Queue a DataPod event on all of its channels inside the caller's transaction."""
    for channel in datapod_channels(datapod_id, category):
        await outbox.enqueue(conn, channel, type, data)
