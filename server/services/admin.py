"""Administrators: their accounts (the seed's `admin` table, linked to a user so one login serves
both), the platform counters they see, and the users they manage: list and search, registrations,
suspension, and granting or revoking the administrator role (never the last administrator's)."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import structlog
from argon2 import PasswordHasher

from db import accounts as account_queries
from db import auth as auth_queries
from db import users as user_queries
from server.core.cursors import decode_time_cursor, encode_time_cursor
from server.core.errors import Conflict, NotFound
from server.core.identity import Identity
from server.services.auth import SUSPENDED, AuthService

log = structlog.get_logger(__name__)


async def create_admin(conn: asyncpg.Connection, *, username: str, email: str, password: str) -> str:
    """Create the user if needed and give it an admin row; returns a sentence for the CLI."""
    password_hash = PasswordHasher().hash(password)
    async with conn.transaction():
        user = await user_queries.get_user_by_email(conn, email)
        created = user is None
        if user is None:
            user = await user_queries.create_user(conn, username=username, email=email.lower(),
                                                  password_hash=password_hash)
        else:
            await user_queries.set_password_hash(conn, user.id, password_hash)
        admin_id = await user_queries.upsert_admin(conn, user.id, username=user.username,
                                                   email=user.email, password_hash=password_hash)
    verb = "created" if created else "promoted"
    return f"{verb} administrator {user.username} (admin_id {admin_id}, user {user.id})"


async def platform_stats(pool: asyncpg.Pool) -> dict[str, Any]:
    """Platform counters: users, KYC by status, reward pool tokens."""
    async with pool.acquire() as conn:
        return await user_queries.admin_stats(conn)


# --- user management (issue 19) -----------------------------------------------------------------
# Every action is recorded in `admin_actions` and logged with the acting administrator's user id.

SUSPEND, UNSUSPEND, GRANT_ADMIN, REVOKE_ADMIN = "suspend", "unsuspend", "grant_admin", "revoke_admin"


async def list_users(pool: asyncpg.Pool, *, prefix: str | None, cursor: str | None, limit: int) -> dict[str, Any]:
    """Users newest first, optionally by username or email prefix; `next_cursor` while more remain."""
    after = decode_time_cursor(cursor) if cursor else None
    async with pool.acquire() as conn:
        rows = await account_queries.search_users(conn, prefix=prefix, after=after, limit=limit + 1)
    page = rows[:limit]
    more = len(rows) > limit
    return {"users": [row.to_public() for row in page],
            "next_cursor": encode_time_cursor(page[-1].created_at, page[-1].id) if more else None}


async def list_registrations(pool: asyncpg.Pool, *, before: int | None, limit: int) -> dict[str, Any]:
    """The `user_registrations` rows newest first; `next_before` while more remain."""
    async with pool.acquire() as conn:
        rows = await account_queries.registrations(conn, before=before, limit=limit + 1)
    page = rows[:limit]
    return {"registrations": page, "next_before": page[-1]["id"] if len(rows) > limit else None}


async def _target(conn: asyncpg.Connection, user_id: uuid.UUID) -> account_queries.AdminUserRow:
    """The person an action is about, locked; NotFound for unknown, deleted or system accounts."""
    target = await account_queries.get_admin_user(conn, user_id, lock=True)
    if target is None or target.account_kind != "person":
        raise NotFound("no such user", field="user_id")
    return target


async def _audit(conn: asyncpg.Connection, admin: Identity, action: str, target: uuid.UUID,
                 reason: str | None = None) -> None:
    await account_queries.record_admin_action(conn, admin.user_id, action, target, reason)
    log.info("admin_action", action=action, admin_user_id=str(admin.user_id), target_user_id=str(target),
             reason=reason)


async def suspend_user(pool: asyncpg.Pool, auth: AuthService, admin: Identity, user_id: uuid.UUID,
                       reason: str) -> dict[str, Any]:
    """Suspend a user: every session ends at once on every node, and no sign-in, refresh or token works."""
    async with pool.acquire() as conn:
        async with conn.transaction():
            await account_queries.lock_admin_roster(conn)
            target = await _target(conn, user_id)
            if target.is_admin and not await account_queries.other_active_admins(conn, user_id):
                raise Conflict("the last administrator cannot be suspended; make someone else an administrator "
                               "first", field="user_id")
            if user_id == admin.user_id:
                raise Conflict("you cannot suspend yourself", field="user_id")
            ended: list[int] = []
            if target.suspended_at is None:
                await account_queries.suspend(conn, user_id, reason)
                ended = await auth_queries.end_user_sessions(conn, user_id, SUSPENDED)
                await _audit(conn, admin, SUSPEND, user_id, reason)
        await auth.announce_ended(ended, SUSPENDED)
        user = await account_queries.get_admin_user(conn, user_id)
    return {"user": user.to_public(), "sessions_ended": len(ended)}  # type: ignore[union-attr]


async def unsuspend_user(pool: asyncpg.Pool, admin: Identity, user_id: uuid.UUID) -> dict[str, Any]:
    """Lift a suspension: the user may sign in again (their old sessions stay ended)."""
    async with pool.acquire() as conn:
        async with conn.transaction():
            target = await _target(conn, user_id)
            if target.suspended_at is not None:
                await account_queries.unsuspend(conn, user_id)
                await _audit(conn, admin, UNSUSPEND, user_id)
        user = await account_queries.get_admin_user(conn, user_id)
    return {"user": user.to_public()}  # type: ignore[union-attr]


async def grant_admin(pool: asyncpg.Pool, admin: Identity, user_id: uuid.UUID) -> dict[str, Any]:
    """Make a person an administrator (idempotent); a suspended account cannot be one."""
    async with pool.acquire() as conn:
        async with conn.transaction():
            await account_queries.lock_admin_roster(conn)
            target = await _target(conn, user_id)
            if target.suspended_at is not None:
                raise Conflict("a suspended account cannot be made an administrator; unsuspend it first",
                               field="user_id")
            if not target.is_admin:
                await account_queries.grant_admin(conn, user_id)
                await _audit(conn, admin, GRANT_ADMIN, user_id)
        user = await account_queries.get_admin_user(conn, user_id)
    return {"user": user.to_public()}  # type: ignore[union-attr]


async def revoke_admin(pool: asyncpg.Pool, admin: Identity, user_id: uuid.UUID) -> dict[str, Any]:
    """Remove a user's administrator role; never the last active administrator's."""
    async with pool.acquire() as conn:
        async with conn.transaction():
            await account_queries.lock_admin_roster(conn)
            target = await _target(conn, user_id)
            if target.is_admin:
                if not await account_queries.other_active_admins(conn, user_id):
                    raise Conflict("the last administrator cannot be removed", field="user_id")
                await account_queries.revoke_admin(conn, user_id)
                await _audit(conn, admin, REVOKE_ADMIN, user_id)
        user = await account_queries.get_admin_user(conn, user_id)
    return {"user": user.to_public()}  # type: ignore[union-attr]
