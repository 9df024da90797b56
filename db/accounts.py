"""Queries for account management: profiles, password reset tokens, the mail outbox, a user's
sessions, and the administrators' user list, registrations, suspensions and admin roster."""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from typing import Any

import asyncpg

# API field -> users column that PATCH /api/v1/me may set (the only names interpolated into SQL).
PROFILE_COLUMNS = {"username": "username", "name": "name", "avatar_url": "profile_image", "bio": "bio"}


# --- profile and password ------------------------------------------------------------------------

async def update_profile(conn: asyncpg.Connection, user_id: uuid.UUID, changes: dict[str, Any]) -> None:
    """Set profile fields (keys of PROFILE_COLUMNS); a taken username raises UniqueViolationError."""
    columns = [(PROFILE_COLUMNS[name], value) for name, value in changes.items()]
    assignments = ", ".join(f"{column} = ${index}" for index, (column, _) in enumerate(columns, start=2))
    await conn.execute(f"UPDATE users SET {assignments} WHERE id = $1", user_id, *(v for _, v in columns))
    if "username" in changes:
        # The seed's admin table keeps a copy of the username (UNIQUE): it follows the account's.
        await conn.execute("UPDATE admin SET username = $2 WHERE user_id = $1", user_id, changes["username"])


@dataclasses.dataclass(frozen=True, slots=True)
class PasswordAccount:
    """What a password change needs to know about the caller."""

    user_id: uuid.UUID
    password_hash: str | None


async def get_password_account(conn: asyncpg.Connection, user_id: uuid.UUID) -> PasswordAccount | None:
    """A person's id and password hash (None for Google-only accounts); None for unknown or deleted ones."""
    row = await conn.fetchrow(
        "SELECT id AS user_id, password_hash FROM users WHERE id = $1 AND account_kind = 'person'", user_id)
    return None if row is None else PasswordAccount(**dict(row))


async def set_password(conn: asyncpg.Connection, user_id: uuid.UUID, password_hash: str) -> None:
    """Store a new password hash and void the user's unused reset tokens (they were for the old one)."""
    await conn.execute("UPDATE users SET password_hash = $2 WHERE id = $1", user_id, password_hash)
    await conn.execute(
        "UPDATE password_reset_tokens SET used_at = now() WHERE user_id = $1 AND used_at IS NULL", user_id)


# --- password reset tokens -----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, slots=True)
class ResetRecipient:
    """Whom a reset mail goes to."""

    user_id: uuid.UUID
    email: str
    username: str


async def reset_recipient(conn: asyncpg.Connection, email: str) -> ResetRecipient | None:
    """The person with this email (case-insensitively) who may reset a password: not suspended."""
    row = await conn.fetchrow(
        """SELECT id AS user_id, email, username FROM users
            WHERE lower(email) = lower($1) AND account_kind = 'person' AND suspended_at IS NULL""", email)
    return None if row is None else ResetRecipient(**dict(row))


async def add_reset_token(conn: asyncpg.Connection, token_hash: str, user_id: uuid.UUID, expires_at: dt.datetime,
                          ip_address: str | None) -> None:
    """Record a reset token by its SHA-256 digest only."""
    await conn.execute(
        """INSERT INTO password_reset_tokens (token_hash, user_id, expires_at, ip_address)
           VALUES ($1, $2, $3, $4)""", token_hash, user_id, expires_at, ip_address)


@dataclasses.dataclass(frozen=True, slots=True)
class ResetSpend:
    """What presenting a reset token did: `spent` (with its user), or `used`, `expired`, `unknown`."""

    outcome: str
    user_id: uuid.UUID | None = None


async def reset_token_state(conn: asyncpg.Connection, token_hash: str) -> str:
    """`live`, `used`, `expired` or `unknown`: a look without spending (the caller spends it after)."""
    row = await conn.fetchrow(
        """SELECT CASE WHEN used_at IS NOT NULL THEN 'used' WHEN expires_at <= now() THEN 'expired' ELSE 'live' END
                  AS state FROM password_reset_tokens WHERE token_hash = $1""", token_hash)
    return "unknown" if row is None else row["state"]


async def spend_reset_token(conn: asyncpg.Connection, token_hash: str) -> ResetSpend:
    """Spend a live reset token, compare-and-set: of two presentations at once, one wins."""
    user_id = await conn.fetchval(
        """UPDATE password_reset_tokens SET used_at = now()
            WHERE token_hash = $1 AND used_at IS NULL AND expires_at > now() RETURNING user_id""", token_hash)
    if user_id is not None:
        return ResetSpend("spent", user_id)
    row = await conn.fetchrow("SELECT used_at IS NOT NULL AS used FROM password_reset_tokens WHERE token_hash = $1",
                              token_hash)
    if row is None:
        return ResetSpend("unknown")
    return ResetSpend("used" if row["used"] else "expired")


# --- mail outbox ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, slots=True)
class QueuedMail:
    """A mail claimed for one sending attempt."""

    mail_id: int
    recipient: str
    subject: str
    body_sealed: str | None
    attempts: int
    expires_at: dt.datetime | None


