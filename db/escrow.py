"""Queries on escrow_transactions and escrow_steps: hold, confirm, dispute, release, refund, settle.

Every status change is a compare-and-set that happens once. A released or refunded escrow is
*decided*; it is *settled* once the transfers that pay it out (recorded here by hash) are sealed in
a block. The caller owns the transaction.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from decimal import Decimal
from typing import Any, Sequence

import asyncpg

from server.core.jsonutil import iso

HOLDING, DISPUTED, RELEASED, REFUNDED = "holding", "disputed", "released", "refunded"
OPEN_STATUSES = (HOLDING, DISPUTED)      # the escrow still holds the money
# escrow_steps.step
STEP_HOLDING, STEP_CONFIRMED, STEP_DISPUTED = "holding", "confirmed", "disputed"
STEP_SETTLED, STEP_REISSUED = "settled", "reissued"


@dataclasses.dataclass(frozen=True, slots=True)
class Escrow:
    """One purchase's escrow, with its buyer and DataPod."""

    id: uuid.UUID
    purchase_id: uuid.UUID
    seller_id: uuid.UUID
    amount_sui: Decimal
    status: str
    created_at: dt.datetime
    released_at: dt.datetime | None
    fee_amount: Decimal
    settlement_tx_hash: str | None
    fee_tx_hash: str | None
    settled_at: dt.datetime | None
    disputed_at: dt.datetime | None
    dispute_reason: str | None
    resolved_by: uuid.UUID | None
    resolution_note: str | None
    buyer_id: uuid.UUID
    datapod_id: uuid.UUID
    payment_tx_digest: str | None  # the payment it was opened with (None only on rows without one)

    @property
    def payee_id(self) -> uuid.UUID:
        """Who a decided escrow pays: the seller when released, the buyer when refunded."""
        return self.seller_id if self.status == RELEASED else self.buyer_id

    def event(self, reason: str) -> dict[str, Any]:
        """The payload of the escrow_* events."""
        return {"purchase_id": str(self.purchase_id), "escrow_id": str(self.id),
                "datapod_id": str(self.datapod_id), "amount_sui": self.amount_sui, "status": self.status,
                "reason": reason}

    def to_public(self) -> dict[str, Any]:
        """The escrow as its buyer, its seller and administrators read it."""
        return {"escrow_id": str(self.id), "purchase_id": str(self.purchase_id), "datapod_id": str(self.datapod_id),
                "buyer_id": str(self.buyer_id), "seller_id": str(self.seller_id), "amount": self.amount_sui,
                "status": self.status, "fee_amount": self.fee_amount, "payment_tx_hash": self.payment_tx_digest,
                "settlement_tx_hash": self.settlement_tx_hash, "fee_tx_hash": self.fee_tx_hash,
                "created_at": self.created_at.isoformat(), "decided_at": iso(self.released_at),
                "settled_at": iso(self.settled_at), "disputed_at": iso(self.disputed_at),
                "dispute_reason": self.dispute_reason, "resolution_note": self.resolution_note}


@dataclasses.dataclass(frozen=True, slots=True)
class Step:
    """One step of an escrow's life (escrow_steps)."""

    id: int
    step: str
    actor_id: uuid.UUID | None
    tx_hash: str | None
    amount: Decimal | None
    reason: str | None
    created_at: dt.datetime

    def to_public(self) -> dict[str, Any]:
        """The step as the API shows it."""
        return {"step": self.step, "actor_id": str(self.actor_id) if self.actor_id else None,
                "tx_hash": self.tx_hash, "amount": self.amount, "reason": self.reason,
                "at": self.created_at.isoformat()}


_COLUMNS = """e.id, e.purchase_id, e.seller_id, e.amount_sui, e.status, e.created_at, e.released_at, e.fee_amount,
    e.settlement_tx_hash, e.fee_tx_hash, e.settled_at, e.disputed_at, e.dispute_reason, e.resolved_by,
    e.resolution_note"""
# Statements that change a row return it through this join, so events can name both parties.
_JOINED = f"""SELECT {_COLUMNS}, p.buyer_id, p.datapod_id, e.payment_tx_digest
                FROM changed e JOIN purchases p ON p.id = e.purchase_id"""


