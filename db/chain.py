"""Queries of the KVP chain: wallets, transactions, balances, blocks, mining rewards, reward pools.
Balances move only through db/ledger.py.

Each function takes the connection first; the caller owns the transaction. The rules (signature,
balance, sealing order) live in server/services/chain.py.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from decimal import Decimal
from typing import Any

import asyncpg

from db.ledger import BALANCE_LOCK
from server.core.jsonutil import iso
from server.core.money import amount_text

# --- wallets ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, slots=True)
class WalletAccount:
    """A registered wallet: its owner, key and the owner's balance."""

    user_id: uuid.UUID
    address: str
    public_key: str
    balance: Decimal


async def set_wallet(conn: asyncpg.Connection, user_id: uuid.UUID, public_key: str, address: str) -> str | None:
    """Register the user's wallet key once (the same key again is a no-op); returns the stored
    address, or None when the user already has another key. A key owned by someone else raises
    UniqueViolationError."""
    row = await conn.fetchrow(
        """UPDATE users SET wallet_public_key = $2, wallet_address = $3
            WHERE id = $1 AND (wallet_public_key IS NULL OR wallet_public_key = $2)
        RETURNING wallet_address""", user_id, public_key, address)
    return row["wallet_address"] if row else None


# A deleted account keeps its address without a key (migration 0020): no wallet, so nothing is sent to or from it.
WALLET_BY_ADDRESS = """SELECT id AS user_id, wallet_address AS address, wallet_public_key AS public_key,
                            total_balance AS balance
                       FROM users WHERE wallet_address = $1 AND wallet_public_key IS NOT NULL"""
PENDING_OUTGOING = "SELECT coalesce(sum(amount), 0) FROM transactions WHERE sender = $1 AND status = 'pending'"
NEXT_NONCE = "SELECT coalesce(max(nonce) + 1, 0) FROM transactions WHERE sender = $1 AND nonce IS NOT NULL"


async def get_wallet(conn: asyncpg.Connection, address: str, *, lock: bool = False) -> WalletAccount | None:
    """The wallet with this address (its owner's row locked as a balance lock when `lock`)."""
    row = await conn.fetchrow(WALLET_BY_ADDRESS + (BALANCE_LOCK if lock else ""), address)
    return WalletAccount(**dict(row)) if row else None


async def get_user_wallet(conn: asyncpg.Connection, user_id: uuid.UUID) -> WalletAccount | None:
    """The user's wallet, if registered."""
    row = await conn.fetchrow(
        """SELECT id AS user_id, wallet_address AS address, wallet_public_key AS public_key,
                  total_balance AS balance
             FROM users WHERE id = $1 AND wallet_address IS NOT NULL""", user_id)
    return WalletAccount(**dict(row)) if row else None


async def pending_outgoing(conn: asyncpg.Connection, address: str) -> Decimal:
    """What the address has submitted but not yet had sealed (reserved from its balance)."""
    return await conn.fetchval(PENDING_OUTGOING, address)


async def next_nonce(conn: asyncpg.Connection, address: str) -> int:
    """One more than the highest nonce the address has used (0 for a new wallet)."""
    return await conn.fetchval(NEXT_NONCE, address)


# --- transactions -----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, slots=True)
class Transaction:
    """A signed transfer and where it stands."""

    id: int
    hash: str
    sender: str | None
    receiver: str | None
    amount: Decimal
    nonce: int | None
    signature: str | None
    public_key: str | None
    status: str
    error: str | None
    height: int | None
    sender_id: uuid.UUID | None
    receiver_id: uuid.UUID | None
    created_at: dt.datetime
    confirmed_at: dt.datetime | None

    def to_public(self) -> dict[str, Any]:
        """The API's view."""
        return {"hash": self.hash, "sender": self.sender, "receiver": self.receiver, "amount": amount_text(self.amount),
                "nonce": self.nonce, "signature": self.signature, "public_key": self.public_key,
                "status": self.status, "error": self.error, "height": self.height,
                "created_at": iso(self.created_at), "confirmed_at": iso(self.confirmed_at)}


