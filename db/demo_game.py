"""Queries of the demo game player (server/services/demo_game.py): its game, its players, its game token."""

from __future__ import annotations

import dataclasses
import uuid
from typing import Iterable

import asyncpg


@dataclasses.dataclass(frozen=True, slots=True)
class DemoGame:
    """The demo game and the digest of its current token (None: no token issued yet)."""

    game_id: int
    token_hash: str | None


@dataclasses.dataclass(frozen=True, slots=True)
class DemoPlayer:
    """A demo user who takes turns playing."""

    user_id: uuid.UUID
    username: str


async def find_game(conn: asyncpg.Connection, name: str, owner_username: str) -> DemoGame | None:
    """The first game of this name owned by this user."""
    row = await conn.fetchrow(
        """SELECT g.game_id, g.token_hash FROM games g JOIN users u ON u.id = g.owner_id
           WHERE g.name = $1 AND u.username = $2 ORDER BY g.game_id LIMIT 1""", name, owner_username)
    return None if row is None else DemoGame(**dict(row))


async def find_players(conn: asyncpg.Connection, usernames: Iterable[str]) -> list[DemoPlayer]:
    """The users with these usernames, in the order given (missing ones left out)."""
    rows = await conn.fetch(
        """SELECT u.id AS user_id, u.username
           FROM unnest($1::text[]) WITH ORDINALITY AS n(username, position) JOIN users u ON u.username = n.username
           ORDER BY n.position""", list(usernames))
    return [DemoPlayer(**dict(row)) for row in rows]


async def claim_token(conn: asyncpg.Connection, game_id: int, token_hash: str) -> bool:
    """Give a game this token digest only if it has no token yet; whether it did."""
    return await conn.fetchval(
        "UPDATE games SET token_hash = $2 WHERE game_id = $1 AND token_hash IS NULL RETURNING true",
        game_id, token_hash) or False
