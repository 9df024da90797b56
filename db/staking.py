"""Queries of staking, the `defi` rows whose product is 'staking' (migration 0017).

Each function takes the connection first; the caller owns the transaction. Balances move only
through db/ledger.py; the rules (lock-up, reward rate, pool draws) live in server/services/staking.py.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from decimal import Decimal

import asyncpg

from db.ledger import BALANCE_LOCK

PRODUCT = "staking"
ACTIVE = "active"
CLOSED = "closed"


@dataclasses.dataclass(frozen=True, slots=True)
class Stake:
    """KVP locked into staking, and how far its rewards were paid."""

    id: int
    user_id: uuid.UUID
    amount: Decimal
    apy: Decimal
    status: str
    opened_height: int
    unlock_height: int
    paid_height: int
    reward_rate: Decimal
    rewards_paid: Decimal
    request_id: uuid.UUID | None
    created_at: dt.datetime
    closed_at: dt.datetime | None


_COLUMNS = """id, user_id, amount, apy, status, opened_height, unlock_height, paid_height, reward_rate,
              rewards_paid, request_id, created_at, closed_at"""


def _stake(row: asyncpg.Record | None) -> Stake | None:
    return Stake(**dict(row)) if row else None


async def lock_account(conn: asyncpg.Connection, user_id: uuid.UUID) -> asyncpg.Record | None:
    """The user's balance and wallet address, their row locked (the same lock a transfer submission takes)."""
    return await conn.fetchrow(
        "SELECT total_balance AS balance, wallet_address AS address FROM users WHERE id = $1" + BALANCE_LOCK, user_id)


async def pool_exists(conn: asyncpg.Connection, name: str) -> bool:
    """Whether the reward pool exists (read without a lock: claims lock the pool before the user, so opening,
    which holds the user's row, must not wait for the pool)."""
    return await conn.fetchval("SELECT EXISTS (SELECT 1 FROM reward_pools WHERE pool_name = $1)", name)


async def insert_stake(conn: asyncpg.Connection, *, user_id: uuid.UUID, amount: Decimal, apy: Decimal,
                       height: int, unlock_height: int, reward_rate: Decimal,
                       request_id: uuid.UUID | None) -> Stake:
    """A new active stake opened at `height` (a reused request_id raises UniqueViolationError)."""
    row = await conn.fetchrow(
        f"""INSERT INTO defi (user_id, product, amount, apy, opened_height, unlock_height, paid_height,
                              reward_rate, request_id)
            VALUES ($1, '{PRODUCT}', $2, $3, $4, $5, $4, $6, $7) RETURNING {_COLUMNS}""",
        user_id, amount, apy, height, unlock_height, reward_rate, request_id)
    return Stake(**dict(row))


async def by_request(conn: asyncpg.Connection, user_id: uuid.UUID, request_id: uuid.UUID) -> Stake | None:
    """The user's stake opened with this idempotency key, if any."""
    return _stake(await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM defi WHERE user_id = $1 AND request_id = $2 AND product = '{PRODUCT}'",
        user_id, request_id))


async def get_stake(conn: asyncpg.Connection, stake_id: int, user_id: uuid.UUID, *, lock: bool = False) -> Stake | None:
    """The user's stake by id (FOR UPDATE when `lock`: claims and unstakes of one stake serialise on it)."""
    return _stake(await conn.fetchrow(
        f"""SELECT {_COLUMNS} FROM defi WHERE id = $1 AND user_id = $2 AND product = '{PRODUCT}'
            {'FOR UPDATE' if lock else ''}""", stake_id, user_id))


async def mark_paid(conn: asyncpg.Connection, stake_id: int, paid_height: int, paid: Decimal, *,
                    close: bool) -> Stake:
    """Move the stake's paid height on (and close it); only from an active stake with a lower paid height."""
    row = await conn.fetchrow(
        f"""UPDATE defi SET paid_height = greatest(paid_height, $2), rewards_paid = rewards_paid + $3,
                            status = CASE WHEN $4 THEN '{CLOSED}' ELSE status END,
                            closed_at = CASE WHEN $4 THEN now() ELSE closed_at END
             WHERE id = $1 AND status = '{ACTIVE}' RETURNING {_COLUMNS}""",
        stake_id, paid_height, paid, close)
    assert row is not None, "the stake is locked and active"
    return Stake(**dict(row))


# A user's stakes newest first, below a key: idx_defi_user_product_order (tests EXPLAIN it).
LIST_STAKES = f"""SELECT {_COLUMNS} FROM defi
                   WHERE user_id = $1 AND product = '{PRODUCT}' AND ($2::int IS NULL OR id < $2)
                     AND ($3::text IS NULL OR status = $3)
                   ORDER BY id DESC LIMIT $4"""


async def list_stakes(conn: asyncpg.Connection, user_id: uuid.UUID, before: int | None, limit: int,
                      status: str | None) -> list[Stake]:
    """The user's stakes newest first, below the id `before`."""
    rows = await conn.fetch(LIST_STAKES, user_id, before, status, limit)
    return [Stake(**dict(row)) for row in rows]


async def insert_reward_allocation(conn: asyncpg.Connection, user_id: uuid.UUID, pool_id: int, amount: Decimal) -> int:
    """The pool allocation a staking reward is recorded as (what `chain verify` checks the pool's draws against)."""
    return await conn.fetchval(
        """INSERT INTO pool_allocations (user_id, pool_id, allocated_amount, reward_amount, total_reward)
           VALUES ($1, $2, $3, $3, $3) RETURNING id""", user_id, pool_id, amount)
