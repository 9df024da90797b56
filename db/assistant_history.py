"""Queries on the assistant's history: full-text search over conversations, read-only share links
(`ai_conversation_shares`) and feedback on answers (`ai_message_feedback`).

The search expressions repeat those of the GIN indexes of migration 0024 character for character
(config included): the planner uses an expression index only for the same expression.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from typing import Any

import asyncpg

from db.assistant import CONVERSATION_COLUMNS, Conversation

TITLE_DOCUMENT = "to_tsvector('simple', coalesce({alias}.title, ''))"
MESSAGE_DOCUMENT = "to_tsvector('simple', left({alias}.content, 100000))"
# ts_headline marks matches with control characters that the service strips from the text first,
# so it can escape the excerpt and mark it up safely; a message may contain any markup.
# One window of words around the first match (fragment mode cuts short chat messages too tightly).
HEADLINE_OPTIONS = "StartSel=\x01, StopSel=\x02, MaxWords=30, MinWords=12"
EXCERPT_CHARS = 300

_C = ", ".join("c." + column for column in CONVERSATION_COLUMNS.split(", "))

# $1 user, $2 the user's words, $3/$4 the cursor's (updated_at, id) or NULL, $5 limit, $6 the headline's
# options. The tsquery is written out at each use, not read from a CTE: the planner then sees its
# value, estimates how rare the words are and reaches for the GIN indexes.
_TSQUERY = "websearch_to_tsquery('simple', $2)"
SEARCH_SQL = f"""
WITH hits AS (
    SELECT c.id FROM ai_conversations c
     WHERE c.user_id = $1 AND {TITLE_DOCUMENT.format(alias='c')} @@ {_TSQUERY}
    UNION
    SELECT m.conversation_id FROM ai_messages m JOIN ai_conversations c ON c.id = m.conversation_id
     WHERE c.user_id = $1 AND {MESSAGE_DOCUMENT.format(alias='m')} @@ {_TSQUERY}
),
page AS (
    SELECT {_C} FROM ai_conversations c
     WHERE c.id IN (SELECT id FROM hits) AND c.user_id = $1
       AND ($3::timestamptz IS NULL OR (c.updated_at, c.id) < ($3, $4::uuid))
     ORDER BY c.updated_at DESC, c.id DESC LIMIT $5
)
SELECT page.*, hit.id AS message_id,
       ts_headline('simple', translate(coalesce(hit.content, page.title, ''), E'\\x01\\x02', ''), {_TSQUERY},
                   $6) AS snippet
  FROM page
  LEFT JOIN LATERAL (
      SELECT m.id, m.content FROM ai_messages m
       WHERE m.conversation_id = page.id AND {MESSAGE_DOCUMENT.format(alias='m')} @@ {_TSQUERY}
       -- A question and its answer are inserted in one transaction (one created_at): the answer,
       -- written after, is the newer.
       ORDER BY m.created_at DESC, m.updated_at DESC, m.id DESC LIMIT 1
  ) hit ON true
 ORDER BY page.updated_at DESC, page.id DESC"""


@dataclasses.dataclass(frozen=True, slots=True)
class SearchHit:
    """A conversation matching a search: its newest matching message (None: the title matched)
    and an excerpt with the matches between \\x01 and \\x02."""

    conversation: Conversation
    message_id: uuid.UUID | None
    snippet: str


@dataclasses.dataclass(frozen=True, slots=True)
class Share:
    """A conversation's read-only link (only the token's hash is stored)."""

    conversation_id: uuid.UUID
    created_at: dt.datetime


@dataclasses.dataclass(frozen=True, slots=True)
class Feedback:
    """One user's rating of one answer."""

    id: uuid.UUID
    message_id: uuid.UUID
    user_id: uuid.UUID
    rating: str
    comment: str | None
    created_at: dt.datetime
    updated_at: dt.datetime

    def to_public(self) -> dict[str, Any]:
        """The feedback as its author sees it."""
        return {"message_id": str(self.message_id), "rating": self.rating, "comment": self.comment,
                "created_at": self.created_at.isoformat(), "updated_at": self.updated_at.isoformat()}


@dataclasses.dataclass(frozen=True, slots=True)
class FeedbackEntry:
    """A feedback row as administrators list it: with its conversation and the answer's beginning."""

    id: uuid.UUID
    message_id: uuid.UUID
    conversation_id: uuid.UUID
    rating: str
    comment: str | None
    excerpt: str
    model: str | None
    created_at: dt.datetime
    updated_at: dt.datetime

    def to_public(self) -> dict[str, Any]:
        """The entry as the admin view shows it."""
        return {"id": str(self.id), "message_id": str(self.message_id),
                "conversation_id": str(self.conversation_id), "rating": self.rating, "comment": self.comment,
                "excerpt": self.excerpt, "model": self.model, "created_at": self.created_at.isoformat(),
                "updated_at": self.updated_at.isoformat()}


# --- search ---------------------------------------------------------------------------------------

