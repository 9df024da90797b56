"""REST: administrator-only routes: platform counters, sessions, users, registrations, suspension,
the administrator role (the rules are in server/services/admin.py)."""

from __future__ import annotations

from aiohttp import web

from db.pool import POOL
from server.core.errors import InvalidPayload
from server.core.identity import Identity
from server.edge.rest import endpoint, int_query, ok_response, path_uuid
from server.edge.schemas import DEFAULT_PAGE, INTEGER_ID, MAX_PAGE, PAGE_LIMIT, UUID, obj, string, text
from server.services import admin
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


USERS_QUERY = obj({"q": string(1, 255), "cursor": string(1, 200), "limit": PAGE_LIMIT})
REGISTRATIONS_QUERY = obj({"before": INTEGER_ID, "limit": PAGE_LIMIT})
SUSPEND_SCHEMA = obj({"reason": text(500)}, required=("reason",))


@routes.get("/api/v1/admin/users")
@endpoint(auth="admin", query=USERS_QUERY)
async def handle_users(request: web.Request, identity: Identity) -> web.Response:
    """Users newest first, searched by username or email prefix (`q`), paged by `cursor`."""
    query = request.query
    prefix = (query.get("q") or "").strip() or None
    if prefix is not None and len(prefix) > 255:
        raise InvalidPayload("q is at most 255 characters", field="q")
    cursor = query.get("cursor") or None
    if cursor is not None and len(cursor) > 200:
        raise InvalidPayload("not a cursor from this list", field="cursor")
    limit = int_query(request, "limit", minimum=1, maximum=MAX_PAGE) or DEFAULT_PAGE
    return ok_response(await admin.list_users(request.app[POOL], prefix=prefix, cursor=cursor, limit=limit))


@routes.get("/api/v1/admin/registrations")
@endpoint(auth="admin", query=REGISTRATIONS_QUERY)
async def handle_registrations(request: web.Request, identity: Identity) -> web.Response:
    """The registrations record (address and user agent of each sign-up), newest first, paged by `before`."""
    before = int_query(request, "before", minimum=1)
    limit = int_query(request, "limit", minimum=1, maximum=MAX_PAGE) or DEFAULT_PAGE
    return ok_response(await admin.list_registrations(request.app[POOL], before=before, limit=limit))


@routes.post("/api/v1/admin/users/{user_id}/suspend")
@endpoint(auth="admin", path={"user_id": UUID}, body=SUSPEND_SCHEMA)
async def handle_suspend(request: web.Request, identity: Identity, body: dict) -> web.Response:
    """Suspend a user: sessions end at once on every node; sign-in, refresh and tokens are refused."""
    user_id = path_uuid(request, "user_id", "no such user")
    return ok_response(await admin.suspend_user(request.app[POOL], request.app[AUTH], identity, user_id,
                                                body["reason"]))


@routes.post("/api/v1/admin/users/{user_id}/unsuspend")
@endpoint(auth="admin", path={"user_id": UUID})
async def handle_unsuspend(request: web.Request, identity: Identity) -> web.Response:
    """Lift a user's suspension; they may sign in again."""
    user_id = path_uuid(request, "user_id", "no such user")
    return ok_response(await admin.unsuspend_user(request.app[POOL], identity, user_id))


@routes.post("/api/v1/admin/users/{user_id}/admin")
@endpoint(auth="admin", path={"user_id": UUID})
async def handle_grant_admin(request: web.Request, identity: Identity) -> web.Response:
    """Make a user an administrator."""
    user_id = path_uuid(request, "user_id", "no such user")
    return ok_response(await admin.grant_admin(request.app[POOL], identity, user_id))


@routes.delete("/api/v1/admin/users/{user_id}/admin")
@endpoint(auth="admin", path={"user_id": UUID})
async def handle_revoke_admin(request: web.Request, identity: Identity) -> web.Response:
    """Remove a user's administrator role; the last administrator's is refused (409)."""
    user_id = path_uuid(request, "user_id", "no such user")
    return ok_response(await admin.revoke_admin(request.app[POOL], identity, user_id))