# Transaction rows as `Transaction` reads them (db/explorer.py selects them too).
TX_COLUMNS = """transaction_id AS id, transaction_hash AS hash, sender, receiver, amount, nonce, signature,
    public_key, status, error, block_id AS height, sender_id, receiver_id, created_at, confirmed_at"""


async def transaction_exists(conn: asyncpg.Connection, tx_hash: str, sender: str, nonce: int) -> str | None:
    """'hash' or 'nonce' when a transaction with this hash, or this sender and nonce, exists."""
    return await conn.fetchval(
        """SELECT CASE WHEN transaction_hash = $1 THEN 'hash' ELSE 'nonce' END FROM transactions
            WHERE transaction_hash = $1 OR (sender = $2 AND nonce = $3) LIMIT 1""", tx_hash, sender, nonce)


async def insert_pending(conn: asyncpg.Connection, *, tx_hash: str, sender: WalletAccount, receiver: WalletAccount,
                         amount: Decimal, nonce: int, signature: str, submitted_by: uuid.UUID) -> Transaction:
    """Record a verified transfer as pending (unique hash and (sender, nonce) are the backstop)."""
    row = await conn.fetchrow(
        f"""INSERT INTO transactions (transaction_hash, sender, receiver, amount, nonce, signature, public_key,
                                      status, user_id, sender_id, receiver_id)
            VALUES ($1, $2, $3, $4, $5, $6, $7, 'pending', $8, $9, $10) RETURNING {TX_COLUMNS}""",
        tx_hash, sender.address, receiver.address, amount, nonce, signature, sender.public_key,
        submitted_by, sender.user_id, receiver.user_id)
    return Transaction(**dict(row))


async def get_transaction(conn: asyncpg.Connection, tx_hash: str) -> Transaction | None:
    """A transaction by hash."""
    row = await conn.fetchrow(f"SELECT {TX_COLUMNS} FROM transactions WHERE transaction_hash = $1", tx_hash)
    return Transaction(**dict(row)) if row else None


async def lock_pending(conn: asyncpg.Connection, limit: int) -> list[Transaction]:
    """The oldest pending transactions, locked for sealing."""
    rows = await conn.fetch(
        f"""SELECT {TX_COLUMNS} FROM transactions WHERE status = 'pending'
             ORDER BY transaction_id LIMIT $1 FOR UPDATE""", limit)
    return [Transaction(**dict(row)) for row in rows]


async def confirm(conn: asyncpg.Connection, ids: list[int], height: int, at: dt.datetime) -> None:
    """Mark transactions sealed into block `height`."""
    await conn.execute(
        """UPDATE transactions SET status = 'confirmed', block_id = $2, confirmed_at = $3
            WHERE transaction_id = ANY($1::int[])""", ids, height, at)


async def reject(conn: asyncpg.Connection, tx_id: int, reason: str) -> None:
    """Mark a pending transaction as rejected at sealing time (e.g. its balance was spent elsewhere)."""
    await conn.execute("UPDATE transactions SET status = 'rejected', error = $2 WHERE transaction_id = $1",
                       tx_id, reason)


async def block_transactions(conn: asyncpg.Connection, heights: list[int]) -> dict[int, list[Transaction]]:
    """The transactions of some blocks, by height."""
    rows = await conn.fetch(
        f"SELECT {TX_COLUMNS} FROM transactions WHERE block_id = ANY($1::int[]) ORDER BY transaction_id", heights)
    found: dict[int, list[Transaction]] = {height: [] for height in heights}
    for row in rows:
        found[row["height"]].append(Transaction(**dict(row)))
    return found


# --- balances ---------------------------------------------------------------------------------

async def lock_balances(conn: asyncpg.Connection, user_ids: list[uuid.UUID]) -> dict[uuid.UUID, Decimal]:
    """Lock users' rows in id order (no deadlock between sealers) and return their balances."""
    rows = await conn.fetch(
        "SELECT id, total_balance FROM users WHERE id = ANY($1::uuid[]) ORDER BY id" + BALANCE_LOCK, user_ids)
    return {row["id"]: row["total_balance"] for row in rows}