async def search_conversations(conn: asyncpg.Connection, user_id: uuid.UUID, words: str,
                               after: tuple[dt.datetime, uuid.UUID] | None, limit: int) -> list[SearchHit]:
    """The user's conversations whose title or a message matches `words` (web search syntax),
    most recently active first, after the keyset position `after`."""
    at, row_id = after if after is not None else (None, None)
    rows = await conn.fetch(SEARCH_SQL, user_id, words, at, row_id, limit, HEADLINE_OPTIONS)
    columns = CONVERSATION_COLUMNS.split(", ")
    return [SearchHit(Conversation(**{name: row[name] for name in columns}), row["message_id"], row["snippet"])
            for row in rows]


# --- shares ---------------------------------------------------------------------------------------

async def get_share(conn: asyncpg.Connection, conversation_id: uuid.UUID) -> Share | None:
    """A conversation's share, if it has one."""
    row = await conn.fetchrow(
        "SELECT conversation_id, created_at FROM ai_conversation_shares WHERE conversation_id = $1", conversation_id)
    return Share(**row) if row is not None else None


async def create_share(conn: asyncpg.Connection, conversation_id: uuid.UUID, token_hash: bytes) -> Share | None:
    """Share a conversation under a token's hash; None when it is shared already (the link stays)."""
    row = await conn.fetchrow(
        """INSERT INTO ai_conversation_shares (conversation_id, token_hash) VALUES ($1, $2)
           ON CONFLICT (conversation_id) DO NOTHING RETURNING conversation_id, created_at""",
        conversation_id, token_hash)
    return Share(**row) if row is not None else None


async def delete_share(conn: asyncpg.Connection, conversation_id: uuid.UUID) -> bool:
    """Revoke a conversation's share; whether there was one."""
    status = await conn.execute("DELETE FROM ai_conversation_shares WHERE conversation_id = $1", conversation_id)
    return status.endswith(" 1")


async def shared_conversation(conn: asyncpg.Connection, token_hash: bytes) -> tuple[Conversation, Share] | None:
    """The conversation shared under a token's hash, with its share."""
    row = await conn.fetchrow(
        f"""SELECT {_C}, s.created_at AS shared_at FROM ai_conversation_shares s
              JOIN ai_conversations c ON c.id = s.conversation_id
             WHERE s.token_hash = $1""", token_hash)
    if row is None:
        return None
    conversation = Conversation(**{name: row[name] for name in CONVERSATION_COLUMNS.split(", ")})
    return conversation, Share(conversation.id, row["shared_at"])


# --- feedback -------------------------------------------------------------------------------------

_FEEDBACK = "id, message_id, user_id, rating, comment, created_at, updated_at"


async def put_feedback(conn: asyncpg.Connection, message_id: uuid.UUID, user_id: uuid.UUID, rating: str,
                       comment: str | None) -> Feedback:
    """Record or replace the user's rating of an answer."""
    return Feedback(**await conn.fetchrow(
        f"""INSERT INTO ai_message_feedback (message_id, user_id, rating, comment) VALUES ($1, $2, $3, $4)
            ON CONFLICT (message_id, user_id)
            DO UPDATE SET rating = EXCLUDED.rating, comment = EXCLUDED.comment, updated_at = now()
            RETURNING {_FEEDBACK}""", message_id, user_id, rating, comment))


async def feedback_on(conn: asyncpg.Connection, user_id: uuid.UUID, message_ids: list[uuid.UUID]) -> list[Feedback]:
    """The user's ratings of these answers (those rated only)."""
    rows = await conn.fetch(
        f"SELECT {_FEEDBACK} FROM ai_message_feedback WHERE user_id = $1 AND message_id = ANY($2::uuid[])",
        user_id, message_ids)
    return [Feedback(**row) for row in rows]


async def delete_feedback(conn: asyncpg.Connection, message_id: uuid.UUID, user_id: uuid.UUID) -> bool:
    """Withdraw the user's rating of an answer; whether there was one."""
    status = await conn.execute(
        "DELETE FROM ai_message_feedback WHERE message_id = $1 AND user_id = $2", message_id, user_id)
    return status.endswith(" 1")


async def list_feedback(conn: asyncpg.Connection, rating: str | None, after: tuple[dt.datetime, uuid.UUID] | None,
                        limit: int) -> list[FeedbackEntry]:
    """Feedback of every user, newest first (optionally one rating), after the keyset position `after`."""
    at, row_id = after if after is not None else (None, None)
    rows = await conn.fetch(
        f"""SELECT f.id, f.message_id, m.conversation_id, f.rating, f.comment,
                   left(m.content, {EXCERPT_CHARS}) AS excerpt, m.model, f.created_at, f.updated_at
              FROM ai_message_feedback f JOIN ai_messages m ON m.id = f.message_id
             WHERE ($1::text IS NULL OR f.rating = $1)
               AND ($2::timestamptz IS NULL OR (f.updated_at, f.id) < ($2, $3::uuid))
             ORDER BY f.updated_at DESC, f.id DESC LIMIT $4""", rating, at, row_id, limit)
    return [FeedbackEntry(**row) for row in rows]
