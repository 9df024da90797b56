"""The demo data set's rows that no API creates as they are: its reward pools, game and proposal.

Each function takes the connection first so the caller owns the transaction.
"""

from __future__ import annotations

import uuid

import asyncpg


async def insert_reward_pools(conn: asyncpg.Connection) -> None:
    """The mining and gaming pools, full."""
    await conn.execute("""INSERT INTO reward_pools (pool_name, total_tokens, allocated_tokens)
                          VALUES ('mining', 1000000, 0), ('gaming', 250000, 0), ('staking', 100000, 0)""")


async def insert_game(conn: asyncpg.Connection, *, name: str, developer_wallet: str, owner_id: uuid.UUID) -> None:
    """A game with the table's default policy and no token (its owner asks for one)."""
    await conn.execute("""INSERT INTO games (name, developer_wallet, revenue_share, owner_id)
                          VALUES ($1, $2, 0.15, $3)""", name, developer_wallet, owner_id)


async def insert_open_proposal(conn: asyncpg.Connection, *, title: str, description: str,
                               creator_wallet: str) -> None:
    """An open proposal with no deadline."""
    await conn.execute("""INSERT INTO proposals (title, description, creator_wallet, status)
                          VALUES ($1, $2, $3, 'Open')""", title, description, creator_wallet)
