"""Queries of user mining (migration 0019): device types, mining sessions, proof-of-work shares, the
Mobile daily counter, the work a sealed block pays and the per-miner reward rows.

Each function takes the connection first; the caller owns the transaction. The rules (share
verification, heartbeats, the daily cap, the reward split) live in server/services/mining.py.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from decimal import Decimal
from typing import Sequence

import asyncpg

MOBILE = "Mobile"
NODE = "Node"
DEVICE_TYPES = (MOBILE, NODE)
STOPPED = "stopped"
EXPIRED = "expired"


# --- device type ------------------------------------------------------------------------------

async def get_device(conn: asyncpg.Connection, user_id: uuid.UUID) -> str | None:
    """The user's device type (`users.mining_status`), None when unset."""
    return await conn.fetchval("SELECT mining_status FROM users WHERE id = $1", user_id)


async def set_device(conn: asyncpg.Connection, user_id: uuid.UUID, device_type: str) -> bool:
    """Set the user's device type; False when the user does not exist."""
    return await conn.fetchval(
        "UPDATE users SET mining_status = $2 WHERE id = $1 RETURNING true", user_id, device_type) or False


# --- sessions ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, slots=True)
class Session:
    """A user's mining from one device type, and the work it has done."""

    id: int
    user_id: uuid.UUID
    device_type: str
    started_at: dt.datetime
    last_heartbeat_at: dt.datetime
    ended_at: dt.datetime | None
    end_reason: str | None
    shares: int
    active_seconds: int
    unpaid_shares: int
    unpaid_seconds: int


_SESSION_COLUMNS = """id, user_id, device_type, started_at, last_heartbeat_at, ended_at, end_reason, shares,
    active_seconds, unpaid_shares, unpaid_seconds"""


def _session(row: asyncpg.Record | None) -> Session | None:
    return Session(**dict(row)) if row else None


async def open_session(conn: asyncpg.Connection, user_id: uuid.UUID, *, lock: bool = False) -> Session | None:
    """The user's open session (FOR UPDATE when `lock`), if any."""
    row = await conn.fetchrow(
        f"SELECT {_SESSION_COLUMNS} FROM mining_sessions WHERE user_id = $1 AND ended_at IS NULL"
        + (" FOR UPDATE" if lock else ""), user_id)
    return _session(row)


async def insert_session(conn: asyncpg.Connection, user_id: uuid.UUID, device_type: str, now: dt.datetime) -> Session:
    """Open a session; a second open one raises UniqueViolationError (mining_sessions_one_open)."""
    row = await conn.fetchrow(
        f"""INSERT INTO mining_sessions (user_id, device_type, started_at, last_heartbeat_at)
            VALUES ($1, $2, $3, $3) RETURNING {_SESSION_COLUMNS}""", user_id, device_type, now)
    return Session(**dict(row))


async def end_session(conn: asyncpg.Connection, session_id: int, reason: str, at: dt.datetime) -> Session:
    """Close a session (its unpaid work is still paid by the next sealed block)."""
    row = await conn.fetchrow(
        f"""UPDATE mining_sessions SET ended_at = $3, end_reason = $2 WHERE id = $1
            RETURNING {_SESSION_COLUMNS}""", session_id, reason, at)
    return Session(**dict(row))


async def credit_seconds(conn: asyncpg.Connection, session_id: int, seconds: int,
                         last_heartbeat_at: dt.datetime) -> Session:
    """Add Mobile seconds to a session and move its heartbeat mark."""
    row = await conn.fetchrow(
        f"""UPDATE mining_sessions SET active_seconds = active_seconds + $2, unpaid_seconds = unpaid_seconds + $2,
                   last_heartbeat_at = $3
             WHERE id = $1 RETURNING {_SESSION_COLUMNS}""", session_id, seconds, last_heartbeat_at)
    return Session(**dict(row))


async def day_seconds(conn: asyncpg.Connection, user_id: uuid.UUID, day: dt.date) -> int:
    """Mobile seconds already credited to the user on a UTC day."""
    return await conn.fetchval(
        "SELECT coalesce((SELECT seconds FROM mining_days WHERE user_id = $1 AND day = $2), 0)", user_id, day)


async def add_day_seconds(conn: asyncpg.Connection, user_id: uuid.UUID, day: dt.date, seconds: int) -> int:
    """Count Mobile seconds against the user's day; returns the day's total."""
    return await conn.fetchval(
        """INSERT INTO mining_days (user_id, day, seconds) VALUES ($1, $2, $3)
           ON CONFLICT (user_id, day) DO UPDATE SET seconds = mining_days.seconds + excluded.seconds
           RETURNING seconds""", user_id, day, seconds)


# --- shares -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, slots=True)
class ChainTip:
    """What a share challenge is built on: the latest block (height 0, no hash, on an empty chain)."""

    height: int
    hash: str | None
    previous_hash: str | None
    timestamp: dt.datetime | None


async def chain_tip(conn: asyncpg.Connection) -> ChainTip:
    """The latest block's height, hash, previous hash and time."""
    row = await conn.fetchrow(
        """SELECT block_id AS height, block_hash AS hash, previous_hash, "timestamp" FROM blocks
            ORDER BY block_id DESC LIMIT 1""")
    return ChainTip(**dict(row)) if row else ChainTip(0, None, None, None)


