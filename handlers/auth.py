"""REST: register, login, logout, me, Google sign-in."""

from __future__ import annotations

import re

import asyncpg
from aiohttp import web

from db import auth as auth_queries
from db import users as user_queries
from db.pool import POOL
from server.adapters.zklogin import StandInAddressDeriver, new_salt
from server.core.errors import Conflict, Unauthorized
from server.core.identity import Identity
from server.edge.rest import client_ip, endpoint, ok_response
from server.edge.schemas import obj, string
from server.services.auth import AUTH

routes = web.RouteTableDef()
address_deriver = StandInAddressDeriver()

USERNAME = string(3, 50, pattern="^[A-Za-z0-9_.-]+$")
EMAIL = string(3, 255, format="email", pattern="^[^@\\s]+@[^@\\s]+\\.[^@\\s]+$")
PASSWORD = string(8, 128)


async def _login_response(request: web.Request, conn: asyncpg.Connection, user: user_queries.User,
                          status: int = 200) -> web.Response:
    token, expires_at = await request.app[AUTH].start_session(
        conn, user.id, ip_address=client_ip(request), device_info=request.headers.get("User-Agent"))
    return ok_response({"token": token, "token_type": "Bearer", "expires_at": expires_at.isoformat(),
                        "user": user.to_public()}, status=status)


@routes.post("/api/v1/auth/register")
@endpoint(body=obj({"username": USERNAME, "email": EMAIL, "password": PASSWORD, "name": string(1, 255)},
                   required=("username", "email", "password")))
async def handle_register(request: web.Request, body: dict) -> web.Response:
    """Create an account with an argon2 password hash and sign it in."""
    password_hash = await request.app[AUTH].hash_password(body["password"])
    async with request.app[POOL].acquire() as conn, conn.transaction():
        try:
            user = await user_queries.create_user(
                conn, username=body["username"], email=body["email"].lower(),
                password_hash=password_hash, name=body.get("name"))
        except asyncpg.UniqueViolationError as exc:
            field = "username" if "username" in (exc.constraint_name or "") else "email"
            raise Conflict(f"that {field} is already registered", field=field) from None
        await auth_queries.record_registration(conn, user.id, client_ip(request),
                                               (request.headers.get("User-Agent") or "")[:500] or None)
        return await _login_response(request, conn, user, status=201)


@routes.post("/api/v1/auth/login")
@endpoint(body=obj({"login": string(3, 255), "password": string(1, 128)}, required=("login", "password")))
async def handle_login(request: web.Request, body: dict) -> web.Response:
    """Check a username-or-email and password; return an access token bound to a new session."""
    auth = request.app[AUTH]
    async with request.app[POOL].acquire() as conn:
        credentials = await user_queries.get_credentials(conn, body["login"])
        password_hash = credentials.password_hash if credentials else None
        if not await auth.verify_password(password_hash, body["password"]) or credentials is None:
            raise Unauthorized("wrong username or password")
        if auth.needs_rehash(password_hash):  # type: ignore[arg-type]
            await user_queries.set_password_hash(conn, credentials.user_id,
                                                 await auth.hash_password(body["password"]))
        user = await user_queries.get_user(conn, credentials.user_id)
        return await _login_response(request, conn, user)  # type: ignore[arg-type]


@routes.post("/api/v1/auth/logout")
@endpoint(auth="user")
async def handle_logout(request: web.Request, identity: Identity) -> web.Response:
    """End the caller's session: its tokens stop working at once."""
    async with request.app[POOL].acquire() as conn:
        await request.app[AUTH].end_session(conn, identity.session_id)
    return ok_response({"logged_out": True})


@routes.get("/api/v1/me")
@endpoint(auth="user")
async def handle_me(request: web.Request, identity: Identity) -> web.Response:
    """The caller's account."""
    async with request.app[POOL].acquire() as conn:
        user = await user_queries.get_user(conn, identity.user_id)
    if user is None:
        raise Unauthorized("the account no longer exists")
    return ok_response(user.to_public())


async def _free_username(conn: asyncpg.Connection, email: str) -> str:
    base = re.sub(r"[^A-Za-z0-9_.-]", "", email.split("@")[0])[:40] or "user"
    base = base if len(base) >= 3 else f"{base}_user"
    candidate, suffix = base, 1
    while await user_queries.username_taken(conn, candidate):
        suffix += 1
        candidate = f"{base}{suffix}"
    return candidate


@routes.post("/api/v1/auth/google")
@endpoint(body=obj({"id_token": string(20, 8192)}, required=("id_token",)))
async def handle_google(request: web.Request, body: dict) -> web.Response:
    """Sign in with a verified Google ID token; the zkLogin salt and Sui address are ours, not the client's."""
    claims = await request.app[AUTH].verify_google_token(body["id_token"])
    sub, email = claims["sub"], (claims.get("email") or f"{claims['sub']}@google.invalid").lower()
    aud = claims["aud"] if isinstance(claims["aud"], str) else claims["aud"][0]
    async with request.app[POOL].acquire() as conn, conn.transaction():
        user = await user_queries.get_user_by_google_id(conn, sub)
        if user is None:
            salt = new_salt()
            address = address_deriver.address(iss=claims["iss"], sub=sub, aud=aud, salt=salt)
            existing = await user_queries.get_user_by_email(conn, email)
            if existing is not None:
                # A verified Google email proves ownership of the address the account was made with.
                user = await user_queries.link_google(conn, existing.id, google_id=sub, salt=salt,
                                                      sui_address=address)
            else:
                user = await user_queries.create_user(
                    conn, username=await _free_username(conn, email), email=email, password_hash=None,
                    name=claims.get("name"), google_id=sub, salt=salt, sui_address=address)
                await auth_queries.record_registration(conn, user.id, client_ip(request),
                                                       (request.headers.get("User-Agent") or "")[:500] or None)
        return await _login_response(request, conn, user)
