"""Accounts and authentication: registration, argon2 passwords, JWT access tokens bound to a
session row, Google sign-in (with the zkLogin salt and Sui address chosen here, never by the client)."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
import re
import secrets
import time
import uuid
from typing import Any

import aiohttp
import asyncpg
import jwt
import structlog
from aiohttp import web
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from db import auth as auth_queries
from db import users as user_queries
from server.adapters.zklogin import StandInAddressDeriver, new_salt
from server.core.cache import ExpiringCache
from server.core.errors import Conflict, Unauthorized, Unavailable
from server.core.identity import Identity

log = structlog.get_logger(__name__)

GOOGLE_ISSUERS = ("accounts.google.com", "https://accounts.google.com")
JWT_ALGORITHM = "HS256"


@dataclasses.dataclass(frozen=True, slots=True)
class SignedIn:
    """A new session's access token and its account."""

    token: str
    expires_at: dt.datetime
    user: user_queries.User

    def to_public(self) -> dict[str, Any]:
        """The JSON answer of a sign-in."""
        return {"token": self.token, "token_type": "Bearer", "expires_at": self.expires_at.isoformat(),
                "user": self.user.to_public()}


def _device_text(device_info: str | None) -> str | None:
    """A client's User-Agent as sessions and registrations store it: at most 500 characters, None when absent."""
    return (device_info or "")[:500] or None


def token_digest(token: str) -> str:
    """What the sessions table stores instead of the token."""
    return hashlib.sha256(token.encode()).hexdigest()


class SessionCache:
    """Positive session checks cached briefly so every request does not hit the database.

    Expired checks are dropped as new ones come in: every sign-in is a new session id, so a cache
    that kept them until it was full would grow with the sign-ins of the last hours.
    """

    def __init__(self, ttl: float, max_entries: int = 100_000) -> None:
        self._entries: ExpiringCache[int, auth_queries.SessionState] = ExpiringCache(ttl, max_entries)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, session_id: int) -> auth_queries.SessionState | None:
        """The cached state, if fresh."""
        return self._entries.get(session_id)

    def put(self, state: auth_queries.SessionState) -> None:
        """Remember an active session for the TTL."""
        self._entries.put(state.session_id, state)

    def forget(self, session_id: int) -> None:
        """Drop a session at once (logout on this node)."""
        self._entries.pop(session_id)


class GoogleKeys:
    """Google's signing keys from a JWKS URL, cached and refreshed when an unknown key id appears."""

    def __init__(self, jwks_url: str, refresh_interval: float = 3600.0) -> None:
        self._url = jwks_url
        self._interval = refresh_interval
        self._keys: dict[str, Any] = {}
        self._fetched_at = 0.0
        self._lock = asyncio.Lock()

    async def key_for(self, kid: str | None) -> Any:
        """The public key for a token's `kid`."""
        stale = time.monotonic() - self._fetched_at > self._interval
        if kid not in self._keys or stale:
            async with self._lock:
                if kid not in self._keys or time.monotonic() - self._fetched_at > self._interval:
                    await self._refresh()
        key = self._keys.get(kid)  # type: ignore[arg-type]
        if key is None:
            raise Unauthorized("the Google token is signed by an unknown key")
        return key

    async def _refresh(self) -> None:
        try:
            timeout = aiohttp.ClientTimeout(total=10)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                async with session.get(self._url) as response:
                    response.raise_for_status()
                    document = await response.json(content_type=None)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            log.warning("jwks_fetch_failed", url=self._url, error=type(exc).__name__)
            raise Unavailable("cannot reach the identity provider's keys") from exc
        keyset = jwt.PyJWKSet.from_dict(document)
        self._keys = {key.key_id: key.key for key in keyset.keys}
        self._fetched_at = time.monotonic()


async def _free_username(conn: asyncpg.Connection, email: str) -> str:
    """A username not yet taken, made from the email's local part."""
    base = re.sub(r"[^A-Za-z0-9_.-]", "", email.split("@")[0])[:40] or "user"
    base = base if len(base) >= 3 else f"{base}_user"
    candidate, suffix = base, 1
    while await user_queries.username_taken(conn, candidate):
        suffix += 1
        candidate = f"{base}{suffix}"
    return candidate