async def enqueue_mail(conn: asyncpg.Connection, recipient: str, subject: str, body_sealed: str,
                       expires_at: dt.datetime | None) -> int:
    """Queue a mail (its body sealed by the caller); its id."""
    return await conn.fetchval(
        """INSERT INTO mail_outbox (recipient, subject, body_sealed, expires_at) VALUES ($1, $2, $3, $4)
           RETURNING mail_id""", recipient, subject, body_sealed, expires_at)


async def claim_due_mail(conn: asyncpg.Connection, limit: int, lease: dt.timedelta) -> list[QueuedMail]:
    """Take due mail for one attempt each: counted and hidden for `lease`, so nodes never send one twice
    at once, and a node that dies mid-send leaves it to be retried."""
    rows = await conn.fetch(
        """UPDATE mail_outbox m SET attempts = attempts + 1, next_attempt_at = now() + $2::interval
            WHERE mail_id IN (SELECT mail_id FROM mail_outbox
                               WHERE sent_at IS NULL AND failed_at IS NULL AND next_attempt_at <= now()
                               ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED)
        RETURNING mail_id, recipient, subject, body_sealed, attempts, expires_at""", limit, lease)
    return [QueuedMail(**dict(row)) for row in rows]


async def mark_mail_sent(conn: asyncpg.Connection, mail_id: int) -> None:
    """Sent: the body (and any token in it) is scrubbed."""
    await conn.execute("UPDATE mail_outbox SET sent_at = now(), body_sealed = NULL, last_error = NULL "
                       "WHERE mail_id = $1", mail_id)


async def retry_mail_later(conn: asyncpg.Connection, mail_id: int, error: str, delay: dt.timedelta) -> None:
    """A failed attempt: try again after `delay`."""
    await conn.execute("UPDATE mail_outbox SET last_error = $2, next_attempt_at = now() + $3::interval "
                       "WHERE mail_id = $1", mail_id, error[:500], delay)


async def abandon_mail(conn: asyncpg.Connection, mail_id: int, error: str) -> None:
    """Given up (retries spent, or no longer worth sending): scrubbed like a sent one."""
    await conn.execute("UPDATE mail_outbox SET failed_at = now(), body_sealed = NULL, last_error = $2 "
                       "WHERE mail_id = $1", mail_id, error[:500])


# --- the caller's sessions -----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, slots=True)
class SessionRow:
    """One signed-in device."""

    session_id: int
    login_time: dt.datetime
    last_seen_at: dt.datetime
    expires_at: dt.datetime | None
    ip_address: str | None
    device_info: str | None

    def to_public(self, current_session_id: int) -> dict[str, Any]:
        """The session as its owner sees it."""
        return {"id": self.session_id, "created_at": self.login_time.isoformat(),
                "last_seen_at": self.last_seen_at.isoformat(),
                "expires_at": self.expires_at.isoformat() if self.expires_at else None,
                "ip_address": self.ip_address, "user_agent": self.device_info,
                "current": self.session_id == current_session_id}


async def open_sessions(conn: asyncpg.Connection, user_id: uuid.UUID, limit: int) -> list[SessionRow]:
    """The user's open sessions, most recently seen first; last seen is the last sign-in or refresh."""
    rows = await conn.fetch(
        """SELECT s.session_id, s.login_time, s.expires_at, s.ip_address, s.device_info,
                  greatest(s.login_time, (SELECT max(r.issued_at) FROM session_refresh_tokens r
                                           WHERE r.session_id = s.session_id)) AS last_seen_at
             FROM sessions s
            WHERE s.user_id = $1 AND s.logout_time IS NULL AND (s.expires_at IS NULL OR s.expires_at > now())
            ORDER BY last_seen_at DESC, s.session_id DESC LIMIT $2""", user_id, limit)
    return [SessionRow(**dict(row)) for row in rows]


async def end_own_session(conn: asyncpg.Connection, user_id: uuid.UUID, session_id: int, reason: str) -> bool:
    """End one open session if it is the user's; False when it is not theirs or already over."""
    status = await conn.execute(
        """UPDATE sessions SET logout_time = now(), end_reason = $3
            WHERE session_id = $2 AND user_id = $1 AND logout_time IS NULL""", user_id, session_id, reason)
    return status == "UPDATE 1"


# --- administrators ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, slots=True)
class AdminUserRow:
    """A user as administrators see them."""

    id: uuid.UUID
    username: str
    email: str | None
    name: str | None
    account_kind: str
    kyc_status: str
    is_admin: bool
    suspended_at: dt.datetime | None
    suspension_reason: str | None
    total_sales: int
    total_purchases: int
    created_at: dt.datetime

    def to_public(self) -> dict[str, Any]:
        """The JSON form."""
        return {"id": str(self.id), "username": self.username, "email": self.email, "name": self.name,
                "account_kind": self.account_kind, "kyc_status": self.kyc_status, "is_admin": self.is_admin,
                "suspended": self.suspended_at is not None,
                "suspended_at": self.suspended_at.isoformat() if self.suspended_at else None,
                "suspension_reason": self.suspension_reason, "total_sales": self.total_sales,
                "total_purchases": self.total_purchases, "created_at": self.created_at.isoformat()}


