"""Accounts and authentication: registration, argon2 passwords, short JWT access tokens bound to a
session row, rotating refresh tokens, sign-in attempt limits, Google sign-in (with the zkLogin salt
and Sui address chosen here, never by the client).

A session is one signed-in device. It ends by logout, by an administrator's revocation, by the
reuse of a spent refresh token (a copy is in someone else's hands), or by running out; whoever ends
it calls `sessions_ended`, which the app wires to disconnecting the session's sockets on every node.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
import re
import secrets
import time
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable

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
from server.core.aio import Batcher
from server.core.cache import ExpiringCache
from server.core.errors import Conflict, Forbidden, NotFound, RateLimited, Unauthorized, Unavailable
from server.core.identity import Identity
from server.core.settings import SETTINGS
from server.realtime.hub import REALTIME
from server.realtime.ratelimit import AttemptLimiter
from server.realtime.redis import REDIS, REDIS_HEALTH

log = structlog.get_logger(__name__)

GOOGLE_ISSUERS = ("accounts.google.com", "https://accounts.google.com")
JWT_ALGORITHM = "HS256"
CHECKED_TOKEN_TTL = 300.0  # seconds a verified token skips the signature check
CHECKED_TOKENS_MAX = 10_000
SESSION_READ_BATCH = 500


# Why a session ended: `sessions.end_reason`, and the `reason` of the `signed_out` event.
LOGGED_OUT, REVOKED, REFRESH_REUSE, EXPIRED = "logged_out", "revoked", "refresh_reuse", "expired"
# Accounts (server/services/accounts.py): the user's other devices after a password change, every
# device after a reset by mail, and an administrator's suspension.
PASSWORD_CHANGED, PASSWORD_RESET, SUSPENDED = "password_changed", "password_reset", "suspended"
SUSPENDED_MESSAGE = "this account is suspended; contact the administrators"


@dataclasses.dataclass(frozen=True, slots=True)
class Tokens:
    """An access token and the refresh token that gets the next one."""

    token: str
    expires_at: dt.datetime
    refresh_token: str
    refresh_expires_at: dt.datetime

    def to_public(self) -> dict[str, Any]:
        """The token fields of a sign-in or refresh answer."""
        return {"token": self.token, "token_type": "Bearer", "expires_at": self.expires_at.isoformat(),
                "refresh_token": self.refresh_token, "refresh_expires_at": self.refresh_expires_at.isoformat()}


@dataclasses.dataclass(frozen=True, slots=True)
class SignedIn:
    """A session's tokens and its account."""

    tokens: Tokens
    user: user_queries.User

    @property
    def token(self) -> str:
        """The access token."""
        return self.tokens.token

    def to_public(self) -> dict[str, Any]:
        """The JSON answer of a sign-in or refresh."""
        return {**self.tokens.to_public(), "user": self.user.to_public()}


SessionsEnded = Callable[[Iterable[int], str], Awaitable[None]]


async def _no_sockets(session_ids: Iterable[int], reason: str) -> None:
    """Until the app wires realtime in, ending a session has no sockets to tell."""


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


async def _read_session_states(reads: list[tuple[asyncpg.Pool, int]]) -> list[auth_queries.SessionState | None]:
    """One query per pool for a batch of (pool, session id) reads; each read's state or None."""
    found: dict[tuple[asyncpg.Pool, int], auth_queries.SessionState] = {}
    for pool in {pool for pool, _ in reads}:
        async with pool.acquire() as conn:
            states = await auth_queries.get_session_states(conn, list({sid for p, sid in reads if p is pool}))
        found.update(((pool, sid), state) for sid, state in states.items())
    return [found.get(read) for read in reads]


