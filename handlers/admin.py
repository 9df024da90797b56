"""REST: administrator-only routes."""

from __future__ import annotations

from aiohttp import web

from db.pool import POOL
from server.core.identity import Identity
from server.edge.rest import endpoint, ok_response, path_uuid
from server.edge.schemas import UUID
from server.services.admin import platform_stats
from server.services.auth import AUTH

routes = web.RouteTableDef()


@routes.get("/api/v1/admin/stats")
@endpoint(auth="admin")
async def handle_stats(request: web.Request, identity: Identity) -> web.Response:
    """Platform counters: users, KYC by status, reward pool tokens."""
    return ok_response(await platform_stats(request.app[POOL]))


@routes.post("/api/v1/admin/users/{user_id}/sessions/revoke")
@endpoint(auth="admin", path={"user_id": UUID})
async def handle_revoke_sessions(request: web.Request, identity: Identity) -> web.Response:
    """Sign a user out of every device at once: tokens refused, sockets closed with reason `revoked`."""
    user_id = path_uuid(request, "user_id", "no such user")
    revoked = await request.app[AUTH].revoke_user_sessions(request.app[POOL], user_id)
    return ok_response({"user_id": str(user_id), "sessions_revoked": revoked})
