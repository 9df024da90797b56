"""Queries behind "ask your data": who holds a DataPod's dataset (its buyers and its seller)."""

from __future__ import annotations

import dataclasses
import uuid

import asyncpg


@dataclasses.dataclass(frozen=True, slots=True)
class Holding:
    """How a user stands to one DataPod: its seller, a buyer of a completed purchase, or neither."""

    datapod_id: uuid.UUID
    title: str
    is_seller: bool
    purchase_id: uuid.UUID | None
    deleted: bool


@dataclasses.dataclass(frozen=True, slots=True)
class HeldPod:
    """A DataPod whose dataset the user may query."""

    datapod_id: uuid.UUID
    title: str


async def holding(conn: asyncpg.Connection, datapod_id: uuid.UUID, user_id: uuid.UUID) -> Holding | None:
    """The user's standing towards a DataPod (None when no such pod exists)."""
    row = await conn.fetchrow(
        """SELECT d.id, d.title, d.seller_id = $2 AS is_seller, d.deleted_at IS NOT NULL AS deleted,
                  (SELECT p.id FROM purchases p
                    WHERE p.datapod_id = d.id AND p.buyer_id = $2 AND p.status = 'completed'
                    ORDER BY p.completed_at DESC NULLS LAST LIMIT 1) AS purchase_id
             FROM datapods d WHERE d.id = $1""", datapod_id, user_id)
    if row is None:
        return None
    return Holding(datapod_id=row["id"], title=row["title"], is_seller=row["is_seller"],
                   purchase_id=row["purchase_id"], deleted=row["deleted"])


async def held_pods(conn: asyncpg.Connection, user_id: uuid.UUID, limit: int = 200) -> list[HeldPod]:
    """The DataPods the user may query: bought (a completed purchase) or sold by them and not deleted."""
    rows = await conn.fetch(
        """SELECT d.id, d.title FROM datapods d
            WHERE (d.seller_id = $1 AND d.deleted_at IS NULL)
               OR EXISTS (SELECT 1 FROM purchases p
                           WHERE p.datapod_id = d.id AND p.buyer_id = $1 AND p.status = 'completed')
            ORDER BY d.created_at DESC, d.id LIMIT $2""", user_id, limit)
    return [HeldPod(datapod_id=row["id"], title=row["title"]) for row in rows]
