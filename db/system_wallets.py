"""Queries on the server's own wallets (`system_wallets`): the escrow and the platform's fee account.

Each is a `users` row of kind 'system' (no credentials, never signs in) whose Ed25519 private key is
stored wrapped under MASTER_KEY. The caller owns the transaction.
"""

from __future__ import annotations

import dataclasses
import uuid

import asyncpg


@dataclasses.dataclass(frozen=True, slots=True)
class SystemWallet:
    """A wallet the server controls: its account, address and wrapped private key."""

    name: str
    user_id: uuid.UUID
    address: str
    public_key: str
    wrapped_private_key: str


async def lock_names(conn: asyncpg.Connection) -> None:
    """Serialise creating system wallets across processes starting at once (until the transaction ends)."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext('sourcenet-hub:system_wallets'))")


async def get(conn: asyncpg.Connection, name: str) -> SystemWallet | None:
    """The system wallet of this name."""
    row = await conn.fetchrow(
        """SELECT s.name, s.user_id, u.wallet_address AS address, u.wallet_public_key AS public_key,
                  s.wrapped_private_key
             FROM system_wallets s JOIN users u ON u.id = s.user_id WHERE s.name = $1""", name)
    return SystemWallet(**dict(row)) if row else None


async def create(conn: asyncpg.Connection, name: str, username: str, public_key: str, address: str,
                 wrapped_private_key: str) -> SystemWallet:
    """A new system account with its wallet (call under `lock_names`, after `get` found none)."""
    user_id = await conn.fetchval(
        """INSERT INTO users (username, account_kind, wallet_public_key, wallet_address)
           VALUES ($1, 'system', $2, $3) RETURNING id""", username, public_key, address)
    await conn.execute("INSERT INTO system_wallets (name, user_id, wrapped_private_key) VALUES ($1, $2, $3)",
                       name, user_id, wrapped_private_key)
    return SystemWallet(name, user_id, address, public_key, wrapped_private_key)
