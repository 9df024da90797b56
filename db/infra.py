"""Queries of the storage (cloud, mirror, tracker, seeder, peer) and network (channel, dns,
bandwidth, gateway) tables: one generic set of statements driven by a fixed description of each table.

Table and column names come only from the `Table` constants below, never from input; every value
is a parameter. Ownership is part of each statement's WHERE clause, so a row of another user looks
exactly like a missing one. Each function takes the connection first; the caller owns the transaction.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from typing import Any

import asyncpg


@dataclasses.dataclass(frozen=True, slots=True)
class Table:
    """One table served over REST: the columns shown and writable, and whose rows they are."""

    name: str
    columns: tuple[str, ...]
    writable: tuple[str, ...]
    owner: str | None = None                    # column holding the owning user's id
    parent: tuple[str, Table] | None = None     # (column, table): rows also belong to the parent's owner
    insert_values: tuple[tuple[str, Any], ...] = ()  # constants set on insert
    max_rows: int | None = None                 # per owner (and parent), checked by the caller


@dataclasses.dataclass(frozen=True, slots=True)
class Row:
    """One row as read from a Table's columns."""

    values: dict[str, Any]

    @property
    def id(self) -> int:
        """The row's id."""
        return self.values["id"]

    def to_public(self) -> dict[str, Any]:
        """The API's view: ids and timestamps as strings."""
        return {name: _public(value) for name, value in self.values.items()}


def _public(value: Any) -> Any:
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, dt.datetime):
        return value.isoformat()
    return value


_STATUS = ("status",)
CLOUD = Table("cloud", ("id", "owner_id", "file_path", "size", "status", "created_at", "updated_at"),
              writable=("file_path", "size"), owner="owner_id",
              # Nothing holds a new file yet, so the swarm rule (update_peer_status) says inactive.
              insert_values=(("status", "inactive"),), max_rows=1000)
MIRROR = Table("mirror", ("id", "cloud_id", "mirror_path", "created_at"), writable=("mirror_path",),
               parent=("cloud_id", CLOUD), max_rows=50)
TRACKER = Table("tracker", ("id", "cloud_id", "tracker_url", "status", "created_at"),
                writable=("tracker_url", *_STATUS), parent=("cloud_id", CLOUD), max_rows=50)
SEEDER = Table("seeder", ("id", "user_id", "file_id", "status", "created_at"), writable=_STATUS,
               owner="user_id", parent=("file_id", CLOUD), max_rows=50)
PEER = Table("peer", ("id", "user_id", "file_id", "status", "created_at"), writable=_STATUS,
             owner="user_id", parent=("file_id", CLOUD), max_rows=50)
CHANNEL = Table("channel", ("id", "user_id", "access_point", "created_at"), writable=("access_point",),
                owner="user_id", max_rows=100)
DNS = Table("dns", ("id", "domain_name", "ip_address", "created_at"), writable=("domain_name", "ip_address"))
BANDWIDTH = Table("bandwidth", ("id", "user_id", "bandwidth_limit", "usage", "created_at"),
                  writable=("bandwidth_limit", "usage"), owner="user_id", max_rows=10000)
GATEWAY = Table("gateway", ("id", "user_id", "share_point", "created_at"), writable=("share_point",),
                owner="user_id", max_rows=100)


def _columns(table: Table) -> str:
    return ", ".join(f"t.{name}" for name in table.columns)


def _scope(table: Table, user_id: uuid.UUID, parent_id: int | None, args: list[Any]) -> str:
    """The WHERE condition "the row (alias t) is the caller's", appending its parameters to args."""
    conditions = []
    if table.owner is not None or table.parent is not None:
        args.append(user_id)
        user = f"${len(args)}"
        if table.owner is not None:
            conditions.append(f"t.{table.owner} = {user}")
        if table.parent is not None:
            column, parent = table.parent
            args.append(parent_id)
            conditions.append(f"t.{column} = ${len(args)}")
            conditions.append(f"EXISTS (SELECT 1 FROM {parent.name} p WHERE p.id = t.{column} "
                              f"AND p.{parent.owner} = {user})")
    return " AND ".join(conditions) or "TRUE"


async def lock_scope(conn: asyncpg.Connection, table: Table, user_id: uuid.UUID, parent_id: int | None) -> bool:
    """Lock what rows hang from (the parent row, else the owner); False when the parent is not the caller's."""
    # Inserts into one scope queue here, so the row cap holds under concurrent requests. Changes
    # lock here first too: the swarm trigger then updates an already locked file, so a peer change
    # and a file delete always lock in the same order and cannot deadlock.
    if table.parent is not None:
        column, parent = table.parent
        return await conn.fetchval(
            f"SELECT true FROM {parent.name} WHERE id = $1 AND {parent.owner} = $2 FOR NO KEY UPDATE",
            parent_id, user_id) is not None
    if table.owner is not None:
        await conn.execute("SELECT 1 FROM users WHERE id = $1 FOR NO KEY UPDATE", user_id)
    return True


