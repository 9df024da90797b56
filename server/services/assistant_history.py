"""The assistant's history: search a user's conversations, export one, share one read-only, rate answers.

- Search is PostgreSQL full text over titles and message contents (every branch), the caller's
  conversations only, most recently active first, paged by an opaque cursor.
- Export writes the current branch as Markdown or JSON.
- A share is a read-only link to the current branch (whatever branch is current when it is read).
  The token is shown once, when the share is created: only its SHA-256 is stored, so a copy of
  the database holds no working link, and an existing share cannot show its link again (revoke
  and share again for a new one). Anyone with the link sees the title and the branch's roles,
  texts and times; never the owner, other branches, tool calls or usage.
- Feedback: one rating (`up` or `down`, an optional comment) per user per answer, on answers in
  the user's own conversations; administrators list it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import html
import re
import secrets
import uuid
from typing import Any, AsyncIterator

import asyncpg
from aiohttp import web

from db import assistant as assistant_db
from db import assistant_history as db
from db.pool import POOL
from server.core import jsonutil
from server.core.cursors import decode_time_cursor, encode_time_cursor
from server.core.errors import Conflict, InvalidPayload, NotFound, RateLimited
from server.core.settings import SETTINGS
from server.realtime.ratelimit import AttemptLimiter
from server.realtime.redis import REDIS, REDIS_HEALTH
from server.services.assistant import owned_conversation, owned_message, parse_uuid

SEARCH_MAX_CHARS = 200
FEEDBACK_COMMENT_MAX_CHARS = 1000
RATINGS = ("up", "down")
EXPORT_FORMATS = ("md", "json")
EXPORT_CONTENT_TYPES = {"md": "text/markdown", "json": "application/json"}
SHARE_TOKEN_BYTES = 32  # 43 URL-safe characters
SHARED_PATH = "/api/v1/shared/{token}"
# The public shared view, per client address: generous for reading, tight for guessing tokens.
SHARED_VIEWS_PER_ADDRESS = 60
SHARED_VIEW_WINDOW = 60.0

SHARE_LIMITER: web.AppKey[AttemptLimiter] = web.AppKey("assistant_share_views", AttemptLimiter)

_START, _STOP = "\x01", "\x02"  # the match markers of db.HEADLINE_OPTIONS


def token_hash(token: str) -> bytes:
    """What the database holds of a share token."""
    return hashlib.sha256(token.encode()).digest()


def _cursor(value: str | None) -> tuple[dt.datetime, uuid.UUID] | None:
    return decode_time_cursor(value) if value else None


def highlight(snippet: str) -> str:
    """An excerpt with its match markers as HTML: the text escaped, the matches in <mark>."""
    return html.escape(snippet).replace(_START, "<mark>").replace(_STOP, "</mark>")


# --- search ---------------------------------------------------------------------------------------

async def search_conversations(app: web.Application, user_id: uuid.UUID, q: str, limit: int,
                               cursor: str | None) -> dict[str, Any]:
    """The user's conversations whose title or a message matches `q`, most recently active first."""
    words = " ".join(q.split())
    if not words:
        raise InvalidPayload("q is empty", field="q")
    if len(words) > SEARCH_MAX_CHARS:
        raise InvalidPayload(f"q is at most {SEARCH_MAX_CHARS} characters", field="q")
    async with app[POOL].acquire() as conn:
        hits = await db.search_conversations(conn, user_id, words, _cursor(cursor), limit)
    results = [{"conversation": hit.conversation.to_public(),
                "message_id": str(hit.message_id) if hit.message_id else None,
                "matched": "message" if hit.message_id else "title",
                "snippet": highlight(hit.snippet)} for hit in hits]
    last = hits[-1].conversation if len(hits) == limit else None
    return {"results": results, "next_cursor": encode_time_cursor(last.updated_at, last.id) if last else None}


# --- export ---------------------------------------------------------------------------------------

