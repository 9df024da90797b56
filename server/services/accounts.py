"""Account management by its holder: password change and reset by mail, profile, sessions and devices.

- A password change re-authenticates with the current password (counted like sign-in) and ends the
  user's other sessions; the current one stays.
- A reset request always answers the same (no account enumeration). When the email names an
  account, a random single-use token is made, stored only as its SHA-256, and mailed as a link
  through the `mail_outbox` table; confirming it sets the password and ends every session.
- Mail is sent by a background task (`run_mail_outbox`) through the configured sender
  (server/adapters/mail.py), with retries; queued bodies are sealed under MASTER_KEY and scrubbed
  once sent, so no reset token rests in the database in clear.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
import secrets
import urllib.parse
from typing import Any, AsyncIterator

import asyncpg
import structlog
from aiohttp import web

from db import accounts as queries
from db import auth as auth_queries
from db import users as user_queries
from db.pool import POOL
from server.adapters.mail import Mail, MailError, MailSender, create_sender
from server.core.crypto import MASTER_KEY, unwrap_key, wrap_key
from server.core.errors import Conflict, Forbidden, InvalidPayload, NotFound, RateLimited
from server.core.identity import Identity
from server.core.settings import SETTINGS, Settings
from server.realtime.ratelimit import AttemptLimiter
from server.realtime.redis import REDIS, REDIS_HEALTH
from server.services.auth import PASSWORD_CHANGED, PASSWORD_RESET, REVOKED, AuthService

log = structlog.get_logger(__name__)

RESET_WINDOW = 3600.0            # the per-address and per-email reset limits count per hour
RESET_PAGE = "/reset-password.html"
RESET_SUBJECT = "Reset your SourceNet Hub password"
MAIL_CONTEXT = b"mail_outbox body"
MAIL_BATCH = 20
MAIL_LEASE = dt.timedelta(seconds=60)   # a claimed mail is hidden this long while one node sends it
MAIL_MAX_ATTEMPTS = 6
MAIL_RETRY_BASE = 5.0            # seconds before the first retry, doubled each time...
MAIL_RETRY_MAX = 600.0           # ...up to this
MAX_SESSIONS_LISTED = 200
RESET_TOKEN_BYTES = 32


def _digest(token: str) -> str:
    """What password_reset_tokens stores instead of the token."""
    return hashlib.sha256(token.encode()).hexdigest()


def _base_url(settings: Settings) -> str:
    """Where mailed links point: PUBLIC_URL, never a request's Host header (a forged Host would
    otherwise mail a victim a link to the attacker's site carrying a live token)."""
    return (settings.public_url or f"http://{settings.host}:{settings.port}").rstrip("/")


@dataclasses.dataclass(slots=True)
class Accounts:
    """The reset limits, the mail sender and the outbox's wake-up signal of one app."""

    settings: Settings
    master_key: bytes
    sender: MailSender
    resets_per_address: AttemptLimiter
    resets_per_email: AttemptLimiter
    mail_queued: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)


ACCOUNTS: web.AppKey[Accounts] = web.AppKey("accounts", Accounts)


# --- password change ------------------------------------------------------------------------------

async def change_password(pool: asyncpg.Pool, auth: AuthService, identity: Identity, current_password: str,
                          new_password: str, *, ip_address: str | None) -> dict[str, Any]:
    """Re-authenticate, set the new password, end the user's other sessions; how many ended."""
    async with pool.acquire() as conn:
        account = await queries.get_password_account(conn, identity.user_id)
    if account is None:
        raise Forbidden("the account no longer exists", field="account")
    if account.password_hash is None:
        raise Forbidden("this account signs in with Google and has no password; set one with a password reset",
                        field="current_password")
    if not await auth.confirm_password(account.user_id, account.password_hash, current_password,
                                       ip_address=ip_address):
        raise Forbidden("the current password is wrong; nothing was changed", field="current_password")
    if new_password == current_password:
        raise InvalidPayload("the new password is the current one", field="new_password")
    password_hash = await auth.hash_password(new_password)
    async with pool.acquire() as conn:
        async with conn.transaction():
            await queries.set_password(conn, account.user_id, password_hash)
            # Whoever else is signed in may be the reason for the change: out, on every device but this one.
            ended = await auth_queries.end_user_sessions(conn, account.user_id, PASSWORD_CHANGED, identity.session_id)
        await auth.announce_ended(ended, PASSWORD_CHANGED)
    log.info("password_changed", user_id=str(account.user_id), sessions_ended=len(ended))
    return {"changed": True, "sessions_ended": len(ended)}


# --- password reset -------------------------------------------------------------------------------

