"""Queries on users and admins. Each takes the connection first so the caller owns the transaction."""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from decimal import Decimal

import asyncpg


@dataclasses.dataclass(frozen=True, slots=True)
class User:
    """A user as the API shows it (never the password hash)."""

    id: uuid.UUID
    username: str
    email: str
    name: str | None
    sui_address: str | None
    kyc_status: str
    total_balance: Decimal
    created_at: dt.datetime
    is_admin: bool = False
    avatar_url: str | None = None
    bio: str | None = None
    suspended_at: dt.datetime | None = None

    @property
    def suspended(self) -> bool:
        """Whether an administrator has suspended the account."""
        return self.suspended_at is not None

    def to_public(self) -> dict:
        """The user's own view of their account."""
        return {"id": str(self.id), "username": self.username, "email": self.email,
                "name": self.name, "sui_address": self.sui_address, "kyc_status": self.kyc_status,
                "total_balance": self.total_balance, "is_admin": self.is_admin,
                "avatar_url": self.avatar_url, "bio": self.bio,
                "created_at": self.created_at.isoformat()}


@dataclasses.dataclass(frozen=True, slots=True)
class Credentials:
    """What login needs: the user id and the stored hash."""

    user_id: uuid.UUID
    password_hash: str | None
    suspended: bool = False


_USER_COLUMNS = """u.id, u.username, u.email, u.name, u.sui_address, u.kyc_status, u.total_balance,
    u.created_at, EXISTS (SELECT 1 FROM admin a WHERE a.user_id = u.id) AS is_admin,
    u.profile_image AS avatar_url, u.bio, u.suspended_at"""


def _user(row: asyncpg.Record | None) -> User | None:
    return None if row is None else User(**dict(row))


async def create_user(conn: asyncpg.Connection, *, username: str, email: str,
                      password_hash: str | None, name: str | None = None,
                      google_id: str | None = None, salt: str | None = None,
                      sui_address: str | None = None) -> User:
    """Insert a user; a duplicate username/email raises UniqueViolationError."""
    row = await conn.fetchrow(
        f"""WITH u AS (
                INSERT INTO users (username, email, password_hash, name, google_id, salt, sui_address)
                VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING *)
            SELECT {_USER_COLUMNS} FROM u""",
        username, email, password_hash, name, google_id, salt, sui_address)
    return _user(row)  # type: ignore[return-value]


async def get_user(conn: asyncpg.Connection, user_id: uuid.UUID) -> User | None:
    """A user by id."""
    return _user(await conn.fetchrow(f"SELECT {_USER_COLUMNS} FROM users u WHERE u.id = $1", user_id))


async def get_user_by_google_id(conn: asyncpg.Connection, google_id: str) -> User | None:
    """A user by their Google subject."""
    return _user(await conn.fetchrow(
        f"SELECT {_USER_COLUMNS} FROM users u WHERE u.google_id = $1", google_id))


async def get_credentials(conn: asyncpg.Connection, login: str) -> Credentials | None:
    """Id and password hash of the user whose username or email is `login`."""
    row = await conn.fetchrow(
        """SELECT id AS user_id, password_hash, suspended_at IS NOT NULL AS suspended
             FROM users WHERE username = $1 OR lower(email) = lower($1)""",
        login)
    return None if row is None else Credentials(**dict(row))


async def set_password_hash(conn: asyncpg.Connection, user_id: uuid.UUID, password_hash: str) -> None:
    """Store a rehashed password (argon2 parameters changed)."""
    await conn.execute("UPDATE users SET password_hash = $2 WHERE id = $1", user_id, password_hash)


async def link_google(conn: asyncpg.Connection, user_id: uuid.UUID, *, google_id: str, salt: str,
                      sui_address: str) -> User:
    """Attach a Google identity and its zkLogin salt/address to an existing user."""
    await conn.execute(
        "UPDATE users SET google_id = $2, salt = $3, sui_address = $4 WHERE id = $1",
        user_id, google_id, salt, sui_address)
    return await get_user(conn, user_id)  # type: ignore[return-value]


async def get_user_by_email(conn: asyncpg.Connection, email: str) -> User | None:
    """A user by email, case-insensitively."""
    return _user(await conn.fetchrow(
        f"SELECT {_USER_COLUMNS} FROM users u WHERE lower(u.email) = lower($1)", email))


async def username_taken(conn: asyncpg.Connection, username: str) -> bool:
    """Whether a username is in use."""
    return await conn.fetchval("SELECT EXISTS (SELECT 1 FROM users WHERE username = $1)", username)


async def upsert_admin(conn: asyncpg.Connection, user_id: uuid.UUID, *, username: str, email: str,
                       password_hash: str, role: str = "admin") -> int:
    """Make a user an admin (idempotent); returns admin_id."""
    return await conn.fetchval(
        """INSERT INTO admin (user_id, username, email, password_hash, role)
           VALUES ($1, $2, $3, $4, $5)
           ON CONFLICT (user_id) DO UPDATE SET role = EXCLUDED.role, password_hash = EXCLUDED.password_hash
           RETURNING admin_id""",
        user_id, username, email, password_hash, role)


async def admin_stats(conn: asyncpg.Connection) -> dict:
    """Platform counters for admins: people (not the server's own or deleted accounts), KYC by status,
    reward pools."""
    row = await conn.fetchrow(
        """WITH people AS (SELECT kyc_status FROM users WHERE account_kind = 'person')
           SELECT (SELECT count(*) FROM people) AS users,
                  (SELECT count(*) FROM people WHERE kyc_status = 'Pending') AS kyc_pending,
                  (SELECT count(*) FROM people WHERE kyc_status = 'Approved') AS kyc_approved,
                  (SELECT count(*) FROM people WHERE kyc_status = 'Rejected') AS kyc_rejected,
                  (SELECT coalesce(sum(total_tokens), 0) FROM reward_pools) AS pool_total_tokens,
                  (SELECT coalesce(sum(allocated_tokens), 0) FROM reward_pools) AS pool_allocated_tokens""")
    return dict(row)