def _filename(title: str | None, conversation_id: uuid.UUID, fmt: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", title or "").strip("-").lower()[:60].rstrip("-") or "conversation"
    return f"{slug}-{conversation_id.hex[:8]}.{fmt}"


def _when(value: dt.datetime) -> str:
    return value.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def to_markdown(conversation: assistant_db.Conversation, messages: list[assistant_db.Message],
                exported_at: dt.datetime) -> str:
    """A branch as a Markdown document: a heading per message, its text as written."""
    lines = [f"# {conversation.title or 'Untitled conversation'}", "",
             f"*Exported from SourceNet Hub on {_when(exported_at)}: the current branch, "
             f"{len(messages)} message{'s' if len(messages) != 1 else ''}.*", ""]
    for message in messages:
        who = "You" if message.role == "user" else "Assistant"
        state = "" if message.status == "complete" else f" ({message.status})"
        lines += [f"## {who} · {_when(message.created_at)}{state}", "", message.content.rstrip() or "*(empty)*", ""]
    return "\n".join(lines)


async def export_conversation(app: web.Application, user_id: uuid.UUID, conversation_id: str,
                              fmt: str) -> dict[str, Any]:
    """The user's conversation's current branch as a document: `{format, filename, content_type, content}`."""
    if fmt not in EXPORT_FORMATS:
        raise InvalidPayload("format must be md or json", field="format")
    conversation_uuid = parse_uuid(conversation_id, "conversation_id")
    async with app[POOL].acquire() as conn:
        conversation = await owned_conversation(conn, user_id, conversation_uuid)
        messages = await assistant_db.branch(conn, conversation.current_leaf_id)
    exported_at = dt.datetime.now(dt.timezone.utc)
    if fmt == "md":
        content = to_markdown(conversation, messages, exported_at)
    else:
        content = jsonutil.dumpb({
            "conversation": conversation.to_public(), "exported_at": exported_at.isoformat(),
            "messages": [{k: v for k, v in m.to_public().items() if k != "sibling_ids"} for m in messages],
        }).decode()
    return {"format": fmt, "filename": _filename(conversation.title, conversation.id, fmt),
            "content_type": EXPORT_CONTENT_TYPES[fmt], "content": content}


# --- shares ---------------------------------------------------------------------------------------

def _share_public(share: db.Share, token: str | None) -> dict[str, Any]:
    return {"conversation_id": str(share.conversation_id), "created_at": share.created_at.isoformat(),
            "token": token, "path": SHARED_PATH.format(token=token) if token else None}


async def share_conversation(app: web.Application, user_id: uuid.UUID, conversation_id: str) -> dict[str, Any]:
    """Share the user's conversation read-only: a new link (`created: true`), or the existing share
    without its link (`created: false`; only the token's hash is kept)."""
    conversation_uuid = parse_uuid(conversation_id, "conversation_id")
    token = secrets.token_urlsafe(SHARE_TOKEN_BYTES)
    async with app[POOL].acquire() as conn:
        await owned_conversation(conn, user_id, conversation_uuid)
        share = await db.create_share(conn, conversation_uuid, token_hash(token))
        if share is None:
            existing = await db.get_share(conn, conversation_uuid)
            if existing is None:  # revoked between the two statements: the caller may try again
                raise Conflict("the share changed meanwhile; try again", field="conversation_id")
            return {"share": _share_public(existing, None), "created": False}
    return {"share": _share_public(share, token), "created": True}


async def unshare_conversation(app: web.Application, user_id: uuid.UUID, conversation_id: str) -> dict[str, Any]:
    """Revoke the user's conversation's link (its readers get not_found); `revoked: false` when unshared."""
    conversation_uuid = parse_uuid(conversation_id, "conversation_id")
    async with app[POOL].acquire() as conn:
        await owned_conversation(conn, user_id, conversation_uuid)
        revoked = await db.delete_share(conn, conversation_uuid)
    return {"conversation_id": conversation_id, "revoked": revoked}


async def read_shared(app: web.Application, token: str, client: str | None) -> dict[str, Any]:
    """A shared conversation for anyone holding its link: the title and the current branch's
    roles, texts and times. Counted per client address (RateLimited past the limit)."""
    retry_after = await app[SHARE_LIMITER].hit(client or "unknown")
    if retry_after:
        raise RateLimited("too many shared conversations read from this address; wait and try again",
                          retry_after=retry_after)
    async with app[POOL].acquire() as conn:
        found = await db.shared_conversation(conn, token_hash(token))
        if found is None:
            raise NotFound("no conversation is shared under this link", field="token")
        conversation, share = found
        messages = await assistant_db.branch(conn, conversation.current_leaf_id)
    return {"conversation": {"title": conversation.title, "created_at": conversation.created_at.isoformat(),
                             "updated_at": conversation.updated_at.isoformat(),
                             "shared_at": share.created_at.isoformat()},
            "messages": [{"role": m.role, "content": m.content, "status": m.status,
                          "created_at": m.created_at.isoformat()} for m in messages]}


# --- feedback -------------------------------------------------------------------------------------

async def _rated_answer(conn: asyncpg.Connection, user_id: uuid.UUID, message_id: str) -> assistant_db.Message:
    message = await owned_message(conn, user_id, parse_uuid(message_id, "message_id"))
    if message.role != "assistant":
        raise InvalidPayload("only an answer can be rated", field="message_id")
    return message


async def give_feedback(app: web.Application, user_id: uuid.UUID, message_id: str, rating: str,
                        comment: str | None) -> dict[str, Any]:
    """Rate an answer in the user's conversation (`up`/`down`, an optional comment), replacing
    the user's earlier rating of it."""
    if rating not in RATINGS:
        raise InvalidPayload("rating must be up or down", field="rating")
    comment = (comment or "").strip() or None
    if comment is not None and len(comment) > FEEDBACK_COMMENT_MAX_CHARS:
        raise InvalidPayload(f"a comment is at most {FEEDBACK_COMMENT_MAX_CHARS} characters", field="comment")
    async with app[POOL].acquire() as conn:
        message = await _rated_answer(conn, user_id, message_id)
        if message.status == "streaming":
            raise Conflict("this answer is still being written", field="message_id")
        feedback = await db.put_feedback(conn, message.id, user_id, rating, comment)
    return {"feedback": feedback.to_public()}


async def withdraw_feedback(app: web.Application, user_id: uuid.UUID, message_id: str) -> dict[str, Any]:
    """Withdraw the user's rating of an answer; `withdrawn: false` when there was none."""
    async with app[POOL].acquire() as conn:
        message = await _rated_answer(conn, user_id, message_id)
        withdrawn = await db.delete_feedback(conn, message.id, user_id)
    return {"message_id": str(message.id), "withdrawn": withdrawn}


async def list_feedback(app: web.Application, rating: str | None, cursor: str | None, limit: int) -> dict[str, Any]:
    """Every user's feedback, newest first, optionally of one rating (for administrators)."""
    if rating is not None and rating not in RATINGS:
        raise InvalidPayload("rating must be up or down", field="rating")
    async with app[POOL].acquire() as conn:
        entries = await db.list_feedback(conn, rating, _cursor(cursor), limit)
    last = entries[-1] if len(entries) == limit else None
    return {"feedback": [entry.to_public() for entry in entries],
            "next_cursor": encode_time_cursor(last.updated_at, last.id) if last else None}


# --- app wiring -----------------------------------------------------------------------------------

async def assistant_history_ctx(app: web.Application) -> AsyncIterator[None]:
    """The shared view's per-address limit (counted in Redis when there is one)."""
    settings = app[SETTINGS]
    app[SHARE_LIMITER] = AttemptLimiter("shared_conversation", SHARED_VIEWS_PER_ADDRESS, SHARED_VIEW_WINDOW,
                                        redis=app[REDIS], prefix=settings.redis_prefix, health=app[REDIS_HEALTH])
    yield
