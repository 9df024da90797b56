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


async def get_session_state(conn: asyncpg.Connection, session_id: int) -> SessionState | None:
    """The session's owner and whether it is neither logged out nor expired."""
    row = await conn.fetchrow(
        """SELECT session_id, user_id,
                  logout_time IS NULL AND (expires_at IS NULL OR expires_at > now()) AS active,
                  EXISTS (SELECT 1 FROM admin a WHERE a.user_id = s.user_id) AS is_admin
           FROM sessions s WHERE session_id = $1""",
        session_id)
    return None if row is None else SessionState(**dict(row))


async def end_session(conn: asyncpg.Connection, session_id: int) -> bool:
    """Log a session out; False when it was already ended."""
    status = await conn.execute(
        "UPDATE sessions SET logout_time = now() WHERE session_id = $1 AND logout_time IS NULL",
        session_id)
    return status == "UPDATE 1"


async def record_registration(conn: asyncpg.Connection, user_id: uuid.UUID, ip_address: str | None,
                              device_info: str | None) -> None:
    """The seed's user_registrations row for a new account."""
    await conn.execute(
        "INSERT INTO user_registrations (user_id, ip_address, device_info) VALUES ($1, $2, $3)",
        user_id, ip_address, device_info)
