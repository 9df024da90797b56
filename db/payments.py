"""Queries of payment verification on the KVP chain: a `transactions` row by hash, with the parties' wallets.

Each function takes the connection first; the caller owns the transaction.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from decimal import Decimal

import asyncpg


@dataclasses.dataclass(frozen=True, slots=True)
class ChainPayment:
    """A KVP-chain transaction as a payment check reads it, with the buyer's and seller's wallet addresses."""

    block_id: int | None
    sender: str | None
    receiver: str | None
    amount: Decimal | None
    created_at: dt.datetime
    sender_id: uuid.UUID | None
    receiver_id: uuid.UUID | None
    status: str | None
    buyer_wallet: str | None
    seller_wallet: str | None


async def find_payment(conn: asyncpg.Connection, transaction_hash: str, buyer_id: uuid.UUID,
                       seller_id: uuid.UUID) -> ChainPayment | None:
    """The transaction with this hash, if the chain has it, with both parties' wallet addresses."""
    # to_jsonb(...) ->> reads columns that later chain migrations add (status, wallet_address)
    # without failing on a schema that lacks them.
    row = await conn.fetchrow(
        """SELECT t.block_id, t.sender, t.receiver, t.amount, t.created_at, t.sender_id, t.receiver_id,
                  to_jsonb(t) ->> 'status' AS status,
                  (SELECT to_jsonb(u) ->> 'wallet_address' FROM users u WHERE u.id = $2) AS buyer_wallet,
                  (SELECT to_jsonb(u) ->> 'wallet_address' FROM users u WHERE u.id = $3) AS seller_wallet
             FROM transactions t WHERE t.transaction_hash = $1""",
        transaction_hash, buyer_id, seller_id)
    return None if row is None else ChainPayment(**dict(row))
