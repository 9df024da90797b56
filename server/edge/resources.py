"""Generic REST resources: list, create, read, update and delete routes over a user's rows of one
table (server/services/resources.py), as handlers/storage.py and handlers/network.py declare them."""

from __future__ import annotations

import dataclasses
from typing import Any

from aiohttp import web

from db.pool import POOL
from server.core.identity import Identity
from server.edge.rest import endpoint, int_query, ok_response, path_int
from server.edge.schemas import DEFAULT_PAGE, INTEGER_ID, MAX_INTEGER_ID, MAX_PAGE, PAGE_LIMIT, obj
from server.services import resources


@dataclasses.dataclass(frozen=True, slots=True)
class Resource:
    """A REST collection at `path` (`{path}/{id}` for one row)."""

    path: str
    rows: resources.Collection
    create: dict[str, Any]
    update: dict[str, Any] | None = None   # None: rows cannot be changed, only created and deleted
    writer: str = "user"                   # "admin" for tables administrators manage


def add_resource(table_routes: web.RouteTableDef, resource: Resource) -> None:
    """Register a resource's list, create, read, update (when it has one) and delete routes."""
    rows = resource.rows
    item_path = resource.path + "/{id}"

    def scope(request: web.Request) -> int | None:
        if rows.parent is None:
            return None
        param, noun = rows.parent
        return path_int(request, param, f"no such {noun}")

    def row_id(request: web.Request) -> int:
        return path_int(request, "id", f"no such {rows.noun}")

    parent_path = {rows.parent[0]: INTEGER_ID} if rows.parent is not None else {}
    item_path_params = {**parent_path, "id": INTEGER_ID}
    list_query = obj({"after": {"type": "integer", "minimum": 0, "maximum": MAX_INTEGER_ID}, "limit": PAGE_LIMIT})

    @table_routes.get(resource.path)
    @endpoint(auth="user", path=parent_path or None, query=list_query)
    async def handle_list(request: web.Request, identity: Identity) -> web.Response:
        """The caller's rows by id (`after`, `limit` up to 100, default 20)."""
        parent_id = scope(request)
        after = int_query(request, "after", minimum=0, maximum=MAX_INTEGER_ID) or 0
        limit = int_query(request, "limit", minimum=1, maximum=MAX_PAGE) or DEFAULT_PAGE
        found = await resources.list_rows(request.app[POOL], rows, identity.user_id, parent_id,
                                          after_id=after, limit=limit)
        return ok_response({rows.plural: [row.to_public() for row in found],
                            "next_after": found[-1].id if len(found) == limit else None})

    @table_routes.post(resource.path)
    @endpoint(body=resource.create, auth=resource.writer, path=parent_path or None)
    async def handle_create(request: web.Request, identity: Identity, body: dict) -> web.Response:
        """Create a row owned by the caller; `201` with the row."""
        row = await resources.create_row(request.app[POOL], rows, identity.user_id, scope(request), body)
        return ok_response(row.to_public(), status=201)

    @table_routes.get(item_path)
    @endpoint(auth="user", path=item_path_params)
    async def handle_get(request: web.Request, identity: Identity) -> web.Response:
        """One of the caller's rows."""
        parent_id, target = scope(request), row_id(request)
        row = await resources.get_row(request.app[POOL], rows, identity.user_id, parent_id, target)
        return ok_response(row.to_public())

    if resource.update is not None:
        @table_routes.patch(item_path)
        @endpoint(body=resource.update, auth=resource.writer, path=item_path_params)
        async def handle_update(request: web.Request, identity: Identity, body: dict) -> web.Response:
            """Change some fields of one of the caller's rows; answers the row."""
            parent_id, target = scope(request), row_id(request)
            row = await resources.update_row(request.app[POOL], rows, identity.user_id, parent_id, target, body)
            return ok_response(row.to_public())

    @table_routes.delete(item_path)
    @endpoint(auth=resource.writer, path=item_path_params)
    async def handle_delete(request: web.Request, identity: Identity) -> web.Response:
        """Delete one of the caller's rows."""
        parent_id, target = scope(request), row_id(request)
        await resources.delete_row(request.app[POOL], rows, identity.user_id, parent_id, target)
        return ok_response({"id": target, "deleted": True})
