"""The API's own description: OpenAPI 3.1 (REST), AsyncAPI 3.0 (Socket.IO) and a page that reads them.

Both documents are built from the running app, its routes and its registered namespaces, so
they describe exactly what this server answers (server/edge/apidocs.py).
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from server.edge import apidocs
from server.edge.rest import endpoint, json_response
from server.realtime.engine import SIO

routes = web.RouteTableDef()

DOCS_PAGE = Path(__file__).resolve().parent.parent / "static" / "apidocs.html"


@routes.get("/api/v1/openapi.json")
@endpoint()
async def handle_openapi(request: web.Request) -> web.Response:
    """The OpenAPI 3.1 document of every REST route."""
    return json_response(apidocs.openapi_document(request.app.router.routes()))


@routes.get("/api/v1/asyncapi.json")
@endpoint()
async def handle_asyncapi(request: web.Request) -> web.Response:
    """The AsyncAPI 3.0 document of every Socket.IO namespace: commands, acks and events."""
    return json_response(apidocs.asyncapi_document(request.app[SIO].namespace_handlers.values()))


@routes.get("/api/v1/docs")
@endpoint()
async def handle_docs_page(request: web.Request) -> web.FileResponse:
    """A readable page of both documents (static/apidocs.html with static/apidocs.js)."""
    return web.FileResponse(DOCS_PAGE, headers={"Content-Type": "text/html; charset=utf-8"})