# --- blocks -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, slots=True)
class Block:
    """A sealed block with the chain counters the trigger stored on it."""

    height: int
    hash: str
    previous_hash: str | None
    timestamp: dt.datetime
    nonce: int | None
    data: dict[str, Any] | None
    tx_hashes: list[str]
    miner_id: uuid.UUID | None
    burned: bool
    total_blocks: int
    active_blocks: int
    inactive_blocks: int
    burned_blocks: int
    remaining_blocks: int
    halving_schedule: dt.datetime | None
    next_halving_time: dt.datetime | None
    last_burn_time: dt.datetime | None
    burned_block_ids: list[str]
    reward: Decimal | None

    def to_public(self) -> dict[str, Any]:
        """The API's and the feeds' view."""
        data = self.data or {}
        return {"height": self.height, "hash": self.hash, "previous_hash": self.previous_hash,
                "timestamp": iso(self.timestamp), "nonce": self.nonce, "difficulty": data.get("difficulty"),
                "tx_count": len(self.tx_hashes), "transactions": self.tx_hashes,
                "miner": data.get("miner"), "miner_id": str(self.miner_id) if self.miner_id else None,
                "reward": amount_text(self.reward or Decimal(0)), "burned": self.burned,
                "total_blocks": self.total_blocks, "active_blocks": self.active_blocks,
                "inactive_blocks": self.inactive_blocks, "burned_blocks": self.burned_blocks,
                "remaining_blocks": self.remaining_blocks, "halving_schedule": iso(self.halving_schedule),
                "next_halving_time": iso(self.next_halving_time), "last_burn_time": iso(self.last_burn_time),
                "burned_block_ids": [int(i) for i in self.burned_block_ids]}


_BLOCK_COLUMNS = """b.block_id AS height, b.block_hash AS hash, b.previous_hash, b."timestamp", b.nonce, b.data,
    coalesce(b.transactions, '[]'::jsonb) AS tx_hashes, b.miner_id, b.burned, b.total_blocks, b.active_blocks,
    b.inactive_blocks, b.burned_blocks, b.remaining_blocks, b.halving_schedule, b.next_halving_time,
    b.last_burn_time, coalesce(b.burned_block_ids, '{}') AS burned_block_ids,
    (SELECT sum(r.amount) FROM mining_rewards r WHERE r.block_id = b.block_id) AS reward"""  # one row per miner


def _block(row: asyncpg.Record) -> Block:
    return Block(**dict(row))


async def get_block(conn: asyncpg.Connection, height: int) -> Block | None:
    """A block by height."""
    row = await conn.fetchrow(f"SELECT {_BLOCK_COLUMNS} FROM blocks b WHERE b.block_id = $1", height)
    return _block(row) if row else None


async def list_blocks(conn: asyncpg.Connection, before_height: int | None, limit: int) -> list[Block]:
    """The newest blocks below `before_height` (all when None), newest first."""
    rows = await conn.fetch(
        f"""SELECT {_BLOCK_COLUMNS} FROM blocks b WHERE $1::int IS NULL OR b.block_id < $1
             ORDER BY b.block_id DESC LIMIT $2""", before_height, limit)
    return [_block(row) for row in rows]


async def blocks_after(conn: asyncpg.Connection, since_height: int, limit: int) -> list[Block]:
    """The blocks above `since_height`, oldest first."""
    rows = await conn.fetch(
        f"SELECT {_BLOCK_COLUMNS} FROM blocks b WHERE b.block_id > $1 ORDER BY b.block_id LIMIT $2",
        since_height, limit)
    return [_block(row) for row in rows]


async def tip_height(conn: asyncpg.Connection) -> int:
    """The latest block's height (0 for an empty chain)."""
    return await conn.fetchval("SELECT coalesce(max(block_id), 0) FROM blocks")


async def tip(conn: asyncpg.Connection) -> asyncpg.Record | None:
    """Height, hash and time of the latest block."""
    return await conn.fetchrow(
        """SELECT block_id AS height, block_hash AS hash, "timestamp" FROM blocks
            ORDER BY block_id DESC LIMIT 1""")


async def lock_chain_settings(conn: asyncpg.Connection) -> asyncpg.Record:
    """The chain's economics, locked: appends serialise on this row (the block trigger locks it too)."""
    return await conn.fetchrow("SELECT * FROM chain_settings WHERE id FOR UPDATE")


