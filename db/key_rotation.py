"""Queries of master key rotation: every column that holds a key wrapped under MASTER_KEY.

A wrapped value starts with the base64 of its version and key id (crypto.wrapped_prefix), so the
rows a key does not wrap yet are found by comparing that prefix, in SQL, without any crypto. Each
re-wrapped row is written by one compare-and-set UPDATE (its own transaction).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

import asyncpg


class Holder(enum.Enum):
    """Where wrapped keys live; the value names them in reports and logs."""

    DATASETS = "datasets"
    KYC = "kyc"
    PURCHASES = "purchases"
    SYSTEM_WALLETS = "wallets"


@dataclasses.dataclass(frozen=True, slots=True)
class WrappedRow:
    """One stored wrapped key (the column's text as stored, prefix and all)."""

    id: Any
    wrapped: str


@dataclasses.dataclass(frozen=True, slots=True)
class _Column:
    table: str
    id: str
    id_type: str
    value: str


# Constants, never user input: the only text formatted into SQL below. Which values of a column are
# master-wrapped is the caller's `marker`: the text they start with ("" for all; NULL never matches).
_COLUMNS = {
    Holder.DATASETS: _Column("datapods", "id", "uuid", "wrapped_key"),
    Holder.KYC: _Column("kyc_submissions", "kyc_id", "int", "document_key"),
    Holder.PURCHASES: _Column("purchases", "id", "uuid", "decryption_key"),
    Holder.SYSTEM_WALLETS: _Column("system_wallets", "name", "varchar", "wrapped_private_key"),
}


async def count_wrapped_by(conn: asyncpg.Connection, holder: Holder, prefix: str) -> int:
    """How many rows of `holder` hold a value starting with `prefix` (marker and the key's wrapped prefix)."""
    column = _COLUMNS[holder]
    return await conn.fetchval(f"SELECT count(*) FROM {column.table} WHERE starts_with({column.value}, $1)", prefix)


async def not_wrapped_by(conn: asyncpg.Connection, holder: Holder, marker: str, prefix: str, after: Any,
                         limit: int) -> list[WrappedRow]:
    """The next master-wrapped rows (by id, after `after`) whose value does not start with `prefix`."""
    column = _COLUMNS[holder]
    rows = await conn.fetch(
        f"""SELECT {column.id} AS id, {column.value} AS wrapped FROM {column.table}
             WHERE starts_with({column.value}, $1) AND NOT starts_with({column.value}, $2)
               AND ($3::{column.id_type} IS NULL OR {column.id} > $3)
             ORDER BY {column.id} LIMIT $4""", marker, prefix, after, limit)
    return [WrappedRow(**dict(row)) for row in rows]


async def get_wrapped(conn: asyncpg.Connection, holder: Holder, marker: str, row_id: Any) -> WrappedRow | None:
    """One row's master-wrapped value as stored now (None when it is gone or no longer master-wrapped)."""
    column = _COLUMNS[holder]
    row = await conn.fetchrow(
        f"""SELECT {column.id} AS id, {column.value} AS wrapped FROM {column.table}
             WHERE {column.id} = $1 AND starts_with({column.value}, $2)""", row_id, marker)
    return WrappedRow(**dict(row)) if row else None


async def replace_wrapped(conn: asyncpg.Connection, holder: Holder, row_id: Any, old: str, new: str) -> bool:
    """Compare-and-set: store `new` only if the row still holds `old`; False when it changed meanwhile."""
    column = _COLUMNS[holder]
    status = await conn.execute(
        f"UPDATE {column.table} SET {column.value} = $3 WHERE {column.id} = $1 AND {column.value} = $2",
        row_id, old, new)
    return status == "UPDATE 1"


async def replace_game_token(conn: asyncpg.Connection, game_id: int, old_hash: str, new_hash: str) -> bool:
    """Compare-and-set a game's token digest (the demo game's token is derived from MASTER_KEY)."""
    status = await conn.execute("UPDATE games SET token_hash = $3 WHERE game_id = $1 AND token_hash = $2",
                                game_id, old_hash, new_hash)
    return status == "UPDATE 1"