async def parent_visible(conn: asyncpg.Connection, table: Table, user_id: uuid.UUID, parent_id: int | None) -> bool:
    """Whether the parent row exists and is the caller's (True for tables without a parent)."""
    if table.parent is None:
        return True
    _, parent = table.parent
    return await conn.fetchval(f"SELECT true FROM {parent.name} WHERE id = $1 AND {parent.owner} = $2",
                               parent_id, user_id) is not None


async def count_rows(conn: asyncpg.Connection, table: Table, user_id: uuid.UUID, parent_id: int | None) -> int:
    """How many rows of the table are the caller's (under this parent)."""
    args: list[Any] = []
    where = _scope(table, user_id, parent_id, args)
    return await conn.fetchval(f"SELECT count(*) FROM {table.name} t WHERE {where}", *args)


async def list_rows(conn: asyncpg.Connection, table: Table, user_id: uuid.UUID, parent_id: int | None, *,
                    after_id: int, limit: int) -> list[Row]:
    """The caller's rows by id, after `after_id`, at most `limit`."""
    args: list[Any] = []
    where = _scope(table, user_id, parent_id, args)
    args += [after_id, limit]
    rows = await conn.fetch(
        f"""SELECT {_columns(table)} FROM {table.name} t WHERE {where} AND t.id > ${len(args) - 1}
             ORDER BY t.id LIMIT ${len(args)}""", *args)
    return [Row(dict(row)) for row in rows]


async def get_row(conn: asyncpg.Connection, table: Table, user_id: uuid.UUID, parent_id: int | None,
                  row_id: int) -> Row | None:
    """One of the caller's rows by id; None when it does not exist or is someone else's."""
    args: list[Any] = []
    where = _scope(table, user_id, parent_id, args)
    args.append(row_id)
    row = await conn.fetchrow(f"SELECT {_columns(table)} FROM {table.name} t WHERE {where} AND t.id = ${len(args)}",
                              *args)
    return Row(dict(row)) if row else None


async def insert_row(conn: asyncpg.Connection, table: Table, user_id: uuid.UUID, parent_id: int | None,
                     values: dict[str, Any]) -> Row:
    """Insert a row owned by the caller (under the parent) with the given writable values."""
    names = [name for name in table.writable if name in values]
    args: list[Any] = [values[name] for name in names]
    for name, value in table.insert_values:
        names.append(name)
        args.append(value)
    if table.owner is not None:
        names.append(table.owner)
        args.append(user_id)
    if table.parent is not None:
        names.append(table.parent[0])
        args.append(parent_id)
    placeholders = ", ".join(f"${i}" for i in range(1, len(args) + 1))
    row = await conn.fetchrow(
        f"INSERT INTO {table.name} AS t ({', '.join(names)}) VALUES ({placeholders}) RETURNING {_columns(table)}",
        *args)
    return Row(dict(row))


async def update_row(conn: asyncpg.Connection, table: Table, user_id: uuid.UUID, parent_id: int | None,
                     row_id: int, values: dict[str, Any]) -> Row | None:
    """Change writable columns of one of the caller's rows; None when it is not found."""
    names = [name for name in table.writable if name in values]
    if not names:
        return await get_row(conn, table, user_id, parent_id, row_id)
    args: list[Any] = [values[name] for name in names]
    assignments = ", ".join(f"{name} = ${i}" for i, name in enumerate(names, start=1))
    where = _scope(table, user_id, parent_id, args)
    args.append(row_id)
    row = await conn.fetchrow(
        f"""UPDATE {table.name} t SET {assignments} WHERE {where} AND t.id = ${len(args)}
            RETURNING {_columns(table)}""", *args)
    return Row(dict(row)) if row else None


async def delete_row(conn: asyncpg.Connection, table: Table, user_id: uuid.UUID, parent_id: int | None,
                     row_id: int) -> bool:
    """Delete one of the caller's rows; False when it is not found."""
    args: list[Any] = []
    where = _scope(table, user_id, parent_id, args)
    args.append(row_id)
    deleted = await conn.fetchval(f"DELETE FROM {table.name} t WHERE {where} AND t.id = ${len(args)} RETURNING t.id",
                                  *args)
    return deleted is not None


async def utility_status(conn: asyncpg.Connection, user_id: uuid.UUID) -> dict[str, Any]:
    """The user's `utility_status`, kept by the bandwidth and gateway triggers ({} when the user is gone)."""
    status = await conn.fetchval("SELECT utility_status FROM users WHERE id = $1", user_id)
    return status or {}
