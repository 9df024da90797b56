"""Administrators: their accounts (the seed's `admin` table, linked to a user so one login serves
both) and the platform counters they see."""

from __future__ import annotations

from typing import Any

import asyncpg
from argon2 import PasswordHasher

from db import users as user_queries


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
