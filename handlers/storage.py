"""Storage REST routes: the caller's cloud files, with their mirrors, trackers, seeders and peers.

Also the generic resource routes (list, create, read, update, delete over one db/infra.py table)
that handlers/network.py uses. Ownership rules are in docs/schema.md ("Storage and network").
"""

from __future__ import annotations

import dataclasses
from typing import Any

from aiohttp import web

from db import infra
from db.pool import POOL
from server.core.errors import Conflict, NotFound
from server.core.identity import Identity
from server.edge.rest import MAX_INTEGER_ID, endpoint, int_query, ok_response, path_int
from server.edge.schemas import obj, string

routes = web.RouteTableDef()

MAX_PAGE = 100
# PostgreSQL text cannot hold NUL, and control characters have no place in paths or names.
_PRINTABLE = "^[^\\u0000-\\u001f\\u007f]+$"
STATUS = {"type": "string", "enum": ["active", "inactive"]}


def text(max_length: int = 255) -> dict[str, Any]:
    """A bounded single-line string schema."""
    return string(1, max_length, pattern=_PRINTABLE)


def update_schema(properties: dict[str, Any]) -> dict[str, Any]:
    """A PATCH body: any of these fields, at least one."""
    return obj(properties, minProperties=1)


@dataclasses.dataclass(frozen=True, slots=True)
class Resource:
    """A REST collection over one table at `path` (`{path}/{id}` for one row)."""

    path: str
    plural: str
    noun: str
    table: infra.Table
    create: dict[str, Any]
    update: dict[str, Any] | None = None   # None: rows cannot be changed, only created and deleted
    writer: str = "user"                   # "admin" for tables administrators manage
    parent: tuple[str, str] | None = None  # (path parameter, noun) of the parent row


def add_resource(table_routes: web.RouteTableDef, resource: Resource) -> None:
    """Register a resource's list, create, read, update (when it has one) and delete routes."""
    table = resource.table
    item_path = resource.path + "/{id}"

    def scope(request: web.Request) -> int | None:
        if resource.parent is None:
            return None
        param, noun = resource.parent
        return path_int(request, param, f"no such {noun}")

    def row_id(request: web.Request) -> int:
        return path_int(request, "id", f"no such {resource.noun}")

    def missing_parent() -> NotFound:
        param, noun = resource.parent  # type: ignore[misc]
        return NotFound(f"no such {noun}", field=param)

    @table_routes.get(resource.path)
    @endpoint(auth="user")
    async def handle_list(request: web.Request, identity: Identity) -> web.Response:
        """The caller's rows by id (`after`, `limit` up to 100, default 20)."""
        parent_id = scope(request)
        after = int_query(request, "after", minimum=0, maximum=MAX_INTEGER_ID) or 0
        limit = int_query(request, "limit", minimum=1, maximum=MAX_PAGE) or 20
        async with request.app[POOL].acquire() as conn:
            if not await infra.parent_visible(conn, table, identity.user_id, parent_id):
                raise missing_parent()
            rows = await infra.list_rows(conn, table, identity.user_id, parent_id, after_id=after, limit=limit)
        return ok_response({resource.plural: [row.to_public() for row in rows],
                            "next_after": rows[-1].id if len(rows) == limit else None})

    @table_routes.post(resource.path)
    @endpoint(body=resource.create, auth=resource.writer)
    async def handle_create(request: web.Request, identity: Identity, body: dict) -> web.Response:
        """Create a row owned by the caller; `201` with the row."""
        parent_id = scope(request)
        async with request.app[POOL].acquire() as conn, conn.transaction():
            if not await infra.lock_scope(conn, table, identity.user_id, parent_id):
                raise missing_parent()
            if table.max_rows is not None and \
                    await infra.count_rows(conn, table, identity.user_id, parent_id) >= table.max_rows:
                raise Conflict(f"at most {table.max_rows} {resource.plural} here; delete some first")
            row = await infra.insert_row(conn, table, identity.user_id, parent_id, body)
        return ok_response(row.to_public(), status=201)

    @table_routes.get(item_path)
    @endpoint(auth="user")
    async def handle_get(request: web.Request, identity: Identity) -> web.Response:
        """One of the caller's rows."""
        parent_id, target = scope(request), row_id(request)
        async with request.app[POOL].acquire() as conn:
            row = await infra.get_row(conn, table, identity.user_id, parent_id, target)
        if row is None:
            raise NotFound(f"no such {resource.noun}", field="id")
        return ok_response(row.to_public())

    if resource.update is not None:
        @table_routes.patch(item_path)
        @endpoint(body=resource.update, auth=resource.writer)
        async def handle_update(request: web.Request, identity: Identity, body: dict) -> web.Response:
            """Change some fields of one of the caller's rows; answers the row."""
            parent_id, target = scope(request), row_id(request)
            async with request.app[POOL].acquire() as conn, conn.transaction():
                row = None
                if await infra.lock_scope(conn, table, identity.user_id, parent_id):
                    row = await infra.update_row(conn, table, identity.user_id, parent_id, target, body)
            if row is None:
                raise NotFound(f"no such {resource.noun}", field="id")
            return ok_response(row.to_public())

    @table_routes.delete(item_path)
    @endpoint(auth=resource.writer)
    async def handle_delete(request: web.Request, identity: Identity) -> web.Response:
        """Delete one of the caller's rows."""
        parent_id, target = scope(request), row_id(request)
        async with request.app[POOL].acquire() as conn, conn.transaction():
            deleted = await infra.lock_scope(conn, table, identity.user_id, parent_id) and \
                await infra.delete_row(conn, table, identity.user_id, parent_id, target)
        if not deleted:
            raise NotFound(f"no such {resource.noun}", field="id")
        return ok_response({"id": target, "deleted": True})


FILES = "/api/v1/storage/files"
IN_FILE = ("file_id", "file")
FILE_FIELDS = {"file_path": text(), "size": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1}}
MIRROR_FIELDS = {"mirror_path": text()}
TRACKER_URL = string(1, 255, pattern="^(https?|udp|wss?)://[^\\s\\u0000-\\u001f\\u007f]+$")
TRACKER_FIELDS = {"tracker_url": TRACKER_URL, "status": STATUS}
SWARM_FIELDS = {"status": STATUS}

RESOURCES = (
    Resource(FILES, "files", "file", infra.CLOUD, create=obj(FILE_FIELDS, required=("file_path", "size")),
             update=update_schema(FILE_FIELDS)),
    Resource(FILES + "/{file_id}/mirrors", "mirrors", "mirror", infra.MIRROR,
             create=obj(MIRROR_FIELDS, required=("mirror_path",)), update=update_schema(MIRROR_FIELDS),
             parent=IN_FILE),
    Resource(FILES + "/{file_id}/trackers", "trackers", "tracker", infra.TRACKER,
             create=obj(TRACKER_FIELDS, required=("tracker_url",)), update=update_schema(TRACKER_FIELDS),
             parent=IN_FILE),
    Resource(FILES + "/{file_id}/seeders", "seeders", "seeder", infra.SEEDER, create=obj(SWARM_FIELDS),
             update=update_schema(SWARM_FIELDS), parent=IN_FILE),
    Resource(FILES + "/{file_id}/peers", "peers", "peer", infra.PEER, create=obj(SWARM_FIELDS),
             update=update_schema(SWARM_FIELDS), parent=IN_FILE),
)
for _resource in RESOURCES:
    add_resource(routes, _resource)
