"""A user's rows of one db/infra.py table (storage and network): list, create, read, update, delete.

Ownership rules are in docs/schema.md ("Storage and network"); db/infra.py puts them in every
statement, so another user's row looks exactly like a missing one. Writes lock the scope the rows
hang from first (db/infra.py `lock_scope`), which keeps the per-scope row cap under concurrent requests.
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

import asyncpg

from db import infra
from server.core.errors import Conflict, NotFound


@dataclasses.dataclass(frozen=True, slots=True)
class Collection:
    """One table's rows as a user holds them, and the words its answers and errors use."""

    table: infra.Table
    plural: str
    noun: str
    parent: tuple[str, str] | None = None  # (field, noun) of the parent row the rows hang from

    def missing(self) -> NotFound:
        """The error for a row that is not the caller's."""
        return NotFound(f"no such {self.noun}", field="id")

    def missing_parent(self) -> NotFound:
        """The error for a parent row that is not the caller's."""
        field, noun = self.parent  # type: ignore[misc]
        return NotFound(f"no such {noun}", field=field)


async def list_rows(pool: asyncpg.Pool, collection: Collection, user_id: uuid.UUID, parent_id: int | None, *,
                    after_id: int, limit: int) -> list[infra.Row]:
    """The caller's rows by id, after `after_id`, at most `limit`; NotFound when the parent is not theirs."""
    table = collection.table
    async with pool.acquire() as conn:
        if not await infra.parent_visible(conn, table, user_id, parent_id):
            raise collection.missing_parent()
        return await infra.list_rows(conn, table, user_id, parent_id, after_id=after_id, limit=limit)


async def create_row(pool: asyncpg.Pool, collection: Collection, user_id: uuid.UUID, parent_id: int | None,
                     values: dict[str, Any]) -> infra.Row:
    """A new row owned by the caller; Conflict once the scope holds the table's `max_rows`."""
    table = collection.table
    async with pool.acquire() as conn, conn.transaction():
        if not await infra.lock_scope(conn, table, user_id, parent_id):
            raise collection.missing_parent()
        if table.max_rows is not None and \
                await infra.count_rows(conn, table, user_id, parent_id) >= table.max_rows:
            raise Conflict(f"at most {table.max_rows} {collection.plural} here; delete some first")
        return await infra.insert_row(conn, table, user_id, parent_id, values)


async def get_row(pool: asyncpg.Pool, collection: Collection, user_id: uuid.UUID, parent_id: int | None,
                  row_id: int) -> infra.Row:
    """One of the caller's rows; NotFound otherwise."""
    async with pool.acquire() as conn:
        row = await infra.get_row(conn, collection.table, user_id, parent_id, row_id)
    if row is None:
        raise collection.missing()
    return row


async def update_row(pool: asyncpg.Pool, collection: Collection, user_id: uuid.UUID, parent_id: int | None,
                     row_id: int, values: dict[str, Any]) -> infra.Row:
    """Change some fields of one of the caller's rows; NotFound when it (or its parent) is not theirs."""
    table = collection.table
    async with pool.acquire() as conn, conn.transaction():
        row = None
        if await infra.lock_scope(conn, table, user_id, parent_id):
            row = await infra.update_row(conn, table, user_id, parent_id, row_id, values)
    if row is None:
        raise collection.missing()
    return row


async def delete_row(pool: asyncpg.Pool, collection: Collection, user_id: uuid.UUID, parent_id: int | None,
                     row_id: int) -> None:
    """Delete one of the caller's rows; NotFound when it (or its parent) is not theirs."""
    table = collection.table
    async with pool.acquire() as conn, conn.transaction():
        deleted = await infra.lock_scope(conn, table, user_id, parent_id) and \
            await infra.delete_row(conn, table, user_id, parent_id, row_id)
    if not deleted:
        raise collection.missing()


async def network_usage(pool: asyncpg.Pool, user_id: uuid.UUID) -> dict[str, Any]:
    """The caller's bandwidth totals and gateway share, as the bandwidth and gateway triggers keep them."""
    async with pool.acquire() as conn:
        status = await infra.utility_status(conn, user_id)
    return {"bandwidth": status.get("bandwidth"), "gateway": status.get("gateway")}
