"""REST: administrator-only routes."""

from __future__ import annotations

from aiohttp import web

from db.pool import POOL
from server.core.identity import Identity
from server.edge.rest import endpoint, ok_response
from server.services.admin import platform_stats

routes = web.RouteTableDef()


@routes.get("/api/v1/admin/stats")
@endpoint(auth="admin")
async def handle_stats(request: web.Request, identity: Identity) -> web.Response:
    """Platform counters: users, KYC by status, reward pool tokens."""
    return ok_response(await platform_stats(request.app[POOL]))