async def update_chain_settings(conn: asyncpg.Connection, *, target_block_seconds: int,
                                initial_block_reward: Decimal | None, halving_interval: int | None) -> None:
    """Bring chain_settings in line with the configuration (None keeps the stored value)."""
    await conn.execute(
        """UPDATE chain_settings SET target_block_seconds = $1,
                  initial_block_reward = coalesce($2, initial_block_reward),
                  halving_interval = coalesce($3, halving_interval)
            WHERE id AND (target_block_seconds <> $1
                          OR initial_block_reward IS DISTINCT FROM coalesce($2, initial_block_reward)
                          OR halving_interval IS DISTINCT FROM coalesce($3, halving_interval))""",
        target_block_seconds, initial_block_reward, halving_interval)


async def scheduled_reward(conn: asyncpg.Connection, height: int) -> Decimal:
    """The schedule's reward for a block height (the block_reward() SQL function)."""
    return await conn.fetchval("SELECT block_reward($1)", height)


async def insert_block(conn: asyncpg.Connection, *, height: int, block_hash: str, previous_hash: str | None,
                       timestamp: dt.datetime, nonce: int, data: dict[str, Any], tx_hashes: list[str],
                       miner_id: uuid.UUID | None) -> Block:
    """Append a block; the trigger fills its chain counters and halving columns."""
    await conn.execute(
        """INSERT INTO blocks (block_id, block_hash, previous_hash, "timestamp", nonce, data, transactions, miner_id)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8)""",
        height, block_hash, previous_hash, timestamp, nonce, data, tx_hashes, miner_id)
    return await get_block(conn, height)  # type: ignore[return-value]


async def iter_blocks(conn: asyncpg.Connection, after_height: int, limit: int) -> list[Block]:
    """A page of blocks for a full walk (oldest first)."""
    return await blocks_after(conn, after_height, limit)


async def burn_miner_blocks(conn: asyncpg.Connection, miner_id: uuid.UUID) -> list[int]:
    """Burn every unburned block the user mined; the tip trigger refreshes the chain counters."""
    rows = await conn.fetch(
        "UPDATE blocks SET burned = true WHERE miner_id = $1 AND NOT burned RETURNING block_id", miner_id)
    return sorted(row["block_id"] for row in rows)


# --- mining rewards and reward pools ----------------------------------------------------------

@dataclasses.dataclass(frozen=True, slots=True)
class MinerAccount:
    """Who receives a block's reward."""

    user_id: uuid.UUID
    account: str           # the wallet address, or "user:<id>" before a wallet is registered
    device_type: str


async def get_miner(conn: asyncpg.Connection, username: str) -> MinerAccount | None:
    """The configured miner by username."""
    row = await conn.fetchrow(
        """SELECT id, coalesce(wallet_address, 'user:' || id::text) AS account,
                  coalesce(mining_status, 'Node') AS device_type
             FROM users WHERE username = $1""", username)
    return MinerAccount(row["id"], row["account"], row["device_type"]) if row else None


@dataclasses.dataclass(frozen=True, slots=True)
class RewardPool:
    """A pool of tokens that rewards and allocations draw from."""

    id: int
    name: str | None
    total_tokens: Decimal
    allocated_tokens: Decimal
    created_at: dt.datetime

    @property
    def remaining(self) -> Decimal:
        """Tokens not yet drawn."""
        return self.total_tokens - self.allocated_tokens

    def to_public(self) -> dict[str, Any]:
        """The API's view."""
        return {"id": self.id, "name": self.name, "total_tokens": amount_text(self.total_tokens),
                "allocated_tokens": amount_text(self.allocated_tokens),
                "remaining_tokens": amount_text(self.remaining),
                "created_at": iso(self.created_at)}


_POOL_COLUMNS = "pool_id AS id, pool_name AS name, total_tokens, allocated_tokens, created_at"


async def create_pool(conn: asyncpg.Connection, name: str, total_tokens: Decimal) -> RewardPool:
    """A new pool (a duplicate name raises UniqueViolationError)."""
    row = await conn.fetchrow(
        f"INSERT INTO reward_pools (pool_name, total_tokens) VALUES ($1, $2) RETURNING {_POOL_COLUMNS}",
        name, total_tokens)
    return RewardPool(**dict(row))