class AuthService:
    """Registration, login, logout and Google sign-in; password hashing, token issue and check."""

    def __init__(self, *, jwt_secret: bytes, access_token_ttl: int, refresh_token_ttl: int,
                 session_cache_ttl: float, google_client_id: str | None, google_jwks_url: str) -> None:
        self._secret = jwt_secret
        self._ttl = access_token_ttl
        self._refresh_ttl = refresh_token_ttl
        self._hasher = PasswordHasher()
        self.sessions = SessionCache(session_cache_ttl)
        # After a restart every socket reconnects at once, each missing the cache: the checks queued
        # while one query is out go together in the next, so each is still read after it was asked.
        # (One query per session kept thousands waiting for the pool: up to 2.3 s in a storm.)
        self._session_reads: Batcher[tuple[asyncpg.Pool, int]] = Batcher(
            _read_session_states, name="auth.sessions", max_batch=SESSION_READ_BATCH)
        # A socket's token is checked on connect and again on every subscribe, and the sockets of a
        # session present the same one: its signature is checked once (keyed by the whole token,
        # signature included, so only a token that verified can hit). Expiry is checked every time.
        self._checked_tokens: ExpiringCache[str, tuple[uuid.UUID, int, float]] = ExpiringCache(
            CHECKED_TOKEN_TTL, CHECKED_TOKENS_MAX)
        self.sessions_ended: SessionsEnded = _no_sockets
        # Replaced by `limit_attempts` at startup (Redis-backed when configured).
        self._per_address: AttemptLimiter | None = None
        self._per_account: AttemptLimiter | None = None
        self._google_client_id = google_client_id
        self._google_keys = GoogleKeys(google_jwks_url)
        self._addresses = StandInAddressDeriver()

    def google_sign_in(self) -> dict[str, Any]:
        """Whether Google sign-in is configured, and the (public) OAuth client id a page asks Google for."""
        return {"configured": bool(self._google_client_id), "client_id": self._google_client_id or None}

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

    def limit_attempts(self, per_address: AttemptLimiter, per_account: AttemptLimiter) -> None:
        """Use these counters for sign-in attempts per client address and wrong passwords per account."""
        self._per_address, self._per_account = per_address, per_account

    async def _count_attempt(self, ip_address: str | None) -> None:
        """Count a sign-in from this address; RateLimited past the limit (before any argon2 work)."""
        if self._per_address is None or ip_address is None:
            return
        retry_after = await self._per_address.hit(ip_address)
        if retry_after:
            raise RateLimited("too many sign-in attempts from this address; wait and try again",
                              retry_after=retry_after)

    async def confirm_password(self, user_id: uuid.UUID, password_hash: str, password: str, *,
                               ip_address: str | None) -> bool:
        """Re-authenticate a signed-in user (before an irreversible step): whether the password is right,
        counted and limited like sign-in (per address, and wrong passwords per account: RateLimited)."""
        await self._count_attempt(ip_address)
        account = f"user:{user_id}"
        if self._per_account is not None:
            retry_after = await self._per_account.peek(account)
            if retry_after:
                raise RateLimited("too many wrong passwords for this account; wait and try again",
                                  retry_after=retry_after)
        if not await self.verify_password(password_hash, password):
            if self._per_account is not None:
                await self._per_account.hit(account)
            return False
        if self._per_account is not None:
            await self._per_account.reset(account)
        return True

    def _access_token(self, user_id: uuid.UUID, session_id: int, not_after: dt.datetime) -> tuple[str, dt.datetime]:
        """A signed access token of a session, ending after ACCESS_TOKEN_TTL or with the session."""
        expires_at = min(dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=self._ttl), not_after)
        claims = {"sub": str(user_id), "sid": session_id, "jti": secrets.token_urlsafe(12),
                  "iat": int(time.time()), "exp": int(expires_at.timestamp())}
        return jwt.encode(claims, self._secret, algorithm=JWT_ALGORITHM), expires_at

    async def _issue(self, conn: asyncpg.Connection, user_id: uuid.UUID, session_id: int) -> Tokens:
        """A new access token and the session's next refresh token; the session lives on as long as it."""
        refresh_expires_at = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=self._refresh_ttl)
        refresh_token = secrets.token_urlsafe(32)
        await auth_queries.add_refresh_token(conn, session_id, token_digest(refresh_token), refresh_expires_at)
        await auth_queries.extend_session(conn, session_id, refresh_expires_at)
        token, expires_at = self._access_token(user_id, session_id, refresh_expires_at)
        return Tokens(token, expires_at, refresh_token, refresh_expires_at)

    async def start_session(self, conn: asyncpg.Connection, user_id: uuid.UUID, *,
                            ip_address: str | None, device_info: str | None) -> Tokens:
        """Create a session row (one device) with its first access and refresh tokens."""
        # The row's `token` is a digest of a random nonce no token carries: the seed's column stays
        # filled, and nothing about the row can be turned into a token.
        session_id = await auth_queries.create_session(
            conn, user_id=user_id, token_hash=token_digest(secrets.token_urlsafe(16)), ip_address=ip_address,
            device_info=_device_text(device_info), expires_at=dt.datetime.now(dt.timezone.utc))
        return await self._issue(conn, user_id, session_id)

    async def _sign_in(self, conn: asyncpg.Connection, user: user_queries.User, ip_address: str | None,
                       device_info: str | None) -> SignedIn:
        tokens = await self.start_session(conn, user.id, ip_address=ip_address, device_info=device_info)
        return SignedIn(tokens, user)

    async def refresh(self, pool: asyncpg.Pool, refresh_token: str) -> SignedIn:
        """Spend a refresh token for a new access token and the next refresh token of the same session.

        A spent token presented again ends its whole session (every token of that device), since
        either the client or a thief holds a copy, and the server cannot tell which.
        """
        async with pool.acquire() as conn:
            async with conn.transaction():
                spend = await auth_queries.spend_refresh_token(conn, token_digest(refresh_token))
                if spend.outcome == "spent":
                    user = await user_queries.get_user(conn, spend.user_id)  # type: ignore[arg-type]
                    # A suspension ends the sessions; this also covers a refresh racing it.
                    if user is not None and not user.suspended:
                        return SignedIn(await self._issue(conn, user.id, spend.session_id), user)  # type: ignore[arg-type]
            if spend.outcome == "reused":
                log.warning("refresh_token_reused", session_id=spend.session_id, user_id=str(spend.user_id))
                await self.end_sessions(conn, [spend.session_id], REFRESH_REUSE)  # type: ignore[list-item]
                raise Unauthorized("this refresh token was already used; the session has ended, sign in again")
        raise Unauthorized("the refresh token is invalid or has expired; sign in again")

    async def register(self, pool: asyncpg.Pool, *, username: str, email: str, password: str, name: str | None,
                       ip_address: str | None, device_info: str | None) -> SignedIn:
        """Create an account with an argon2 password hash and sign it in; Conflict for a taken username or email."""
        await self._count_attempt(ip_address)
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
        await self._count_attempt(ip_address)
        account = login.strip().lower()
        if self._per_account is not None:
            # Refused before argon2 runs: a guessing run against one account costs the server nothing.
            retry_after = await self._per_account.peek(account)
            if retry_after:
                raise RateLimited("too many wrong passwords for this account; wait and try again",
                                  retry_after=retry_after)
        async with pool.acquire() as conn:
            credentials = await user_queries.get_credentials(conn, login)
            password_hash = credentials.password_hash if credentials else None
            if not await self.verify_password(password_hash, password) or credentials is None:
                if self._per_account is not None:
                    await self._per_account.hit(account)
                raise Unauthorized("wrong username or password")
            if self._per_account is not None:
                await self._per_account.reset(account)
            # Said only after the right password, so it reveals nothing to someone guessing.
            if credentials.suspended:
                raise Forbidden(SUSPENDED_MESSAGE, field="account")
            if self.needs_rehash(password_hash):  # type: ignore[arg-type]
                await user_queries.set_password_hash(conn, credentials.user_id, await self.hash_password(password))
            user = await user_queries.get_user(conn, credentials.user_id)
            return await self._sign_in(conn, user, ip_address, device_info)  # type: ignore[arg-type]

    async def logout(self, pool: asyncpg.Pool, session_id: int) -> None:
        """End a session: its tokens stop working and its sockets close, on every node."""
        async with pool.acquire() as conn:
            await self.end_sessions(conn, [session_id], LOGGED_OUT)

    async def revoke_user_sessions(self, pool: asyncpg.Pool, user_id: uuid.UUID) -> int:
        """An administrator signs a user out of every device; how many sessions were open."""
        async with pool.acquire() as conn:
            if await user_queries.get_user(conn, user_id) is None:
                raise NotFound("no such user", field="user_id")
            session_ids = await auth_queries.end_user_sessions(conn, user_id, REVOKED)
        await self._forget(session_ids, REVOKED)
        return len(session_ids)

    async def sign_in_with_google(self, pool: asyncpg.Pool, id_token: str, *, ip_address: str | None,
                                  device_info: str | None) -> SignedIn:
        """Sign in with a Google ID token: its subject's account, else its verified email's (linked), else a new one."""
        await self._count_attempt(ip_address)
        claims = await self.verify_google_token(id_token)
        # Only an email Google vouches for (`email_verified: true`) may claim an existing account.
        verified = claims.get("email_verified") in (True, "true")
        sub = claims["sub"]
        email = (claims["email"] if claims.get("email") and verified else f"{sub}@google.invalid").lower()
        aud = claims["aud"] if isinstance(claims["aud"], str) else claims["aud"][0]
        async with pool.acquire() as conn, conn.transaction():
            user = await user_queries.get_user_by_google_id(conn, sub)
            if user is None:
                salt = new_salt()
                address = self._addresses.address(iss=claims["iss"], sub=sub, aud=aud, salt=salt)
                existing = await user_queries.get_user_by_email(conn, email) if verified else None
                if existing is not None:
                    # A verified Google email proves ownership of the address the account was made with.
                    user = await user_queries.link_google(conn, existing.id, google_id=sub, salt=salt,
                                                          sui_address=address)
                else:
                    user = await user_queries.create_user(
                        conn, username=await _free_username(conn, email), email=email, password_hash=None,
                        name=claims.get("name"), google_id=sub, salt=salt, sui_address=address)
                    await auth_queries.record_registration(conn, user.id, ip_address, _device_text(device_info))
            if user.suspended:
                raise Forbidden(SUSPENDED_MESSAGE, field="account")
            return await self._sign_in(conn, user, ip_address, device_info)

    async def authenticate(self, pool: asyncpg.Pool, token: str | None) -> Identity:
        """Check a token's signature, expiry and session; raise Unauthorized otherwise."""
        if not token:
            raise Unauthorized("a token is required")
        user_id, session_id, expires_at = self._claims(token)
        state = self.sessions.get(session_id)
        if state is None:
            state = await self._session_reads.submit((pool, session_id))
            if state is not None and state.active:
                self.sessions.put(state)
        if state is None or not state.active or state.user_id != user_id:
            raise Unauthorized("the session has ended; sign in again")
        return Identity(user_id=user_id, session_id=session_id, is_admin=state.is_admin, expires_at=expires_at)

    def _claims(self, token: str) -> tuple[uuid.UUID, int, float]:
        """The user, session and expiry of a token whose signature checked out; Unauthorized otherwise."""
        claims = self._checked_tokens.get(token)
        if claims is None:
            try:
                decoded = jwt.decode(token, self._secret, algorithms=[JWT_ALGORITHM],
                                     options={"require": ["sub", "sid", "exp"]})
                claims = (uuid.UUID(decoded["sub"]), int(decoded["sid"]), float(decoded["exp"]))
            except jwt.ExpiredSignatureError as exc:
                raise Unauthorized("the token has expired") from exc
            except (jwt.InvalidTokenError, ValueError, TypeError, OverflowError) as exc:
                raise Unauthorized("the token is invalid") from exc
            self._checked_tokens.put(token, claims)
        if claims[2] <= time.time():  # PyJWT's rule, for a token checked before it expired
            raise Unauthorized("the token has expired")
        return claims

    async def end_sessions(self, conn: asyncpg.Connection, session_ids: list[int], reason: str) -> None:
        """End sessions: their tokens stop working, and their sockets close on every node."""
        for session_id in session_ids:
            await auth_queries.end_session(conn, session_id, reason)
        await self._forget(session_ids, reason)

    async def end_user_sessions(self, conn: asyncpg.Connection, user_id: uuid.UUID, reason: str, *,
                                keep: int | None = None) -> list[int]:
        """End every open session of a user but `keep`, on every node; the ids that were open."""
        session_ids = await auth_queries.end_user_sessions(conn, user_id, reason, keep)
        await self._forget(session_ids, reason)
        return session_ids

    async def announce_ended(self, session_ids: list[int], reason: str) -> None:
        """Sessions a committed transaction ended: drop their cached checks, close their sockets everywhere."""
        await self._forget(session_ids, reason)

    async def _forget(self, session_ids: list[int], reason: str) -> None:
        for session_id in session_ids:
            self.sessions.forget(session_id)
        if session_ids:
            await self.sessions_ended(session_ids, reason)

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
        return claims


AUTH: web.AppKey[AuthService] = web.AppKey("auth", AuthService)


async def auth_ctx(app: web.Application) -> AsyncIterator[None]:
    """Sign-in attempt counters (shared through Redis when set) and session ends reaching sockets."""
    settings, auth, realtime = app[SETTINGS], app[AUTH], app[REALTIME]
    shared = {"redis": app[REDIS], "prefix": settings.redis_prefix, "health": app[REDIS_HEALTH]}
    auth.limit_attempts(
        AttemptLimiter("signin_address", settings.signin_attempts_per_address, settings.signin_address_window,
                       **shared),
        AttemptLimiter("login_account", settings.login_failures_per_account, settings.login_failure_window,
                       **shared))
    auth.sessions_ended = realtime.end_sessions
    realtime.on_session_ended = auth.sessions.forget
    yield


async def get_account(pool: asyncpg.Pool, user_id: uuid.UUID) -> user_queries.User:
    """A signed-in user's account; Unauthorized when it no longer exists."""
    async with pool.acquire() as conn:
        user = await user_queries.get_user(conn, user_id)
    if user is None:
        raise Unauthorized("the account no longer exists")
    return user
