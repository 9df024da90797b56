"""Read-only queries of the chain explorer: blocks by hash, a block's transactions, an address's
transactions and ledger, mining rewards by block and by user, burned blocks, search look-ups.

Every list is a keyset page (`WHERE key < $before ORDER BY key DESC LIMIT $n`, or `> $after`
ascending), never OFFSET, and each has an index that serves both its filter and its order
(migration 0015); tests/test_explorer.py checks the plans with EXPLAIN. The SQL is kept in
module constants so those tests explain exactly what runs.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from decimal import Decimal
from typing import Any

import asyncpg

from db import chain
from server.core.jsonutil import iso
from server.core.money import amount_text, money

# Keys past every stored one: the first page of a newest-first list starts below them.
MAX_INTEGER_KEY = 2**31 - 1
MAX_BIGINT_KEY = 2**63 - 1

# --- blocks -----------------------------------------------------------------------------------

BLOCK_HEIGHT_BY_HASH = "SELECT block_id FROM blocks WHERE block_hash = $1"

BLOCK_EXISTS = "SELECT block_hash FROM blocks WHERE block_id = $1"

BLOCK_TRANSACTIONS = f"""
    SELECT {chain.TX_COLUMNS} FROM transactions
     WHERE block_id = $1 AND transaction_id > $2
     ORDER BY transaction_id LIMIT $3"""


async def block_height_by_hash(conn: asyncpg.Connection, block_hash: str) -> int | None:
    """The height of the block with this hash."""
    return await conn.fetchval(BLOCK_HEIGHT_BY_HASH, block_hash)


async def block_hash_at(conn: asyncpg.Connection, height: int) -> str | None:
    """The hash of the block at this height (None when there is none)."""
    return await conn.fetchval(BLOCK_EXISTS, height)


async def block_transactions(conn: asyncpg.Connection, height: int, after: int, limit: int
                             ) -> list[tuple[int, chain.Transaction]]:
    """A block's transactions in block (sealing) order after the key `after`, with their keys."""
    rows = await conn.fetch(BLOCK_TRANSACTIONS, height, after, limit)
    return [(row["id"], chain.Transaction(**dict(row))) for row in rows]


# --- addresses --------------------------------------------------------------------------------

# Sent and received merged newest first: each branch walks its own (address, id) index, so a
# page costs two short index scans however long the history is. A transfer to oneself (only
# possible in rows written the seed's way) is listed once, as sent.
ADDRESS_TRANSACTIONS = f"""
    SELECT * FROM (
        (SELECT {chain.TX_COLUMNS}, 'sent' AS direction FROM transactions
          WHERE sender = $1 AND transaction_id < $2 ORDER BY transaction_id DESC LIMIT $3)
        UNION ALL
        (SELECT {chain.TX_COLUMNS}, 'received' AS direction FROM transactions
          WHERE receiver = $1 AND sender IS DISTINCT FROM $1 AND transaction_id < $2
          ORDER BY transaction_id DESC LIMIT $3)
    ) history ORDER BY id DESC LIMIT $3"""


async def address_transactions(conn: asyncpg.Connection, address: str, before: int, limit: int
                               ) -> list[tuple[int, str, chain.Transaction]]:
    """The address's transfers, sent and received, newest first below the key `before`:
    (key, "sent" | "received", transaction)."""
    rows = await conn.fetch(ADDRESS_TRANSACTIONS, address, before, limit)
    found = []
    for row in rows:
        fields = dict(row)
        direction = fields.pop("direction")
        found.append((row["id"], direction, chain.Transaction(**fields)))
    return found


# The chain's latest transfers, every status, newest first: the primary key gives filter and order.
LATEST_TRANSACTIONS = f"""
    SELECT {chain.TX_COLUMNS} FROM transactions
     WHERE transaction_id < $1 ORDER BY transaction_id DESC LIMIT $2"""


async def latest_transactions(conn: asyncpg.Connection, before: int, limit: int) -> list[chain.Transaction]:
    """The chain's transfers (every status) newest first, below the key `before`."""
    return [chain.Transaction(**dict(row)) for row in await conn.fetch(LATEST_TRANSACTIONS, before, limit)]


# --- the balance ledger -----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, slots=True)
class LedgerRow:
    """One booked balance change."""

    id: int
    delta: Decimal
    balance_after: Decimal
    reason: str
    reference: str
    created_at: dt.datetime

    def to_public(self) -> dict[str, Any]:
        """The API's view."""
        return {"id": self.id, "delta": money(self.delta), "balance_after": money(self.balance_after),
                "reason": self.reason, "reference": self.reference, "created_at": iso(self.created_at)}


USER_LEDGER = """
    SELECT entry_id AS id, delta, balance_after, reason, reference, created_at FROM balance_ledger
     WHERE user_id = $1 AND entry_id < $2 ORDER BY entry_id DESC LIMIT $3"""


async def user_ledger(conn: asyncpg.Connection, user_id: uuid.UUID, before: int, limit: int) -> list[LedgerRow]:
    """A user's ledger rows newest first, below the key `before`."""
    return [LedgerRow(**dict(row)) for row in await conn.fetch(USER_LEDGER, user_id, before, limit)]


# --- mining rewards ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, slots=True)
class MiningReward:
    """A miner's reward for a block."""

    id: int
    height: int | None
    user_id: uuid.UUID | None
    miner: str
    amount: Decimal
    device_type: str
    pool_id: int | None
    created_at: dt.datetime

    def to_public(self) -> dict[str, Any]:
        """The API's view."""
        return {"id": self.id, "height": self.height, "user_id": str(self.user_id) if self.user_id else None,
                "miner": self.miner, "amount": money(self.amount), "device_type": self.device_type,
                "pool_id": self.pool_id, "created_at": iso(self.created_at)}


