"""Ask your data over REST: one read-only SQL SELECT over a dataset the caller bought or sells.

The rules (who may, the DuckDB sandbox, the time, row, size, concurrency and per-user limits) are
in server/services/dataset_query.py; the assistant reaches the same function through its
`query_dataset` tool.
"""

from __future__ import annotations

from aiohttp import web

from server.core.identity import Identity
from server.edge.rest import endpoint, ok_response, path_uuid
from server.edge.schemas import UUID, obj, string
from server.services import dataset_query as service

routes = web.RouteTableDef()

QUERY_SCHEMA = obj({"sql": string(1, service.MAX_SQL_CHARS)}, required=("sql",))
DATAPOD_PATH = {"datapod_id": UUID}


@routes.post("/api/v1/datapods/{datapod_id}/query")
@endpoint(body=QUERY_SCHEMA, auth="user", path=DATAPOD_PATH)
async def handle_query_dataset(request: web.Request, identity: Identity, body: dict) -> web.Response:
    """Run one SELECT over the table `data` of a DataPod the caller bought or sells: {columns, rows, truncated}."""
    datapod_id = path_uuid(request, "datapod_id", "no such DataPod")
    result = await service.run_query(request.app, identity.user_id, datapod_id, body["sql"])
    return ok_response(result.to_public())
