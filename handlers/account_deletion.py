"""REST: a user deletes their own account (the rules are in server/services/account_deletion.py)."""

from __future__ import annotations

from aiohttp import web

from db.pool import POOL
from server.core.identity import Identity
from server.edge.rest import client_ip, endpoint, ok_response
from server.edge.schemas import obj, string
from server.services import account_deletion as service
from server.services.auth import AUTH

routes = web.RouteTableDef()

# The password is required for password accounts; Google-only accounts send `{}` from a fresh sign-in.
DELETE_SCHEMA = obj({"password": string(1, 128)})


@routes.delete("/api/v1/me")
@endpoint(body=DELETE_SCHEMA, auth="user")
async def handle_delete_account(request: web.Request, identity: Identity, body: dict) -> web.Response:
    """Delete the caller's account after re-authentication: balance and mined blocks burned, data removed."""
    result = await service.delete_account(request.app[POOL], request.app[AUTH], identity, body.get("password"),
                                          ip_address=client_ip(request))
    return ok_response(result)