def _escrow(row: asyncpg.Record | None) -> Escrow | None:
    return None if row is None else Escrow(**dict(row))


async def _change(conn: asyncpg.Connection, statement: str, *args: Any) -> Escrow | None:
    """Run a data-changing statement (`... RETURNING e.*` as `changed`) and return its row joined."""
    return _escrow(await conn.fetchrow(f"WITH changed AS ({statement} RETURNING e.*) {_JOINED}", *args))


async def hold(conn: asyncpg.Connection, purchase_id: uuid.UUID, seller_id: uuid.UUID,
               amount: Decimal, status: str = HOLDING) -> Escrow | None:
    """Open the purchase's escrow (or reopen a settled refunded one for a re-purchase); None if it is
    open, or refunded with the refund not settled yet (the money owed back must not be forgotten)."""
    # `status` is 'refunded' when a paid purchase fails before its escrow was opened: the row then
    # records the money owed back in one step.
    return await _change(
        conn,
        """INSERT INTO escrow_transactions AS e (purchase_id, seller_id, amount_sui, status, released_at,
                                                 payment_tx_digest)
           VALUES ($1, $2, $3, $4::varchar, CASE WHEN $4::varchar = 'holding' THEN NULL ELSE now() END,
                   (SELECT payment_tx_digest FROM purchases WHERE id = $1))
           ON CONFLICT (purchase_id) DO UPDATE
              SET status = EXCLUDED.status, amount_sui = EXCLUDED.amount_sui, seller_id = EXCLUDED.seller_id,
                  payment_tx_digest = EXCLUDED.payment_tx_digest,
                  created_at = now(), released_at = EXCLUDED.released_at, fee_amount = 0,
                  settlement_tx_hash = NULL, fee_tx_hash = NULL, settled_at = NULL, disputed_at = NULL,
                  dispute_reason = NULL, resolved_by = NULL, resolution_note = NULL
            WHERE e.status = 'refunded' AND e.settled_at IS NOT NULL""",
        purchase_id, seller_id, amount, status)


async def get(conn: asyncpg.Connection, purchase_id: uuid.UUID, *, lock: bool = False) -> Escrow | None:
    """The purchase's escrow (its row locked when `lock`)."""
    return _escrow(await conn.fetchrow(
        f"""SELECT {_COLUMNS}, p.buyer_id, p.datapod_id, e.payment_tx_digest
              FROM escrow_transactions e JOIN purchases p ON p.id = e.purchase_id
             WHERE e.purchase_id = $1 {"FOR UPDATE OF e" if lock else ""}""", purchase_id))


# The platform's cut is fixed when the escrow is released (at the rate then in force), truncated to
# the KVP quantum so the seller never gets less than amount x (1 - rate).
_FEE = "trunc(e.amount_sui * $FEE::numeric, 8)"


async def release(conn: asyncpg.Connection, purchase_id: uuid.UUID, *, fee_rate: Decimal,
                  from_statuses: Sequence[str] = (HOLDING,), resolved_by: uuid.UUID | None = None,
                  note: str | None = None) -> Escrow | None:
    """-> released (the purchase must be completed) with its platform fee, once; None when it was not
    in `from_statuses`."""
    return await _change(
        conn,
        f"""UPDATE escrow_transactions e SET status = 'released', released_at = now(),
                   fee_amount = {_FEE.replace("$FEE", "$5")},
                   resolved_by = coalesce($3, e.resolved_by), resolution_note = coalesce($4, e.resolution_note)
             WHERE e.purchase_id = $1 AND e.status = ANY($2::varchar[])
               AND EXISTS (SELECT 1 FROM purchases p WHERE p.id = e.purchase_id AND p.status = 'completed')""",
        purchase_id, list(from_statuses), resolved_by, note, fee_rate)