async def request_password_reset(pool: asyncpg.Pool, accounts: Accounts, email: str, *,
                                 ip_address: str | None) -> None:
    """Queue a reset mail when the email names an account; the same outcome either way."""
    if ip_address is not None:
        retry_after = await accounts.resets_per_address.hit(ip_address)
        if retry_after:
            raise RateLimited("too many password reset requests from this address; wait and try again",
                              retry_after=retry_after)
    # Counted per address asked about, whether or not it has an account, so the limit tells nothing;
    # past it nothing more is mailed (the inbox is not flooded) and the answer does not change.
    if await accounts.resets_per_email.hit(email.strip().lower()):
        log.info("password_reset_suppressed", reason="per_email_limit")
        return
    token = secrets.token_urlsafe(RESET_TOKEN_BYTES)
    settings = accounts.settings
    expires_at = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=settings.password_reset_ttl)
    async with pool.acquire() as conn:
        async with conn.transaction():
            recipient = await queries.reset_recipient(conn, email.strip())
            if recipient is None:
                return
            await queries.add_reset_token(conn, _digest(token), recipient.user_id, expires_at, ip_address)
            link = f"{_base_url(settings)}{RESET_PAGE}#token={urllib.parse.quote(token)}"
            minutes = settings.password_reset_ttl // 60
            body = (f"Hello {recipient.username},\n\n"
                    f"someone (hopefully you) asked to reset the password of your SourceNet Hub account.\n"
                    f"Open this link within {minutes} minutes to choose a new one; it works once:\n\n{link}\n\n"
                    f"If you did not ask for this, ignore this mail: your password stays as it is.\n")
            sealed = wrap_key(accounts.master_key, body.encode(), MAIL_CONTEXT)
            await queries.enqueue_mail(conn, recipient.email, RESET_SUBJECT, sealed, expires_at)
    accounts.mail_queued.set()
    log.info("password_reset_requested", user_id=str(recipient.user_id))


_DEAD_TOKEN = {"used": "this reset link was already used; ask for a new one",
               "expired": "this reset link has expired; ask for a new one",
               "unknown": "this reset link is not valid; ask for a new one"}


async def confirm_password_reset(pool: asyncpg.Pool, auth: AuthService, accounts: Accounts, token: str,
                                 new_password: str, *, ip_address: str | None) -> dict[str, Any]:
    """Spend a reset token (once), set the password and end every session of its account."""
    if ip_address is not None:
        retry_after = await accounts.resets_per_address.hit(ip_address)
        if retry_after:
            raise RateLimited("too many password reset attempts from this address; wait and try again",
                              retry_after=retry_after)
    digest = _digest(token)
    async with pool.acquire() as conn:
        # A look first, so a dead token costs no argon2 work; the spend below decides, once.
        state = await queries.reset_token_state(conn, digest)
        if state != "live":
            raise InvalidPayload(_DEAD_TOKEN.get(state, _DEAD_TOKEN["unknown"]), field="token")
    password_hash = await auth.hash_password(new_password)  # outside the transaction: argon2 is slow
    async with pool.acquire() as conn:
        async with conn.transaction():
            spend = await queries.spend_reset_token(conn, digest)
            if spend.outcome != "spent":  # spent by a concurrent confirmation, or expired meanwhile
                raise InvalidPayload(_DEAD_TOKEN.get(spend.outcome, _DEAD_TOKEN["unknown"]), field="token")
            await queries.set_password(conn, spend.user_id, password_hash)  # type: ignore[arg-type]
            ended = await auth_queries.end_user_sessions(conn, spend.user_id, PASSWORD_RESET)  # type: ignore[arg-type]
        await auth.announce_ended(ended, PASSWORD_RESET)
    log.info("password_reset", user_id=str(spend.user_id), sessions_ended=len(ended))
    return {"reset": True, "sessions_ended": len(ended)}


# --- profile --------------------------------------------------------------------------------------

def _check_avatar(url: str | None) -> None:
    """An avatar is an https URL with a host (the page loads it; plain http or data: would not do)."""
    if url is None:
        return
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "https" or not parts.hostname or parts.username or parts.password:
        raise InvalidPayload("avatar_url must be an https URL without credentials", field="avatar_url")


async def update_profile(pool: asyncpg.Pool, identity: Identity, changes: dict[str, Any]) -> user_queries.User:
    """Change username, name, avatar or bio; Conflict when the username is taken."""
    _check_avatar(changes.get("avatar_url"))
    async with pool.acquire() as conn:
        async with conn.transaction():
            try:
                await queries.update_profile(conn, identity.user_id, changes)
            except asyncpg.UniqueViolationError:
                raise Conflict("that username is already taken", field="username") from None
        user = await user_queries.get_user(conn, identity.user_id)
    if user is None:
        raise NotFound("the account no longer exists", field="account")
    log.info("profile_updated", user_id=str(identity.user_id), fields=sorted(changes))
    return user