class AuthService:
    """Registration, login, logout and Google sign-in; password hashing, token issue and check."""

    def __init__(self, *, jwt_secret: bytes, access_token_ttl: int, session_cache_ttl: float,
                 google_client_id: str | None, google_jwks_url: str) -> None:
        self._secret = jwt_secret
        self._ttl = access_token_ttl
        self._hasher = PasswordHasher()
        self.sessions = SessionCache(session_cache_ttl)
        self._google_client_id = google_client_id
        self._google_keys = GoogleKeys(google_jwks_url)
        self._addresses = StandInAddressDeriver()

    async def hash_password(self, password: str) -> str:
        """argon2id hash, computed off the event loop (it is deliberately slow)."""
        return await asyncio.to_thread(self._hasher.hash, password)

    async def verify_password(self, password_hash: str | None, password: str) -> bool:
        """Whether the password matches; a user without a password never matches."""
        if not password_hash:
            # Spend the same time as a real check so response time does not reveal the account type.
            await asyncio.to_thread(self._hasher.hash, password)
            return False
        try:
            return await asyncio.to_thread(self._hasher.verify, password_hash, password)
        except (VerificationError, InvalidHashError):
            return False

    def needs_rehash(self, password_hash: str) -> bool:
        """Whether the stored hash uses outdated parameters."""
        return self._hasher.check_needs_rehash(password_hash)

    async def start_session(self, conn: asyncpg.Connection, user_id: uuid.UUID, *,
                            ip_address: str | None, device_info: str | None) -> tuple[str, dt.datetime]:
        """Create a session row and an access token bound to it."""
        expires_at = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=self._ttl)
        # The row stores a digest of a random nonce that is also in the token, so the row id
        # alone can never be turned into a token.
        nonce = secrets.token_urlsafe(16)
        session_id = await auth_queries.create_session(
            conn, user_id=user_id, token_hash=token_digest(nonce), ip_address=ip_address,
            device_info=_device_text(device_info), expires_at=expires_at)
        claims = {"sub": str(user_id), "sid": session_id, "jti": nonce,
                  "iat": int(time.time()), "exp": int(expires_at.timestamp())}
        return jwt.encode(claims, self._secret, algorithm=JWT_ALGORITHM), expires_at

    async def _sign_in(self, conn: asyncpg.Connection, user: user_queries.User, ip_address: str | None,
                       device_info: str | None) -> SignedIn:
        token, expires_at = await self.start_session(conn, user.id, ip_address=ip_address, device_info=device_info)
        return SignedIn(token, expires_at, user)

    async def register(self, pool: asyncpg.Pool, *, username: str, email: str, password: str, name: str | None,
                       ip_address: str | None, device_info: str | None) -> SignedIn:
        """Create an account with an argon2 password hash and sign it in; Conflict for a taken username or email."""
        password_hash = await self.hash_password(password)
        async with pool.acquire() as conn, conn.transaction():
            try:
                user = await user_queries.create_user(conn, username=username, email=email.lower(),
                                                      password_hash=password_hash, name=name)
            except asyncpg.UniqueViolationError as exc:
                field = "username" if "username" in (exc.constraint_name or "") else "email"
                raise Conflict(f"that {field} is already registered", field=field) from None
            await auth_queries.record_registration(conn, user.id, ip_address, _device_text(device_info))
            return await self._sign_in(conn, user, ip_address, device_info)

    async def login(self, pool: asyncpg.Pool, login: str, password: str, *, ip_address: str | None,
                    device_info: str | None) -> SignedIn:
        """Check a username-or-email and password and start a session; Unauthorized, the same for both, otherwise."""
        async with pool.acquire() as conn:
            credentials = await user_queries.get_credentials(conn, login)
            password_hash = credentials.password_hash if credentials else None
            if not await self.verify_password(password_hash, password) or credentials is None:
                raise Unauthorized("wrong username or password")
            if self.needs_rehash(password_hash):  # type: ignore[arg-type]
                await user_queries.set_password_hash(conn, credentials.user_id, await self.hash_password(password))
            user = await user_queries.get_user(conn, credentials.user_id)
            return await self._sign_in(conn, user, ip_address, device_info)  # type: ignore[arg-type]

    async def logout(self, pool: asyncpg.Pool, session_id: int) -> None:
        """End a session: its tokens stop working at once."""
        async with pool.acquire() as conn:
            await self.end_session(conn, session_id)

    async def sign_in_with_google(self, pool: asyncpg.Pool, id_token: str, *, ip_address: str | None,
                                  device_info: str | None) -> SignedIn:
        """Sign in with a Google ID token: its subject's account, else its email's (now linked), else a new one."""
        claims = await self.verify_google_token(id_token)
        sub, email = claims["sub"], (claims.get("email") or f"{claims['sub']}@google.invalid").lower()
        aud = claims["aud"] if isinstance(claims["aud"], str) else claims["aud"][0]
        async with pool.acquire() as conn, conn.transaction():
            user = await user_queries.get_user_by_google_id(conn, sub)
            if user is None:
                salt = new_salt()
                address = self._addresses.address(iss=claims["iss"], sub=sub, aud=aud, salt=salt)
                existing = await user_queries.get_user_by_email(conn, email)
                if existing is not None:
                    # A verified Google email proves ownership of the address the account was made with.
                    user = await user_queries.link_google(conn, existing.id, google_id=sub, salt=salt,
                                                          sui_address=address)
                else:
                    user = await user_queries.create_user(
                        conn, username=await _free_username(conn, email), email=email, password_hash=None,
                        name=claims.get("name"), google_id=sub, salt=salt, sui_address=address)
                    await auth_queries.record_registration(conn, user.id, ip_address, _device_text(device_info))
            return await self._sign_in(conn, user, ip_address, device_info)

    async def authenticate(self, pool: asyncpg.Pool, token: str | None) -> Identity:
        """Check a token's signature, expiry and session; raise Unauthorized otherwise."""
        if not token:
            raise Unauthorized("a token is required")
        try:
            claims = jwt.decode(token, self._secret, algorithms=[JWT_ALGORITHM],
                                options={"require": ["sub", "sid", "exp"]})
            user_id = uuid.UUID(claims["sub"])
            session_id = int(claims["sid"])
        except jwt.ExpiredSignatureError as exc:
            raise Unauthorized("the token has expired") from exc
        except (jwt.InvalidTokenError, ValueError, TypeError) as exc:
            raise Unauthorized("the token is invalid") from exc
        state = self.sessions.get(session_id)
        if state is None:
            async with pool.acquire() as conn:
                state = await auth_queries.get_session_state(conn, session_id)
            if state is not None and state.active:
                self.sessions.put(state)
        if state is None or not state.active or state.user_id != user_id:
            raise Unauthorized("the session has ended; sign in again")
        return Identity(user_id=user_id, session_id=session_id, is_admin=state.is_admin)

    async def end_session(self, conn: asyncpg.Connection, session_id: int) -> None:
        """Log out: the session's tokens stop working at once on this node."""
        await auth_queries.end_session(conn, session_id)
        self.sessions.forget(session_id)

    async def verify_google_token(self, id_token: str) -> dict[str, Any]:
        """Verify a Google ID token (RS256, our audience, Google's issuer) and return its claims."""
        if not self._google_client_id:
            raise Unavailable("Google sign-in is not configured (GOOGLE_CLIENT_ID)")
        try:
            header = jwt.get_unverified_header(id_token)
        except jwt.InvalidTokenError as exc:
            raise Unauthorized("the Google token is malformed") from exc
        if header.get("alg") != "RS256":
            raise Unauthorized("the Google token must be signed with RS256")
        key = await self._google_keys.key_for(header.get("kid"))
        try:
            claims = jwt.decode(id_token, key, algorithms=["RS256"], audience=self._google_client_id,
                                issuer=GOOGLE_ISSUERS, options={"require": ["sub", "iss", "aud", "exp"]})
        except jwt.ExpiredSignatureError as exc:
            raise Unauthorized("the Google token has expired") from exc
        except jwt.InvalidAudienceError as exc:
            raise Unauthorized("the Google token is for another application") from exc
        except jwt.InvalidIssuerError as exc:
            raise Unauthorized("the Google token has the wrong issuer") from exc
        except jwt.InvalidTokenError as exc:
            raise Unauthorized("the Google token is invalid") from exc
        if claims.get("email") and claims.get("email_verified") is False:
            raise Unauthorized("the Google account's email is not verified")
        return claims


AUTH: web.AppKey[AuthService] = web.AppKey("auth", AuthService)


async def get_account(pool: asyncpg.Pool, user_id: uuid.UUID) -> user_queries.User:
    """A signed-in user's account; Unauthorized when it no longer exists."""
    async with pool.acquire() as conn:
        user = await user_queries.get_user(conn, user_id)
    if user is None:
        raise Unauthorized("the account no longer exists")
    return user
