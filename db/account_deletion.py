"""Queries of account deletion: what blocks it, and what it removes or anonymises (the caller owns
the transaction; docs/schema.md "Account deletion" lists every table and why)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from decimal import Decimal

import asyncpg

# Purchase and escrow states that still move money (issue 18: settle first or refuse).
OPEN_PURCHASE_STATUSES = ("pending_payment", "processing")
OPEN_ESCROW_STATUSES = ("holding", "disputed")


@dataclasses.dataclass(frozen=True, slots=True)
class Account:
    """What deletion needs to know about a users row."""

    id: uuid.UUID
    account_kind: str
    password_hash: str | None
    google_id: str | None
    wallet_address: str | None
    total_balance: Decimal
    is_admin: bool


@dataclasses.dataclass(frozen=True, slots=True)
class Blocker:
    """Money in flight that keeps an account from being deleted: where, and how many."""

    field: str
    count: int


@dataclasses.dataclass(frozen=True, slots=True)
class Pod:
    """A DataPod taken off the market."""

    id: uuid.UUID
    category: str | None


@dataclasses.dataclass(frozen=True, slots=True)
class RejectedTransfer:
    """A pending transfer to the account, rejected because nobody will own the balance."""

    hash: str
    sender: str


@dataclasses.dataclass(frozen=True, slots=True)
class Removed:
    """How many rows of each kind of personal data were deleted."""

    counts: dict[str, int]


async def get_account(conn: asyncpg.Connection, user_id: uuid.UUID, *, lock: bool = False) -> Account | None:
    """A users row as deletion sees it (FOR UPDATE when `lock`: balance moves wait for the deletion)."""
    row = await conn.fetchrow(
        """SELECT u.id, u.account_kind, u.password_hash, u.google_id, u.wallet_address, u.total_balance,
                  EXISTS (SELECT 1 FROM admin a WHERE a.user_id = u.id) AS is_admin
             FROM users u WHERE u.id = $1""" + (" FOR UPDATE OF u" if lock else ""), user_id)
    return Account(**dict(row)) if row else None


async def session_login_time(conn: asyncpg.Connection, session_id: int) -> dt.datetime | None:
    """When a session signed in (a refresh does not move it)."""
    return await conn.fetchval("SELECT login_time FROM sessions WHERE session_id = $1", session_id)


async def blockers(conn: asyncpg.Connection, user_id: uuid.UUID, wallet_address: str | None) -> list[Blocker]:
    """Money of the account still in flight: open purchases, escrows not settled (as buyer or seller),
    active stakes and pending outgoing transfers; an empty list when nothing blocks."""
    row = await conn.fetchrow(
        """SELECT
             (SELECT count(*) FROM purchases p LEFT JOIN escrow_transactions e ON e.purchase_id = p.id
               WHERE p.buyer_id = $1
                 AND (p.status = ANY($3::text[]) OR e.status = ANY($4::text[])
                      OR (e.status IS NOT NULL AND e.settled_at IS NULL))) AS purchases,
             (SELECT count(*) FROM escrow_transactions e
               WHERE e.seller_id = $1 AND (e.status = ANY($4::text[]) OR e.settled_at IS NULL))
           + (SELECT count(*) FROM purchases p JOIN datapods d ON d.id = p.datapod_id
               WHERE d.seller_id = $1 AND p.status = ANY($3::text[])) AS sales,
             (SELECT count(*) FROM defi WHERE user_id = $1 AND product = 'staking' AND status = 'active') AS stakes,
             (SELECT count(*) FROM transactions WHERE sender = $2 AND status = 'pending') AS transfers""",
        user_id, wallet_address, list(OPEN_PURCHASE_STATUSES), list(OPEN_ESCROW_STATUSES))
    return [Blocker(field, row[field]) for field in ("purchases", "sales", "stakes", "transfers") if row[field]]


async def reject_incoming_transfers(conn: asyncpg.Connection, address: str, reason: str) -> list[RejectedTransfer]:
    """Reject the pending transfers to an address (their senders' reserved amounts are free again)."""
    rows = await conn.fetch(
        """UPDATE transactions SET status = 'rejected', error = $2
            WHERE receiver = $1 AND status = 'pending' RETURNING transaction_hash, sender""", address, reason)
    return [RejectedTransfer(row["transaction_hash"], row["sender"]) for row in rows]


async def stop_mining(conn: asyncpg.Connection, user_id: uuid.UUID) -> int:
    """End the user's open mining session and forfeit the work not yet paid (sealing pays unpaid work
    of every session, ended or not, and must not pay a deleted account); how many sessions changed."""
    status = await conn.execute(
        """UPDATE mining_sessions
              SET unpaid_shares = 0, unpaid_seconds = 0,
                  end_reason = coalesce(end_reason, 'stopped'), ended_at = coalesce(ended_at, now())
            WHERE user_id = $1 AND (ended_at IS NULL OR unpaid_shares > 0 OR unpaid_seconds > 0)""", user_id)
    return int(status.split()[-1])


async def unpublish_datapods(conn: asyncpg.Connection, seller_id: uuid.UUID) -> list[Pod]:
    """Take the seller's published DataPods off the market (their buyers keep what they bought)."""
    rows = await conn.fetch(
        "UPDATE datapods SET published = false WHERE seller_id = $1 AND published RETURNING id, category", seller_id)
    return [Pod(row["id"], row["category"]) for row in rows]


async def cancel_nft_listings(conn: asyncpg.Connection, wallet_address: str) -> list[int]:
    """Cancel the open NFT listings of a wallet (a sale would pay an account nobody owns); their ids."""
    rows = await conn.fetch(
        """UPDATE marketplace SET status = 'Cancelled' WHERE seller_wallet = $1 AND status = 'Available'
        RETURNING listing_id""", wallet_address)
    return sorted(row["listing_id"] for row in rows)


async def end_game_sessions(conn: asyncpg.Connection, user_id: uuid.UUID) -> int:
    """End the user's running game sessions; how many."""
    status = await conn.execute(
        """UPDATE game_sessions SET status = 'Ended', session_end = greatest(now(), session_start)
            WHERE user_id = $1 AND status = 'Active'""", user_id)
    return int(status.split()[-1])


async def disown_games(conn: asyncpg.Connection, user_id: uuid.UUID) -> int:
    """Games the user registered lose their owner (no revenue share is paid to a deleted account)."""
    status = await conn.execute("UPDATE games SET owner_id = NULL WHERE owner_id = $1", user_id)
    return int(status.split()[-1])


async def delete_sessions(conn: asyncpg.Connection, user_id: uuid.UUID) -> list[int]:
    """Delete every session (and, by cascade, refresh token) of the user; the ids of the open ones."""
    rows = await conn.fetch(
        "DELETE FROM sessions WHERE user_id = $1 RETURNING session_id, logout_time IS NULL AS open", user_id)
    return [row["session_id"] for row in rows if row["open"]]


# Personal data deleted outright, table -> the column naming the user. Child rows go by cascade:
# ai_messages with their conversation, kyc_approvals with their submission, mirror/tracker/... rows
# with their cloud file.
PERSONAL_TABLES = (
    ("ai_conversations", "user_id"),
    ("ai_usage", "user_id"),
    ("kyc_submissions", "user_id"),
    ("user_registrations", "user_id"),
    ("password_reset_tokens", "user_id"),
    ("download_logs", "buyer_id"),
    ("cloud", "owner_id"),
    ("peer", "user_id"),
    ("seeder", "user_id"),
    ("channel", "user_id"),
    ("bandwidth", "user_id"),
    ("gateway", "user_id"),
)


async def delete_personal_rows(conn: asyncpg.Connection, user_id: uuid.UUID) -> Removed:
    """Delete the user's rows of every table in PERSONAL_TABLES; the count per table."""
    counts = {}
    for table, column in PERSONAL_TABLES:
        status = await conn.execute(f"DELETE FROM {table} WHERE {column} = $1", user_id)
        counts[table] = int(status.split()[-1])
    return Removed(counts)


async def anonymise(conn: asyncpg.Connection, user_id: uuid.UUID, username: str) -> dt.datetime:
    """Turn the users row into a deleted account: no credentials, contact, keys or profile; the id,
    wallet address, balance history and seller statistics stay. Returns `deleted_at`."""
    return await conn.fetchval(
        """UPDATE users SET account_kind = 'deleted', deleted_at = now(), username = $2,
                  email = NULL, password_hash = NULL, google_id = NULL, name = NULL, profile_image = NULL, bio = NULL,
                  sui_address = NULL, salt = NULL, x25519_public_key = NULL, wallet_public_key = NULL,
                  mining_status = NULL, utility_status = '{}'::jsonb, additional_data = NULL
            WHERE id = $1 RETURNING deleted_at""", user_id, username)


async def username_taken(conn: asyncpg.Connection, username: str) -> bool:
    """Whether a username is in use."""
    return await conn.fetchval("SELECT EXISTS (SELECT 1 FROM users WHERE username = $1)", username)
