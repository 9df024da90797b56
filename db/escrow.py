"""Queries on escrow_transactions: hold, release, refund, each a compare-and-set that happens once."""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from decimal import Decimal
from typing import Any

import asyncpg


@dataclasses.dataclass(frozen=True, slots=True)
class Escrow:
    """One purchase's escrow."""

    id: uuid.UUID
    purchase_id: uuid.UUID
    seller_id: uuid.UUID
    buyer_id: uuid.UUID
    datapod_id: uuid.UUID
    amount_sui: Decimal
    status: str
    created_at: dt.datetime
    released_at: dt.datetime | None

    def event(self, reason: str) -> dict[str, Any]:
        """The payload of escrow_released / escrow_refunded."""
        return {"purchase_id": str(self.purchase_id), "escrow_id": str(self.id),
                "datapod_id": str(self.datapod_id), "amount_sui": self.amount_sui, "status": self.status,
                "reason": reason}


# Every statement returns the escrow joined with its purchase, so events can name both parties.
_RETURNING = """RETURNING e.id, e.purchase_id, e.seller_id, e.amount_sui, e.status, e.created_at, e.released_at"""


async def _with_purchase(conn: asyncpg.Connection, row: asyncpg.Record | None) -> Escrow | None:
    if row is None:
        return None
    purchase = await conn.fetchrow("SELECT buyer_id, datapod_id FROM purchases WHERE id = $1", row["purchase_id"])
    return Escrow(**dict(row), buyer_id=purchase["buyer_id"], datapod_id=purchase["datapod_id"])


async def hold(conn: asyncpg.Connection, purchase_id: uuid.UUID, seller_id: uuid.UUID,
               amount_sui: Decimal, status: str = "holding") -> Escrow | None:
    """Open the purchase's escrow (or reopen a refunded one for a re-purchase); None if already open."""
    # `status` is 'refunded' when a paid purchase fails before its escrow was opened: the row then
    # records the money owed back in one step.
    row = await conn.fetchrow(
        f"""INSERT INTO escrow_transactions AS e (purchase_id, seller_id, amount_sui, status, released_at)
            VALUES ($1, $2, $3, $4::varchar, CASE WHEN $4::varchar = 'holding' THEN NULL ELSE now() END)
            ON CONFLICT (purchase_id) DO UPDATE
               SET status = EXCLUDED.status, amount_sui = EXCLUDED.amount_sui, seller_id = EXCLUDED.seller_id,
                   created_at = now(), released_at = EXCLUDED.released_at
             WHERE e.status = 'refunded'
            {_RETURNING}""",
        purchase_id, seller_id, amount_sui, status)
    return await _with_purchase(conn, row)


async def get(conn: asyncpg.Connection, purchase_id: uuid.UUID) -> Escrow | None:
    """The purchase's escrow."""
    row = await conn.fetchrow(
        """SELECT e.id, e.purchase_id, e.seller_id, e.amount_sui, e.status, e.created_at, e.released_at
           FROM escrow_transactions e WHERE e.purchase_id = $1""", purchase_id)
    return await _with_purchase(conn, row)


async def release(conn: asyncpg.Connection, purchase_id: uuid.UUID) -> Escrow | None:
    """holding -> released, once; None when it was not holding (already released or refunded)."""
    row = await conn.fetchrow(
        f"""UPDATE escrow_transactions e SET status = 'released', released_at = now()
            WHERE e.purchase_id = $1 AND e.status = 'holding'
              AND EXISTS (SELECT 1 FROM purchases p WHERE p.id = e.purchase_id AND p.status = 'completed')
            {_RETURNING}""", purchase_id)
    return await _with_purchase(conn, row)


async def refund(conn: asyncpg.Connection, purchase_id: uuid.UUID) -> Escrow | None:
    """holding -> refunded, once; None when it was not holding."""
    row = await conn.fetchrow(
        f"""UPDATE escrow_transactions e SET status = 'refunded', released_at = now()
            WHERE e.purchase_id = $1 AND e.status = 'holding' {_RETURNING}""", purchase_id)
    return await _with_purchase(conn, row)


async def release_due(conn: asyncpg.Connection, older_than_seconds: float, limit: int = 100) -> list[Escrow]:
    """Release escrows of completed purchases held longer than the window; returns those released."""
    rows = await conn.fetch(
        f"""UPDATE escrow_transactions e SET status = 'released', released_at = now()
            WHERE e.id IN (
                SELECT x.id FROM escrow_transactions x JOIN purchases p ON p.id = x.purchase_id
                 WHERE x.status = 'holding' AND p.status = 'completed'
                   AND x.created_at < now() - make_interval(secs => $1)
                 ORDER BY x.created_at LIMIT $2
                 FOR UPDATE OF x SKIP LOCKED)
              AND e.status = 'holding'
            {_RETURNING}""", older_than_seconds, limit)
    return [await _with_purchase(conn, row) for row in rows]  # type: ignore[misc]