async def refund(conn: asyncpg.Connection, purchase_id: uuid.UUID, *, from_statuses: Sequence[str] = (HOLDING,),
                 resolved_by: uuid.UUID | None = None, note: str | None = None) -> Escrow | None:
    """-> refunded, once; None when it was not in `from_statuses`."""
    return await _change(
        conn,
        """UPDATE escrow_transactions e SET status = 'refunded', released_at = now(),
                  resolved_by = coalesce($3, e.resolved_by), resolution_note = coalesce($4, e.resolution_note)
            WHERE e.purchase_id = $1 AND e.status = ANY($2::varchar[])""",
        purchase_id, list(from_statuses), resolved_by, note)


async def dispute(conn: asyncpg.Connection, purchase_id: uuid.UUID, reason: str,
                  window_seconds: float) -> Escrow | None:
    """holding -> disputed while the release window is open; None otherwise."""
    return await _change(
        conn,
        """UPDATE escrow_transactions e SET status = 'disputed', disputed_at = now(), dispute_reason = $2
            WHERE e.purchase_id = $1 AND e.status = 'holding'
              AND e.created_at >= now() - make_interval(secs => $3)""",
        purchase_id, reason, window_seconds)


async def release_due(conn: asyncpg.Connection, older_than_seconds: float, fee_rate: Decimal,
                      limit: int = 100) -> list[Escrow]:
    """Release holding escrows of completed purchases older than the window (a dispute freezes one)."""
    rows = await conn.fetch(
        f"""WITH changed AS (
               UPDATE escrow_transactions e SET status = 'released', released_at = now(),
                      fee_amount = {_FEE.replace("$FEE", "$3")}
                WHERE e.id IN (
                    SELECT x.id FROM escrow_transactions x JOIN purchases p ON p.id = x.purchase_id
                     WHERE x.status = 'holding' AND p.status = 'completed'
                       AND x.created_at < now() - make_interval(secs => $1)
                     ORDER BY x.created_at LIMIT $2
                     FOR UPDATE OF x SKIP LOCKED)
                  AND e.status = 'holding'
               RETURNING e.*)
            {_JOINED}""", older_than_seconds, limit, fee_rate)
    return [Escrow(**dict(row)) for row in rows]


async def lock_unsettled(conn: asyncpg.Connection, limit: int) -> list[Escrow]:
    """Decided escrows whose payout is not sealed yet, oldest first, locked (others' skipped)."""
    rows = await conn.fetch(
        f"""SELECT {_COLUMNS}, p.buyer_id, p.datapod_id, e.payment_tx_digest
              FROM escrow_transactions e JOIN purchases p ON p.id = e.purchase_id
             WHERE e.status IN ('released', 'refunded') AND e.settled_at IS NULL
             ORDER BY e.released_at LIMIT $1 FOR UPDATE OF e SKIP LOCKED""", limit)
    return [Escrow(**dict(row)) for row in rows]


async def record_payout(conn: asyncpg.Connection, escrow_id: uuid.UUID, settlement_tx_hash: str | None,
                        fee_tx_hash: str | None) -> None:
    """Remember the transfers that pay a decided escrow out (NULLs to forget rejected ones)."""
    await conn.execute("UPDATE escrow_transactions SET settlement_tx_hash = $2, fee_tx_hash = $3 WHERE id = $1",
                       escrow_id, settlement_tx_hash, fee_tx_hash)


async def mark_settled(conn: asyncpg.Connection, escrow_id: uuid.UUID) -> None:
    """The payout is sealed (or, on Sui, handed to the custodian): the escrow's life is over."""
    await conn.execute("UPDATE escrow_transactions SET settled_at = now() WHERE id = $1 AND settled_at IS NULL",
                       escrow_id)


async def add_step(conn: asyncpg.Connection, escrow: Escrow, step: str, *, actor_id: uuid.UUID | None = None,
                   tx_hash: str | None = None, amount: Decimal | None = None, reason: str | None = None) -> None:
    """Log one step of the escrow's life."""
    await conn.execute(
        """INSERT INTO escrow_steps (escrow_id, purchase_id, step, actor_id, tx_hash, amount, reason)
           VALUES ($1, $2, $3, $4, $5, $6, $7)""",
        escrow.id, escrow.purchase_id, step, actor_id, tx_hash, amount, reason)