_REWARD_COLUMNS = """reward_id AS id, block_id AS height, user_id, miner_wallet AS miner, amount, device_type,
    pool_id, created_at"""

BLOCK_MINING_REWARDS = f"""
    SELECT {_REWARD_COLUMNS} FROM mining_rewards
     WHERE block_id = $1 AND reward_id > $2 ORDER BY reward_id LIMIT $3"""

USER_MINING_REWARDS = f"""
    SELECT {_REWARD_COLUMNS} FROM mining_rewards
     WHERE user_id = $1 AND reward_id < $2 ORDER BY reward_id DESC LIMIT $3"""

LATEST_MINING_REWARDS = f"""
    SELECT {_REWARD_COLUMNS} FROM mining_rewards
     WHERE reward_id < $1 ORDER BY reward_id DESC LIMIT $2"""

# Served by the index alone: idx_mining_rewards_user_order carries the amount.
USER_MINING_TOTAL = "SELECT count(*), coalesce(sum(amount), 0) FROM mining_rewards WHERE user_id = $1"


async def block_mining_rewards(conn: asyncpg.Connection, height: int, after: int, limit: int) -> list[MiningReward]:
    """The rewards paid for a block, oldest first after the key `after`."""
    return [MiningReward(**dict(row)) for row in await conn.fetch(BLOCK_MINING_REWARDS, height, after, limit)]


async def user_mining_rewards(conn: asyncpg.Connection, user_id: uuid.UUID, before: int, limit: int
                              ) -> list[MiningReward]:
    """A user's mining rewards newest first, below the key `before`."""
    return [MiningReward(**dict(row)) for row in await conn.fetch(USER_MINING_REWARDS, user_id, before, limit)]


async def latest_mining_rewards(conn: asyncpg.Connection, before: int, limit: int) -> list[MiningReward]:
    """Every miner's rewards newest first, below the key `before`."""
    return [MiningReward(**dict(row)) for row in await conn.fetch(LATEST_MINING_REWARDS, before, limit)]


async def user_mining_total(conn: asyncpg.Connection, user_id: uuid.UUID) -> tuple[int, Decimal]:
    """How many rewards a user was paid and their sum."""
    row = await conn.fetchrow(USER_MINING_TOTAL, user_id)
    return row[0], row[1]


async def user_exists(conn: asyncpg.Connection, user_id: uuid.UUID) -> bool:
    """Whether a user with this id exists."""
    return await conn.fetchval("SELECT EXISTS (SELECT 1 FROM users WHERE id = $1)", user_id)


# --- burns ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, slots=True)
class BurnedBlock:
    """A burned block and the rewards that were paid for it."""

    height: int
    hash: str
    miner_id: uuid.UUID | None
    timestamp: dt.datetime
    reward: Decimal

    def to_public(self) -> dict[str, Any]:
        """The API's view."""
        return {"height": self.height, "hash": self.hash, "miner_id": str(self.miner_id) if self.miner_id else None,
                "timestamp": iso(self.timestamp), "reward": amount_text(self.reward)}


BURNED_BLOCKS = """
    SELECT b.block_id AS height, b.block_hash AS hash, b.miner_id, b."timestamp",
           (SELECT coalesce(sum(r.amount), 0) FROM mining_rewards r WHERE r.block_id = b.block_id) AS reward
      FROM blocks b
     WHERE b.burned AND b.block_id < $1 ORDER BY b.block_id DESC LIMIT $2"""

BURNED_COUNT = "SELECT count(*) FROM blocks WHERE burned"

BURNED_REWARDS = """SELECT coalesce(sum(r.amount), 0) FROM blocks b JOIN mining_rewards r ON r.block_id = b.block_id
                     WHERE b.burned"""

LAST_BURN_TIME = "SELECT last_burn_time FROM blocks ORDER BY block_id DESC LIMIT 1"


async def burned_blocks(conn: asyncpg.Connection, before: int, limit: int) -> list[BurnedBlock]:
    """Burned blocks newest first, below the height `before`."""
    return [BurnedBlock(**dict(row)) for row in await conn.fetch(BURNED_BLOCKS, before, limit)]


@dataclasses.dataclass(frozen=True, slots=True)
class BurnTotals:
    """What burning has removed so far."""

    blocks: int
    rewards: Decimal
    last_burn_time: dt.datetime | None


async def burn_totals(conn: asyncpg.Connection) -> BurnTotals:
    """How many blocks are burned, the rewards that were paid for them, and the last burn's time."""
    return BurnTotals(blocks=await conn.fetchval(BURNED_COUNT), rewards=await conn.fetchval(BURNED_REWARDS),
                      last_burn_time=await conn.fetchval(LAST_BURN_TIME))


# --- chain settings and search ----------------------------------------------------------------

async def chain_economics(conn: asyncpg.Connection) -> asyncpg.Record:
    """The halving schedule's settings, the tip's height and the next block's reward by the SQL schedule."""
    return await conn.fetchrow(
        """SELECT s.initial_block_reward, s.halving_interval, s.target_block_seconds, s.max_blocks,
                  t.height, block_reward(t.height + 1) AS next_block_reward
             FROM chain_settings s,
                  LATERAL (SELECT coalesce(max(block_id), 0) AS height FROM blocks) t
            WHERE s.id""")


TRANSACTION_BY_HASH = "SELECT status, block_id AS height FROM transactions WHERE transaction_hash = $1"


async def transaction_location(conn: asyncpg.Connection, tx_hash: str) -> asyncpg.Record | None:
    """A transaction's status and block height, by hash."""
    return await conn.fetchrow(TRANSACTION_BY_HASH, tx_hash)