async def recent_shares(conn: asyncpg.Connection, session_id: int,
                        since: dt.datetime) -> tuple[int, dt.datetime | None]:
    """How many shares a session had accepted after `since`, and the oldest of them."""
    row = await conn.fetchrow(
        "SELECT count(*), min(created_at) FROM mining_shares WHERE session_id = $1 AND created_at > $2",
        session_id, since)
    return row[0], row[1]


async def insert_share(conn: asyncpg.Connection, session: Session, *, height: int, challenge: str, nonce: int,
                       share_hash: str, difficulty: int, now: dt.datetime) -> Session | None:
    """Record an accepted share and count it on its session; None when that hash was accepted before
    (mining_shares_hash_key: also when two submissions race)."""
    inserted = await conn.fetchval(
        """INSERT INTO mining_shares (session_id, user_id, height, challenge, nonce, share_hash, difficulty,
                                      created_at)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (share_hash) DO NOTHING RETURNING id""",
        session.id, session.user_id, height, challenge, nonce, share_hash, difficulty, now)
    if inserted is None:
        return None
    row = await conn.fetchrow(
        f"""UPDATE mining_sessions SET shares = shares + 1, unpaid_shares = unpaid_shares + 1, last_heartbeat_at = $2
             WHERE id = $1 RETURNING {_SESSION_COLUMNS}""", session.id, now)
    return Session(**dict(row))


async def touch_session(conn: asyncpg.Connection, session_id: int, now: dt.datetime) -> Session:
    """Keep a Node session alive without a share."""
    row = await conn.fetchrow(
        f"UPDATE mining_sessions SET last_heartbeat_at = $2 WHERE id = $1 RETURNING {_SESSION_COLUMNS}",
        session_id, now)
    return Session(**dict(row))


# --- what a block pays ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, slots=True)
class Work:
    """A user's unpaid mining work since the last block that paid (summed over their sessions)."""

    user_id: uuid.UUID
    account: str          # the wallet address, or "user:<id>" before a wallet is registered
    shares: int
    mobile_seconds: int


async def take_unpaid_work(conn: asyncpg.Connection) -> list[Work]:
    """Every user's unpaid shares and Mobile seconds, set back to 0 (the sealing transaction pays them).

    The sessions' rows are locked: a heartbeat or share committing meanwhile is either in this block
    or (its UPDATE waiting for ours) in the next one, never in both or neither.
    """
    rows = await conn.fetch(
        """WITH taken AS (
               UPDATE mining_sessions s SET unpaid_shares = 0, unpaid_seconds = 0
                 FROM (SELECT id, unpaid_shares, unpaid_seconds FROM mining_sessions
                        WHERE unpaid_shares > 0 OR unpaid_seconds > 0 ORDER BY id FOR UPDATE) old
                WHERE s.id = old.id
            RETURNING s.user_id, old.unpaid_shares, old.unpaid_seconds)
           SELECT t.user_id, coalesce(u.wallet_address, 'user:' || u.id::text) AS account,
                  sum(t.unpaid_shares)::int AS shares, sum(t.unpaid_seconds)::int AS mobile_seconds
             FROM taken t JOIN users u ON u.id = t.user_id
            GROUP BY t.user_id, u.wallet_address, u.id
            ORDER BY t.user_id""")
    return [Work(**dict(row)) for row in rows]


@dataclasses.dataclass(frozen=True, slots=True)
class RewardRow:
    """One miner's reward for one block, as inserted."""

    user_id: uuid.UUID
    account: str
    device_type: str
    amount: Decimal
    shares: int
    mobile_seconds: int


async def insert_rewards(conn: asyncpg.Connection, height: int, pool_id: int | None,
                         rewards: Sequence[RewardRow]) -> None:
    """Record a block's rewards, one row per miner (mining_rewards_block_miner_key)."""
    await conn.executemany(
        """INSERT INTO mining_rewards (miner_wallet, block_id, pool_id, amount, device_type, reward, user_id, shares,
                                       mobile_seconds)
           VALUES ($1, $2, $3, $4, $5, $4, $6, $7, $8)""",
        [(r.account, height, pool_id, r.amount, r.device_type, r.user_id, r.shares, r.mobile_seconds)
         for r in rewards])


# --- a miner's own history --------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, slots=True)
class UserReward:
    """A reward as its miner sees it."""

    id: int
    height: int | None
    amount: Decimal
    device_type: str
    shares: int
    mobile_seconds: int
    pool_id: int | None
    created_at: dt.datetime


async def user_rewards(conn: asyncpg.Connection, user_id: uuid.UUID, before: int, limit: int) -> list[UserReward]:
    """A user's mining rewards newest first, below the key `before` (idx_mining_rewards_user_order)."""
    rows = await conn.fetch(
        """SELECT reward_id AS id, block_id AS height, amount, device_type, shares, mobile_seconds, pool_id,
                  created_at
             FROM mining_rewards WHERE user_id = $1 AND reward_id < $2 ORDER BY reward_id DESC LIMIT $3""",
        user_id, before, limit)
    return [UserReward(**dict(row)) for row in rows]


async def user_totals(conn: asyncpg.Connection, user_id: uuid.UUID) -> asyncpg.Record:
    """A user's reward count, amount, and the shares and Mobile seconds they were paid for."""
    return await conn.fetchrow(
        """SELECT count(*) AS rewards, coalesce(sum(amount), 0) AS amount, coalesce(sum(shares), 0)::bigint AS shares,
                  coalesce(sum(mobile_seconds), 0)::bigint AS mobile_seconds
             FROM mining_rewards WHERE user_id = $1""", user_id)