# --- sessions and devices -------------------------------------------------------------------------

async def list_sessions(pool: asyncpg.Pool, identity: Identity) -> list[dict[str, Any]]:
    """The caller's open sessions (devices), the current one flagged."""
    async with pool.acquire() as conn:
        rows = await queries.open_sessions(conn, identity.user_id, MAX_SESSIONS_LISTED)
    return [row.to_public(identity.session_id) for row in rows]


async def revoke_session(pool: asyncpg.Pool, auth: AuthService, identity: Identity, session_id: int) -> None:
    """Sign one of the caller's devices out: its tokens stop working and its sockets hear `signed_out`."""
    async with pool.acquire() as conn:
        if not await queries.end_own_session(conn, identity.user_id, session_id, REVOKED):
            # Another user's session is as unknown as a missing one.
            raise NotFound("no such open session of yours", field="session_id")
    await auth.announce_ended([session_id], REVOKED)


# --- the mail outbox ------------------------------------------------------------------------------

def _retry_delay(attempts: int) -> dt.timedelta:
    """Exponential backoff after the n-th failed attempt."""
    return dt.timedelta(seconds=min(MAIL_RETRY_BASE * 2 ** (attempts - 1), MAIL_RETRY_MAX))


async def send_due_mail(pool: asyncpg.Pool, accounts: Accounts) -> int:
    """One pass over the outbox: send what is due, reschedule or abandon failures; how many were sent."""
    sent = 0
    async with pool.acquire() as conn:
        claimed = await queries.claim_due_mail(conn, MAIL_BATCH, MAIL_LEASE)
    for mail in claimed:
        async with pool.acquire() as conn:
            if mail.expires_at is not None and mail.expires_at <= dt.datetime.now(dt.timezone.utc):
                await queries.abandon_mail(conn, mail.mail_id, "expired before it could be sent")
                continue
            try:
                body = unwrap_key(accounts.master_key, mail.body_sealed or "", MAIL_CONTEXT).decode()
            except Exception:  # noqa: BLE001 - sealed under a master key no longer configured, or damaged
                await queries.abandon_mail(conn, mail.mail_id, "the body cannot be unsealed")
                log.warning("mail_abandoned", mail_id=mail.mail_id, reason="unseal_failed")
                continue
            try:
                await accounts.sender.send(Mail(mail.recipient, mail.subject, body))
            except MailError as exc:
                if mail.attempts >= MAIL_MAX_ATTEMPTS:
                    await queries.abandon_mail(conn, mail.mail_id, str(exc))
                    log.warning("mail_abandoned", mail_id=mail.mail_id, attempts=mail.attempts, error=str(exc))
                else:
                    await queries.retry_mail_later(conn, mail.mail_id, str(exc), _retry_delay(mail.attempts))
                    log.warning("mail_send_failed", mail_id=mail.mail_id, attempts=mail.attempts, error=str(exc))
                continue
            await queries.mark_mail_sent(conn, mail.mail_id)
            sent += 1
    return sent


async def run_mail_outbox(pool: asyncpg.Pool, accounts: Accounts, poll_interval: float) -> None:
    """Send queued mail until cancelled: at once when this node queued some, else every poll."""
    while True:
        try:
            await send_due_mail(pool, accounts)
        except (OSError, asyncpg.PostgresError) as exc:
            log.warning("mail_outbox_pass_failed", error=type(exc).__name__)
        accounts.mail_queued.clear()
        try:
            await asyncio.wait_for(accounts.mail_queued.wait(), poll_interval)
        except TimeoutError:
            pass


async def accounts_ctx(app: web.Application) -> AsyncIterator[None]:
    """Reset limits (shared through Redis when set), the mail sender and the outbox task."""
    settings = app[SETTINGS]
    shared = {"redis": app[REDIS], "prefix": settings.redis_prefix, "health": app[REDIS_HEALTH]}
    accounts = app[ACCOUNTS] = Accounts(
        settings=settings, master_key=app[MASTER_KEY], sender=create_sender(settings.smtp_url, settings.mail_from),
        resets_per_address=AttemptLimiter("reset_address", settings.password_resets_per_address, RESET_WINDOW,
                                          **shared),
        resets_per_email=AttemptLimiter("reset_email", settings.password_resets_per_email, RESET_WINDOW, **shared))
    if not settings.smtp_url:
        log.warning("mail_not_configured", note="SMTP_URL is unset: mail (with reset links) is only logged")
    task = asyncio.create_task(run_mail_outbox(app[POOL], accounts, settings.outbox_poll_interval))
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)