async def steps(conn: asyncpg.Connection, purchase_id: uuid.UUID) -> list[Step]:
    """The escrow's steps, oldest first."""
    rows = await conn.fetch(
        """SELECT id, step, actor_id, tx_hash, amount, reason, created_at FROM escrow_steps
            WHERE purchase_id = $1 ORDER BY id""", purchase_id)
    return [Step(**dict(row)) for row in rows]


async def disputes(conn: asyncpg.Connection, after: tuple[dt.datetime, uuid.UUID] | None, limit: int) -> list[Escrow]:
    """Open disputes, oldest first (the admin queue), after a keyset cursor."""
    rows = await conn.fetch(
        f"""SELECT {_COLUMNS}, p.buyer_id, p.datapod_id, e.payment_tx_digest
              FROM escrow_transactions e JOIN purchases p ON p.id = e.purchase_id
             WHERE e.status = 'disputed'
               AND ($1::timestamptz IS NULL OR (e.disputed_at, e.id) > ($1, $2::uuid))
             ORDER BY e.disputed_at, e.id LIMIT $3""",
        after[0] if after else None, after[1] if after else None, limit)
    return [Escrow(**dict(row)) for row in rows]


async def transaction_statuses(conn: asyncpg.Connection, hashes: Sequence[str]) -> dict[str, str]:
    """The chain status of some transactions, by hash."""
    rows = await conn.fetch("SELECT transaction_hash, status FROM transactions WHERE transaction_hash = ANY($1)",
                            list(hashes))
    return {row["transaction_hash"]: row["status"] for row in rows}


async def refund_unsettled(conn: asyncpg.Connection, buyer_id: uuid.UUID, datapod_id: uuid.UUID) -> bool:
    """Whether the buyer's refunded purchase of this DataPod is still being paid back."""
    return await conn.fetchval(
        """SELECT EXISTS (SELECT 1 FROM escrow_transactions e JOIN purchases p ON p.id = e.purchase_id
                           WHERE p.buyer_id = $1 AND p.datapod_id = $2 AND e.status = 'refunded'
                             AND e.settled_at IS NULL)""", buyer_id, datapod_id)


# --- verification ------------------------------------------------------------------------------

async def lifecycle_mismatches(conn: asyncpg.Connection, escrow_user_id: uuid.UUID, limit: int) -> list[str]:
    """Escrows whose money does not add up on the escrow wallet's ledger.

    A settled escrow on the KVP chain nets to zero there: the payment in (the digest the escrow was
    opened with: a refunded purchase bought again gets a new one) minus the payout (settlement and
    fee transfers). The wallet's balance covers every escrow still holding
    or decided but not yet settled, for payments made on the KVP chain (a stray transfer to it only
    adds to the balance; escrows paid on Sui hold no KVP).
    """
    rows = await conn.fetch(
        """SELECT e.purchase_id, coalesce(sum(l.delta), 0) AS net
             FROM escrow_transactions e
             LEFT JOIN balance_ledger l
                    ON l.user_id = $1 AND l.reference IN (e.payment_tx_digest, e.settlement_tx_hash, e.fee_tx_hash)
            WHERE e.settled_at IS NOT NULL AND e.settlement_tx_hash IS NOT NULL
            GROUP BY e.purchase_id HAVING coalesce(sum(l.delta), 0) <> 0
            ORDER BY e.purchase_id LIMIT $2""", escrow_user_id, limit)
    problems = [f"escrow of purchase {row['purchase_id']}: settled, but its moves on the escrow wallet "
                f"sum to {row['net']}, not 0" for row in rows]
    owed, balance = await conn.fetchrow(
        """SELECT (SELECT coalesce(sum(e.amount_sui), 0)
                     FROM escrow_transactions e
                     JOIN payment_receipts r ON r.payment_tx_digest = e.payment_tx_digest AND r.chain = 'kvp'
                    WHERE e.settled_at IS NULL),
                  (SELECT total_balance FROM users WHERE id = $1)""", escrow_user_id)
    if balance is not None and balance < owed and len(problems) < limit:
        problems.append(f"the escrow wallet holds {balance} but owes {owed} to open and unpaid escrows")
    return problems
