"""REST: register, login, refresh, logout, me, Google sign-in (the rules are in server/services/auth.py)."""

from __future__ import annotations

from aiohttp import web

from db.pool import POOL
from server.core.identity import Identity
from server.edge.rest import client_ip, endpoint, ok_response
from server.edge.schemas import EMAIL, PASSWORD, USERNAME, obj, string
from server.services.auth import AUTH, get_account

routes = web.RouteTableDef()

REGISTER_SCHEMA = obj({"username": USERNAME, "email": EMAIL, "password": PASSWORD, "name": string(1, 255)},
                      required=("username", "email", "password"))
LOGIN_SCHEMA = obj({"login": string(3, 255), "password": string(1, 128)}, required=("login", "password"))
GOOGLE_SCHEMA = obj({"id_token": string(20, 8192)}, required=("id_token",))
REFRESH_SCHEMA = obj({"refresh_token": string(20, 200)}, required=("refresh_token",))


def _device(request: web.Request) -> dict[str, str | None]:
    """Where a sign-in comes from, as its session and registration record it."""
    return {"ip_address": client_ip(request), "device_info": request.headers.get("User-Agent")}


@routes.post("/api/v1/auth/register")
@endpoint(body=REGISTER_SCHEMA)
async def handle_register(request: web.Request, body: dict) -> web.Response:
    """Create an account with an argon2 password hash and sign it in."""
    signed_in = await request.app[AUTH].register(
        request.app[POOL], username=body["username"], email=body["email"], password=body["password"],
        name=body.get("name"), **_device(request))
    return ok_response(signed_in.to_public(), status=201)


@routes.post("/api/v1/auth/login")
@endpoint(body=LOGIN_SCHEMA)
async def handle_login(request: web.Request, body: dict) -> web.Response:
    """Check a username-or-email and password; return an access token bound to a new session."""
    signed_in = await request.app[AUTH].login(request.app[POOL], body["login"], body["password"],
                                              **_device(request))
    return ok_response(signed_in.to_public())


@routes.post("/api/v1/auth/refresh")
@endpoint(body=REFRESH_SCHEMA)
async def handle_refresh(request: web.Request, body: dict) -> web.Response:
    """Spend a refresh token for a new access token and the next refresh token; reuse ends the session."""
    signed_in = await request.app[AUTH].refresh(request.app[POOL], body["refresh_token"])
    return ok_response(signed_in.to_public())


@routes.post("/api/v1/auth/logout")
@endpoint(auth="user")
async def handle_logout(request: web.Request, identity: Identity) -> web.Response:
    """End the caller's session: its tokens stop working at once."""
    await request.app[AUTH].logout(request.app[POOL], identity.session_id)
    return ok_response({"logged_out": True})


@routes.get("/api/v1/me")
@endpoint(auth="user")
async def handle_me(request: web.Request, identity: Identity) -> web.Response:
    """The caller's account."""
    return ok_response((await get_account(request.app[POOL], identity.user_id)).to_public())


@routes.get("/api/v1/auth/google")
@endpoint()
async def handle_google_config(request: web.Request) -> web.Response:
    """Whether Google sign-in is configured (`configured`) and the OAuth client id to ask Google with."""
    return ok_response(request.app[AUTH].google_sign_in())


@routes.post("/api/v1/auth/google")
@endpoint(body=GOOGLE_SCHEMA)
async def handle_google(request: web.Request, body: dict) -> web.Response:
    """Sign in with a verified Google ID token; the zkLogin salt and Sui address are ours, not the client's."""
    signed_in = await request.app[AUTH].sign_in_with_google(request.app[POOL], body["id_token"], **_device(request))
    return ok_response(signed_in.to_public())