_ADMIN_USER_COLUMNS = """u.id, u.username, u.email, u.name, u.account_kind, u.kyc_status,
    EXISTS (SELECT 1 FROM admin a WHERE a.user_id = u.id) AS is_admin, u.suspended_at, u.suspension_reason,
    u.total_sales, u.total_purchases, u.created_at"""


def _like_prefix(text: str) -> str:
    """A LIKE pattern matching strings that start with `text` (its own wildcards escaped)."""
    return text.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


async def search_users(conn: asyncpg.Connection, *, prefix: str | None, after: tuple[dt.datetime, uuid.UUID] | None,
                       limit: int) -> list[AdminUserRow]:
    """Users newest first, optionally those whose username or email starts with `prefix`; keyset paged."""
    after_at, after_id = after if after else (None, None)
    rows = await conn.fetch(
        f"""SELECT {_ADMIN_USER_COLUMNS} FROM users u
             WHERE ($1::text IS NULL OR lower(u.username) LIKE $1 OR lower(u.email) LIKE $1)
               AND ($2::timestamptz IS NULL OR (u.created_at, u.id) < ($2, $3::uuid))
             ORDER BY u.created_at DESC, u.id DESC LIMIT $4""",
        _like_prefix(prefix) if prefix else None, after_at, after_id, limit)
    return [AdminUserRow(**dict(row)) for row in rows]


async def get_admin_user(conn: asyncpg.Connection, user_id: uuid.UUID, *, lock: bool = False) -> AdminUserRow | None:
    """One user as administrators see them (locked for the transaction when asked)."""
    row = await conn.fetchrow(
        f"SELECT {_ADMIN_USER_COLUMNS} FROM users u WHERE u.id = $1{' FOR UPDATE' if lock else ''}", user_id)
    return None if row is None else AdminUserRow(**dict(row))


async def registrations(conn: asyncpg.Connection, *, before: int | None, limit: int) -> list[dict[str, Any]]:
    """The `user_registrations` rows newest first, with each account's username; paged by id."""
    rows = await conn.fetch(
        """SELECT r.registration_id, r.user_id, u.username, u.email, r.ip_address, r.device_info, r."timestamp"
             FROM user_registrations r LEFT JOIN users u ON u.id = r.user_id
            WHERE $1::integer IS NULL OR r.registration_id < $1
            ORDER BY r.registration_id DESC LIMIT $2""", before, limit)
    return [{"id": row["registration_id"], "user_id": str(row["user_id"]) if row["user_id"] else None,
             "username": row["username"], "email": row["email"], "ip_address": row["ip_address"],
             "user_agent": row["device_info"], "registered_at": row["timestamp"].isoformat()} for row in rows]


async def lock_admin_roster(conn: asyncpg.Connection) -> None:
    """Serialise changes to who is an active administrator (two admins removing each other at once
    must not both succeed): a transaction-scoped lock every roster change takes first."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext('sourcenet-hub admin roster'))")


async def other_active_admins(conn: asyncpg.Connection, user_id: uuid.UUID) -> int:
    """How many administrators other than this user are not suspended."""
    return await conn.fetchval(
        """SELECT count(*) FROM admin a JOIN users u ON u.id = a.user_id
            WHERE a.user_id <> $1 AND u.suspended_at IS NULL AND u.account_kind = 'person'""", user_id)


async def suspend(conn: asyncpg.Connection, user_id: uuid.UUID, reason: str) -> None:
    """Mark the user suspended with a reason."""
    await conn.execute("UPDATE users SET suspended_at = now(), suspension_reason = $2 WHERE id = $1",
                       user_id, reason)


async def unsuspend(conn: asyncpg.Connection, user_id: uuid.UUID) -> None:
    """Lift a suspension."""
    await conn.execute("UPDATE users SET suspended_at = NULL, suspension_reason = NULL WHERE id = $1", user_id)


async def grant_admin(conn: asyncpg.Connection, user_id: uuid.UUID) -> None:
    """Give a person an admin row (its seed columns copied from the account; '!' matches no password)."""
    await conn.execute(
        """INSERT INTO admin (user_id, username, email, password_hash)
           SELECT id, username, email, coalesce(password_hash, '!') FROM users WHERE id = $1
           ON CONFLICT (user_id) DO NOTHING""", user_id)


async def revoke_admin(conn: asyncpg.Connection, user_id: uuid.UUID) -> bool:
    """Remove a user's admin row; False when they had none."""
    return await conn.execute("DELETE FROM admin WHERE user_id = $1", user_id) == "DELETE 1"


async def record_admin_action(conn: asyncpg.Connection, admin_user_id: uuid.UUID, action: str,
                              target_user_id: uuid.UUID, reason: str | None = None) -> None:
    """The audit row of an administrator's action."""
    await conn.execute(
        "INSERT INTO admin_actions (admin_user_id, action, target_user_id, reason) VALUES ($1, $2, $3, $4)",
        admin_user_id, action, target_user_id, reason)