async def list_pools(conn: asyncpg.Connection) -> list[RewardPool]:
    """Every pool, by id."""
    return [RewardPool(**dict(row)) for row in await conn.fetch(
        f"SELECT {_POOL_COLUMNS} FROM reward_pools ORDER BY pool_id")]


async def get_pool(conn: asyncpg.Connection, pool_id: int) -> RewardPool | None:
    """A pool by id."""
    row = await conn.fetchrow(f"SELECT {_POOL_COLUMNS} FROM reward_pools WHERE pool_id = $1", pool_id)
    return RewardPool(**dict(row)) if row else None


async def lock_pool_by_name(conn: asyncpg.Connection, name: str) -> RewardPool | None:
    """A pool by name, locked until the transaction ends."""
    row = await conn.fetchrow(f"SELECT {_POOL_COLUMNS} FROM reward_pools WHERE pool_name = $1 FOR UPDATE", name)
    return RewardPool(**dict(row)) if row else None


async def draw(conn: asyncpg.Connection, pool_id: int, amount: Decimal) -> RewardPool | None:
    """Take `amount` from a pool. The CHECK reward_pools_allocation_check refuses over-drawing
    (CheckViolationError), also when concurrent draws race; None when the pool does not exist."""
    row = await conn.fetchrow(
        f"""UPDATE reward_pools SET allocated_tokens = allocated_tokens + $2 WHERE pool_id = $1
            RETURNING {_POOL_COLUMNS}""", pool_id, amount)
    return RewardPool(**dict(row)) if row else None


async def add_tokens(conn: asyncpg.Connection, pool_id: int, delta: Decimal) -> RewardPool | None:
    """Add (or with a negative delta, remove) tokens; the CHECK keeps total >= allocated."""
    row = await conn.fetchrow(
        f"""UPDATE reward_pools SET total_tokens = total_tokens + $2 WHERE pool_id = $1
            RETURNING {_POOL_COLUMNS}""", pool_id, delta)
    return RewardPool(**dict(row)) if row else None


async def mining_rewards_by_block(conn: asyncpg.Connection, heights: list[int]) -> dict[int, list[Decimal]]:
    """Recorded reward amounts by block (verification)."""
    rows = await conn.fetch("SELECT block_id, amount FROM mining_rewards WHERE block_id = ANY($1::int[])", heights)
    found: dict[int, list[Decimal]] = {}
    for row in rows:
        found.setdefault(row["block_id"], []).append(row["amount"])
    return found


@dataclasses.dataclass(frozen=True, slots=True)
class Allocation:
    """Tokens of a pool granted to a user."""

    id: int
    user_id: uuid.UUID
    pool_id: int
    allocated_amount: Decimal
    remaining_amount: Decimal
    total_reward: Decimal
    reward_amount: Decimal
    timestamp: dt.datetime

    def to_public(self) -> dict[str, Any]:
        """The API's view."""
        return {"id": self.id, "user_id": str(self.user_id), "pool_id": self.pool_id,
                "allocated_amount": amount_text(self.allocated_amount),
                "remaining_amount": amount_text(self.remaining_amount),
                "total_reward": amount_text(self.total_reward), "reward_amount": amount_text(self.reward_amount),
                "timestamp": iso(self.timestamp)}


async def insert_allocation(conn: asyncpg.Connection, user_id: uuid.UUID, pool_id: int, amount: Decimal) -> Allocation:
    """Record a grant paid out at once; total_reward is the user's running total from this pool."""
    row = await conn.fetchrow(
        """INSERT INTO pool_allocations (user_id, pool_id, allocated_amount, remaining_amount, total_reward,
                                         reward_amount)
           SELECT $1, $2, $3, 0, coalesce(sum(a.allocated_amount), 0) + $3, $3
             FROM pool_allocations a WHERE a.user_id = $1 AND a.pool_id = $2
        RETURNING id, user_id, pool_id, allocated_amount, remaining_amount, total_reward, reward_amount,
                  "timestamp"
        """, user_id, pool_id, amount)
    return Allocation(**dict(row))
