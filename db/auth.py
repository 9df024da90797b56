"""Queries on login sessions (the seed's `sessions` table)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid

import asyncpg


@dataclasses.dataclass(frozen=True, slots=True)
class SessionState:
    """Whether a session still authorises its tokens."""

    session_id: int
    user_id: uuid.UUID
    active: bool
    is_admin: bool


async def create_session(conn: asyncpg.Connection, *, user_id: uuid.UUID, token_hash: str,
                         ip_address: str | None, device_info: str | None,
                         expires_at: dt.datetime) -> int:
    """Record a login; `token_hash` is a digest, never the token itself."""
    return await conn.fetchval(
        """INSERT INTO sessions (user_id, token, ip_address, device_info, expires_at)
           VALUES ($1, $2, $3, $4, $5) RETURNING session_id""",
        user_id, token_hash, ip_address, device_info, expires_at)


async def get_session_states(conn: asyncpg.Connection, session_ids: list[int]) -> dict[int, SessionState]:
    """The owner of each session and whether it is neither logged out nor expired (absent: no such session)."""
    rows = await conn.fetch(
        """SELECT session_id, user_id,
                  logout_time IS NULL AND (expires_at IS NULL OR expires_at > now())
                  -- A suspension ends the sessions too; this refuses any that a lost update left open.
                  AND NOT EXISTS (SELECT 1 FROM users u WHERE u.id = s.user_id AND u.suspended_at IS NOT NULL)
                  AS active,
                  EXISTS (SELECT 1 FROM admin a WHERE a.user_id = s.user_id) AS is_admin
           FROM sessions s WHERE session_id = ANY($1::bigint[])""",
        session_ids)
    return {row["session_id"]: SessionState(**dict(row)) for row in rows}


async def get_session_state(conn: asyncpg.Connection, session_id: int) -> SessionState | None:
    """One session's state (see get_session_states); None when there is no such session."""
    return (await get_session_states(conn, [session_id])).get(session_id)


async def end_session(conn: asyncpg.Connection, session_id: int, reason: str) -> bool:
    """End a session with a reason (`sessions_end_reason_check`); False when it had already ended."""
    status = await conn.execute(
        "UPDATE sessions SET logout_time = now(), end_reason = $2 WHERE session_id = $1 AND logout_time IS NULL",
        session_id, reason)
    return status == "UPDATE 1"


async def end_user_sessions(conn: asyncpg.Connection, user_id: uuid.UUID, reason: str,
                            keep: int | None = None) -> list[int]:
    """End every open session of a user but `keep`; the ids of those that were open."""
    rows = await conn.fetch(
        """UPDATE sessions SET logout_time = now(), end_reason = $2
            WHERE user_id = $1 AND logout_time IS NULL AND session_id IS DISTINCT FROM $3::integer
        RETURNING session_id""",
        user_id, reason, keep)
    return [row["session_id"] for row in rows]


async def extend_session(conn: asyncpg.Connection, session_id: int, expires_at: dt.datetime) -> None:
    """Move an open session's end (a refresh keeps the device signed in)."""
    await conn.execute("UPDATE sessions SET expires_at = $2 WHERE session_id = $1 AND logout_time IS NULL",
                       session_id, expires_at)


async def add_refresh_token(conn: asyncpg.Connection, session_id: int, token_hash: str,
                            expires_at: dt.datetime) -> None:
    """Record a session's next refresh token (its digest)."""
    await conn.execute(
        "INSERT INTO session_refresh_tokens (token_hash, session_id, expires_at) VALUES ($1, $2, $3)",
        token_hash, session_id, expires_at)


@dataclasses.dataclass(frozen=True, slots=True)
class RefreshSpend:
    """What presenting a refresh token did: spent it (`spent`), or found it reused, expired or unknown."""

    outcome: str  # "spent" | "reused" | "expired" | "unknown"
    session_id: int | None = None
    user_id: uuid.UUID | None = None


async def spend_refresh_token(conn: asyncpg.Connection, token_hash: str) -> RefreshSpend:
    """Spend a live refresh token of an open session, compare-and-set, so two presentations spend it once."""
    row = await conn.fetchrow(
        """UPDATE session_refresh_tokens r SET spent_at = now()
             FROM sessions s
            WHERE r.token_hash = $1 AND r.spent_at IS NULL AND r.expires_at > now()
              AND s.session_id = r.session_id AND s.logout_time IS NULL
        RETURNING r.session_id, s.user_id""",
        token_hash)
    if row is not None:
        return RefreshSpend("spent", row["session_id"], row["user_id"])
    row = await conn.fetchrow(
        """SELECT r.session_id, s.user_id, r.spent_at IS NOT NULL AS spent
             FROM session_refresh_tokens r JOIN sessions s USING (session_id) WHERE r.token_hash = $1""",
        token_hash)
    if row is None:
        return RefreshSpend("unknown")
    # Not spent yet not spendable: the token or its session is over.
    return RefreshSpend("reused" if row["spent"] else "expired", row["session_id"], row["user_id"])


async def record_registration(conn: asyncpg.Connection, user_id: uuid.UUID, ip_address: str | None,
                              device_info: str | None) -> None:
    """The seed's user_registrations row for a new account."""
    await conn.execute(
        "INSERT INTO user_registrations (user_id, ip_address, device_info) VALUES ($1, $2, $3)",
        user_id, ip_address, device_info)
