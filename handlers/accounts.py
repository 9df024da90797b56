"""REST: an account holder's password, password reset, profile and sessions (the rules are in
server/services/accounts.py)."""

from __future__ import annotations

from aiohttp import web

from db.pool import POOL
from server.core.identity import Identity
from server.edge.rest import client_ip, endpoint, ok_response, path_int
from server.edge.schemas import EMAIL, INTEGER_ID, PASSWORD, USERNAME, obj, string, update_schema
from server.services import accounts as service
from server.services.auth import AUTH

routes = web.RouteTableDef()

CHANGE_PASSWORD_SCHEMA = obj({"current_password": string(1, 128), "new_password": PASSWORD},
                             required=("current_password", "new_password"))
RESET_REQUEST_SCHEMA = obj({"email": EMAIL}, required=("email",))
# A token is 43 base64url characters; the bounds only keep junk out.
RESET_CONFIRM_SCHEMA = obj({"token": string(20, 200, pattern="^[A-Za-z0-9_-]+$"), "new_password": PASSWORD},
                           required=("token", "new_password"))
_NAME = {"oneOf": [string(1, 255, pattern="^[^\\u0000-\\u001f\\u007f]+$"), {"type": "null"}]}
_AVATAR = {"oneOf": [string(9, 500, pattern="^https://[^\\s]+$"), {"type": "null"}]}
_BIO = {"oneOf": [string(0, 1000), {"type": "null"}]}
PROFILE_SCHEMA = update_schema({"username": USERNAME, "name": _NAME, "avatar_url": _AVATAR, "bio": _BIO})


@routes.post("/api/v1/me/password")
@endpoint(body=CHANGE_PASSWORD_SCHEMA, auth="user")
async def handle_change_password(request: web.Request, identity: Identity, body: dict) -> web.Response:
    """Change the password after re-authenticating; the caller's other sessions end."""
    result = await service.change_password(request.app[POOL], request.app[AUTH], identity, body["current_password"],
                                           body["new_password"], ip_address=client_ip(request))
    return ok_response(result)


@routes.post("/api/v1/auth/password-reset")
@endpoint(body=RESET_REQUEST_SCHEMA)
async def handle_password_reset(request: web.Request, body: dict) -> web.Response:
    """Mail a single-use reset link if the email has an account; always 202 (no account enumeration)."""
    await service.request_password_reset(request.app[POOL], request.app[service.ACCOUNTS], body["email"],
                                         ip_address=client_ip(request))
    return ok_response({"requested": True}, status=202)


@routes.post("/api/v1/auth/password-reset/confirm")
@endpoint(body=RESET_CONFIRM_SCHEMA)
async def handle_password_reset_confirm(request: web.Request, body: dict) -> web.Response:
    """Set a new password with a mailed reset token (once); every session of the account ends."""
    result = await service.confirm_password_reset(request.app[POOL], request.app[AUTH], request.app[service.ACCOUNTS],
                                                  body["token"], body["new_password"], ip_address=client_ip(request))
    return ok_response(result)


@routes.patch("/api/v1/me")
@endpoint(body=PROFILE_SCHEMA, auth="user")
async def handle_update_profile(request: web.Request, identity: Identity, body: dict) -> web.Response:
    """Edit the caller's profile: username (unique), name, https avatar URL, bio."""
    return ok_response((await service.update_profile(request.app[POOL], identity, body)).to_public())


@routes.get("/api/v1/me/sessions")
@endpoint(auth="user")
async def handle_sessions(request: web.Request, identity: Identity) -> web.Response:
    """The caller's signed-in devices: created, last seen, address, user agent, which one is this."""
    return ok_response({"sessions": await service.list_sessions(request.app[POOL], identity)})


@routes.delete("/api/v1/me/sessions/{session_id}")
@endpoint(auth="user", path={"session_id": INTEGER_ID})
async def handle_revoke_session(request: web.Request, identity: Identity) -> web.Response:
    """Sign one of the caller's devices out; its sockets hear `signed_out` (reason `revoked`)."""
    session_id = path_int(request, "session_id", "no such open session of yours")
    await service.revoke_session(request.app[POOL], request.app[AUTH], identity, session_id)
    return ok_response({"session_id": session_id, "revoked": True})
