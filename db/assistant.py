"""Queries on assistant conversations and messages (`ai_conversations`, `ai_messages`), and the
read-only marketplace queries behind the assistant's tools.

Messages form a tree (`parent_id`); a conversation's branch is the path from the root to its
`current_leaf_id`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from typing import Any

import asyncpg

from server.core.money import plain_decimal

CONVERSATION_COLUMNS = ("id, user_id, title, total_tokens, current_leaf_id, created_at, updated_at, model, "
                        "system_prompt, title_auto")
MESSAGE_COLUMNS = ("id, conversation_id, parent_id, role, content, status, model, finish_reason, "
                   "prompt_tokens, completion_tokens, tokens, tokens_estimated, tool_calls, error, "
                   "client_msg_id, seq, created_at, updated_at")


def _aliased(alias: str) -> str:
    """MESSAGE_COLUMNS, each qualified by a table alias (for queries that join ai_messages)."""
    return ", ".join(f"{alias}.{column}" for column in MESSAGE_COLUMNS.split(", "))


M_MESSAGE_COLUMNS, P_MESSAGE_COLUMNS = _aliased("m"), _aliased("p")


@dataclasses.dataclass(frozen=True, slots=True)
class Conversation:
    """One user's conversation; its current branch ends at `current_leaf_id`."""

    id: uuid.UUID
    user_id: uuid.UUID
    title: str | None
    total_tokens: int
    current_leaf_id: uuid.UUID | None
    created_at: dt.datetime
    updated_at: dt.datetime
    model: str | None = None  # None: AI_MODEL
    system_prompt: str | None = None
    title_auto: bool = False  # the title was given by the server, not the user

    def to_public(self) -> dict[str, Any]:
        """The conversation as the protocol shows it."""
        return {"id": str(self.id), "title": self.title, "total_tokens": self.total_tokens,
                "current_leaf_id": str(self.current_leaf_id) if self.current_leaf_id else None,
                "created_at": self.created_at.isoformat(), "updated_at": self.updated_at.isoformat(),
                "model": self.model, "system_prompt": self.system_prompt}


@dataclasses.dataclass(frozen=True, slots=True)
class Message:
    """A user's message or an answer (`role`), one node of its conversation's tree."""

    id: uuid.UUID
    conversation_id: uuid.UUID
    parent_id: uuid.UUID | None
    role: str
    content: str
    status: str
    model: str | None
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    tokens: int | None
    tokens_estimated: bool
    tool_calls: list[dict[str, Any]] | None
    error: dict[str, Any] | None
    client_msg_id: str | None
    seq: int
    created_at: dt.datetime
    updated_at: dt.datetime
    user_id: uuid.UUID | None = None  # the conversation's owner (read by `get_message` only)
    sibling_ids: list[uuid.UUID] | None = None  # the versions at its place (read by `branch` only)

    def to_public(self) -> dict[str, Any]:
        """The message as the protocol shows it."""
        usage = None
        if self.role == "assistant" and self.tokens is not None:
            usage = {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                     "total_tokens": self.tokens, "estimated": self.tokens_estimated}
        out = {"id": str(self.id), "conversation_id": str(self.conversation_id),
               "parent_id": str(self.parent_id) if self.parent_id else None,
               "role": self.role, "content": self.content, "status": self.status,
               "model": self.model, "finish_reason": self.finish_reason, "usage": usage,
               "tool_calls": self.tool_calls, "error": self.error,
               "client_msg_id": self.client_msg_id, "seq": self.seq,
               "created_at": self.created_at.isoformat()}
        if self.sibling_ids is not None:
            out["sibling_ids"] = [str(s) for s in self.sibling_ids]
        return out


@dataclasses.dataclass(frozen=True, slots=True)
class InterruptedAnswer:
    """An answer the sweep marked interrupted (its job's process stopped saving it)."""

    id: uuid.UUID
    conversation_id: uuid.UUID
    seq: int


def _conversation(row: asyncpg.Record | None) -> Conversation | None:
    return Conversation(**row) if row is not None else None


def _message(row: asyncpg.Record | None) -> Message | None:
    return Message(**row) if row is not None else None


# --- conversations --------------------------------------------------------------------------------

async def conversation_owner(conn: asyncpg.Connection, conversation_id: uuid.UUID) -> uuid.UUID | None:
    """The user who owns a conversation; None when there is no such conversation."""
    return await conn.fetchval("SELECT user_id FROM ai_conversations WHERE id = $1", conversation_id)


async def create_conversation(conn: asyncpg.Connection, user_id: uuid.UUID, title: str | None,
                              model: str | None = None, system_prompt: str | None = None) -> Conversation:
    """A new conversation of the user (`model` None: AI_MODEL)."""
    return Conversation(**await conn.fetchrow(
        f"""INSERT INTO ai_conversations (user_id, title, model, system_prompt) VALUES ($1, $2, $3, $4)
            RETURNING {CONVERSATION_COLUMNS}""", user_id, title, model, system_prompt))


async def get_conversation(conn: asyncpg.Connection, conversation_id: uuid.UUID, *,
                           for_update: bool = False) -> Conversation | None:
    lock = " FOR UPDATE" if for_update else ""
    return _conversation(await conn.fetchrow(
        f"SELECT {CONVERSATION_COLUMNS} FROM ai_conversations WHERE id = $1{lock}", conversation_id))


async def list_conversations(conn: asyncpg.Connection, user_id: uuid.UUID, limit: int,
                             before: Any | None) -> list[Conversation]:
    """The user's conversations, most recently active first (keyset on updated_at)."""
    rows = await conn.fetch(
        f"""SELECT {CONVERSATION_COLUMNS} FROM ai_conversations
             WHERE user_id = $1 AND ($2::timestamptz IS NULL OR updated_at < $2)
             ORDER BY updated_at DESC, id DESC LIMIT $3""", user_id, before, limit)
    return [Conversation(**row) for row in rows]


async def rename_conversation(conn: asyncpg.Connection, conversation_id: uuid.UUID,
                              title: str) -> Conversation | None:
    """The user's own title: no automatic title replaces it."""
    return _conversation(await conn.fetchrow(
        f"""UPDATE ai_conversations SET title = $2, title_auto = false WHERE id = $1
            RETURNING {CONVERSATION_COLUMNS}""", conversation_id, title))


async def update_settings(conn: asyncpg.Connection, conversation_id: uuid.UUID, *, set_model: bool,
                          model: str | None, set_system_prompt: bool,
                          system_prompt: str | None) -> Conversation | None:
    """Change a conversation's model and/or system prompt (each only when its `set_` flag is true)."""
    return _conversation(await conn.fetchrow(
        f"""UPDATE ai_conversations SET model = CASE WHEN $2 THEN $3 ELSE model END,
                   system_prompt = CASE WHEN $4 THEN $5 ELSE system_prompt END
             WHERE id = $1 RETURNING {CONVERSATION_COLUMNS}""",
        conversation_id, set_model, model, set_system_prompt, system_prompt))


async def delete_conversation(conn: asyncpg.Connection, conversation_id: uuid.UUID) -> None:
    await conn.execute("DELETE FROM ai_conversations WHERE id = $1", conversation_id)


async def set_leaf(conn: asyncpg.Connection, conversation_id: uuid.UUID, leaf_id: uuid.UUID) -> None:
    await conn.execute("UPDATE ai_conversations SET current_leaf_id = $2 WHERE id = $1",
                       conversation_id, leaf_id)


# --- messages -------------------------------------------------------------------------------------

async def branch(conn: asyncpg.Connection, leaf_id: uuid.UUID | None) -> list[Message]:
    """The messages from the root to `leaf_id`, oldest first, each with its siblings' ids."""
    if leaf_id is None:
        return []
    rows = await conn.fetch(
        f"""WITH RECURSIVE path AS (
                SELECT m.*, 0 AS depth FROM ai_messages m WHERE m.id = $1
                UNION ALL
                SELECT m.*, p.depth + 1 FROM ai_messages m JOIN path p ON m.id = p.parent_id
            )
            SELECT {P_MESSAGE_COLUMNS},
                   ARRAY(SELECT s.id FROM ai_messages s
                          WHERE s.conversation_id = p.conversation_id
                            AND s.parent_id IS NOT DISTINCT FROM p.parent_id
                          ORDER BY s.created_at, s.id) AS sibling_ids
              FROM path p ORDER BY p.depth DESC""", leaf_id)
    return [Message(**row) for row in rows]


async def get_message(conn: asyncpg.Connection, message_id: uuid.UUID) -> Message | None:
    """A message with its conversation's owner (`user_id`)."""
    return _message(await conn.fetchrow(
        f"""SELECT {M_MESSAGE_COLUMNS}, c.user_id
              FROM ai_messages m JOIN ai_conversations c ON c.id = m.conversation_id
             WHERE m.id = $1""", message_id))


async def first_reply(conn: asyncpg.Connection, message_id: uuid.UUID) -> Message | None:
    """The first assistant answer to a user message (what a resent send_message returns)."""
    return _message(await conn.fetchrow(
        f"""SELECT {MESSAGE_COLUMNS} FROM ai_messages WHERE parent_id = $1 AND role = 'assistant'
             ORDER BY created_at, id LIMIT 1""", message_id))


async def newest_leaf_under(conn: asyncpg.Connection, message_id: uuid.UUID) -> uuid.UUID:
    """The most recently created leaf below a message (the message itself when it has none)."""
    return await conn.fetchval(
        """WITH RECURSIVE sub AS (
               SELECT id, created_at FROM ai_messages WHERE id = $1
               UNION ALL
               SELECT m.id, m.created_at FROM ai_messages m JOIN sub ON m.parent_id = sub.id
           )
           SELECT s.id FROM sub s
            WHERE NOT EXISTS (SELECT 1 FROM ai_messages c WHERE c.parent_id = s.id)
            ORDER BY s.created_at DESC, s.id DESC LIMIT 1""", message_id)


@dataclasses.dataclass(frozen=True, slots=True)
class StartedAnswer:
    """The rows an answer's start wrote: the user's message (none when regenerating) and the answer."""

    user_message: Message | None
    answer: Message


async def start_answer(conn: asyncpg.Connection, *, conversation_id: uuid.UUID, parent_id: uuid.UUID | None,
                       content: str | None, client_msg_id: str | None, model: str) -> StartedAnswer:
    """Insert the user's message (`content`, unless None) under `parent_id` and a streaming answer under
    it, and make the answer the conversation's current leaf: one statement."""
    rows = await conn.fetch(
        f"""WITH asked AS (
                INSERT INTO ai_messages (conversation_id, parent_id, role, content, client_msg_id)
                SELECT $1, $2, 'user', $3, $4 WHERE $3::text IS NOT NULL
                RETURNING {MESSAGE_COLUMNS}),
            answer AS (
                INSERT INTO ai_messages (conversation_id, parent_id, role, content, status, model)
                VALUES ($1, coalesce((SELECT id FROM asked), $2), 'assistant', '', 'streaming', $5)
                RETURNING {MESSAGE_COLUMNS}),
            leaf AS (UPDATE ai_conversations SET current_leaf_id = (SELECT id FROM answer) WHERE id = $1)
            SELECT * FROM asked UNION ALL SELECT * FROM answer""",
        conversation_id, parent_id, content, client_msg_id, model)
    messages = [Message(**row) for row in rows]
    return StartedAnswer(messages[0] if len(messages) == 2 else None, messages[-1])


async def save_partials(conn: asyncpg.Connection, saves: list[dict[str, Any]]) -> dict[uuid.UUID, bool]:
    """Save streaming answers' text so far ({id, content, seq} each; also their heartbeat) in one
    statement. Returns, for each answer still streaming, whether a stop was requested: one missing
    from it no longer streams (deleted, or swept as abandoned)."""
    rows = await conn.fetch(
        """UPDATE ai_messages m SET content = s.content, seq = s.seq
             FROM json_to_recordset($1::json) AS s(id uuid, content text, seq int)
            WHERE m.id = s.id AND m.status = 'streaming' RETURNING m.id, m.stop_requested""", saves)
    return {row["id"]: row["stop_requested"] for row in rows}


async def finish_message(conn: asyncpg.Connection, message_id: uuid.UUID, *, status: str, content: str, seq: int,
                         finish_reason: str | None, prompt_tokens: int | None, completion_tokens: int | None,
                         estimated: bool, tool_calls: list | None, error: dict | None,
                         title: str | None = None) -> tuple[Message | None, bool]:
    """Record a generation's final state (only while it is still streaming) and, with `title`, give
    its conversation that automatic title unless it has one; returns the message (None when it no
    longer streamed) and whether the title was set. One statement."""
    counted = prompt_tokens is not None or completion_tokens is not None
    total = (prompt_tokens or 0) + (completion_tokens or 0) if counted else None
    row = await conn.fetchrow(
        f"""WITH finished AS (
                UPDATE ai_messages SET status = $2, content = $3, seq = $4, finish_reason = $5,
                       prompt_tokens = $6, completion_tokens = $7, tokens = $8, tokens_estimated = $9,
                       tool_calls = $10, error = $11
                 WHERE id = $1 AND status = 'streaming' RETURNING {MESSAGE_COLUMNS}),
            titled AS (
                UPDATE ai_conversations SET title = $12, title_auto = true
                 WHERE id = (SELECT conversation_id FROM finished) AND $12::text IS NOT NULL
                   AND (title IS NULL OR title = '')
                RETURNING id)
            SELECT finished.*, EXISTS (SELECT FROM titled) AS titled FROM finished""",
        message_id, status, content, seq, finish_reason, prompt_tokens, completion_tokens, total, estimated,
        tool_calls, error, title)
    if row is None:
        return None, False
    fields = dict(row)
    titled = fields.pop("titled")
    return Message(**fields), titled


async def request_stop(conn: asyncpg.Connection, message_id: uuid.UUID) -> bool:
    """Flag a streaming answer to stop (its job, on whichever process, sees it at its next save)."""
    status = await conn.execute(
        "UPDATE ai_messages SET stop_requested = true WHERE id = $1 AND status = 'streaming'", message_id)
    return status.endswith(" 1")


async def interrupt_abandoned(conn: asyncpg.Connection, stale_after: float,
                              running_here: list[uuid.UUID]) -> list[InterruptedAnswer]:
    """Mark streaming answers whose job stopped saving (its process died) as interrupted; the
    jobs of the calling process are alive whatever their last save says."""
    rows = await conn.fetch(
        """UPDATE ai_messages SET status = 'interrupted', finish_reason = 'interrupted',
                  error = '{"code": "interrupted", "retryable": true}'::jsonb
            WHERE status = 'streaming' AND updated_at < now() - make_interval(secs => $1)
              AND NOT (id = ANY($2::uuid[]))
        RETURNING id, conversation_id, seq""", stale_after, running_here)
    return [InterruptedAnswer(**row) for row in rows]


async def lock_user_starts(conn: asyncpg.Connection, user_id: uuid.UUID, conversation_id: uuid.UUID,
                           client_msg_id: str | None) -> Message | None:
    """Serialise one user's answer starts across processes until the transaction ends, and return the
    conversation's message sent with `client_msg_id` before (a resend), if any: one round trip.

    Call with the conversation's row locked: a send of the same message waiting for that lock then
    finds the first one, committed before this statement's snapshot.
    """
    row = await conn.fetchrow(
        f"""SELECT {M_MESSAGE_COLUMNS} FROM (SELECT pg_advisory_xact_lock(hashtextextended($1, 7341))) AS locked
              LEFT JOIN ai_messages m ON m.conversation_id = $2 AND m.client_msg_id = $3""",
        str(user_id), conversation_id, client_msg_id)
    return _message(row) if row["id"] is not None else None


# The quota's day: since midnight UTC (started_at is timestamptz, compared as an instant).
_TODAY = "started_at >= date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'"


@dataclasses.dataclass(frozen=True, slots=True)
class UserUsage:
    """What limits a user's next answer: today's tokens (the daily quota's day, UTC), the answers
    started in the last minute (from `ai_usage`, which deleting a conversation does not touch)
    and the answer still being written, if any."""

    day: dt.date
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    reset_in: float  # seconds until the next midnight UTC
    started_last_minute: int
    oldest_start_age: float  # seconds since the oldest of those started (0 when none)
    streaming_id: uuid.UUID | None  # the user's running answer (one that still saves)


async def user_usage(conn: asyncpg.Connection, user_id: uuid.UUID, stale_after: float) -> UserUsage:
    """The user's usage and running answer, in one round trip (each answer's start and end read it)."""
    row = await conn.fetchrow(
        f"""SELECT (now() AT TIME ZONE 'UTC')::date AS day,
                   extract(epoch FROM date_trunc('day', now() AT TIME ZONE 'UTC') + interval '1 day'
                                      - (now() AT TIME ZONE 'UTC')) AS reset_in, today.*, minute.*,
                   (SELECT m.id FROM ai_messages m JOIN ai_conversations c ON c.id = m.conversation_id
                     WHERE c.user_id = $1 AND m.status = 'streaming'
                       AND m.updated_at >= now() - make_interval(secs => $2) LIMIT 1) AS streaming_id
              FROM (SELECT coalesce(sum(prompt_tokens), 0) AS prompt, coalesce(sum(completion_tokens), 0) AS completion,
                           coalesce(sum(tokens), 0) AS used
                      FROM ai_usage WHERE user_id = $1 AND {_TODAY}) today,
                   (SELECT count(*) AS started, extract(epoch FROM now() - min(started_at)) AS oldest
                      FROM ai_usage WHERE user_id = $1 AND started_at > now() - interval '60 seconds') minute""",
        user_id, stale_after)
    return UserUsage(row["day"], int(row["prompt"]), int(row["completion"]), int(row["used"]), float(row["reset_in"]),
                     row["started"], float(row["oldest"] or 0), row["streaming_id"])


@dataclasses.dataclass(frozen=True, slots=True)
class ConversationUsage:
    """One conversation's tokens today (its answers and its automatic title)."""

    conversation_id: uuid.UUID
    title: str | None
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    answers: int


async def usage_by_conversation_today(conn: asyncpg.Connection, user_id: uuid.UUID,
                                      limit: int) -> list[ConversationUsage]:
    """The user's existing conversations that used tokens today, most tokens first."""
    rows = await conn.fetch(
        f"""SELECT u.conversation_id, c.title, sum(u.prompt_tokens) AS prompt_tokens,
                   sum(u.completion_tokens) AS completion_tokens, sum(u.tokens) AS total_tokens,
                   count(*) FILTER (WHERE u.kind = 'answer') AS answers
              FROM ai_usage u JOIN ai_conversations c ON c.id = u.conversation_id AND c.user_id = u.user_id
             WHERE u.user_id = $1 AND {_TODAY.replace('started_at', 'u.started_at')}
             GROUP BY u.conversation_id, c.title
             ORDER BY sum(u.tokens) DESC, u.conversation_id LIMIT $2""", user_id, limit)
    return [ConversationUsage(**row) for row in rows]


async def record_title(conn: asyncpg.Connection, user_id: uuid.UUID, conversation_id: uuid.UUID,
                       prompt_tokens: int, completion_tokens: int, expected: str, title: str | None) -> bool:
    """Count the tokens of the model call that titled a conversation towards the user's quota and,
    with `title`, replace the automatic title `expected` by it; False when the title changed
    meanwhile (renamed by the user, or deleted). One statement."""
    return await conn.fetchval(
        """WITH counted AS (
               INSERT INTO ai_usage (message_id, user_id, conversation_id, prompt_tokens, completion_tokens,
                                     tokens, kind)
               VALUES (gen_random_uuid(), $1, $2, $3, $4, $3::int + $4::int, 'title')),
           replaced AS (
               UPDATE ai_conversations SET title = $6
                WHERE id = $2 AND $6::text IS NOT NULL AND title_auto AND title = $5 RETURNING id)
           SELECT EXISTS (SELECT FROM replaced)""",
        user_id, conversation_id, prompt_tokens, completion_tokens, expected, title)


# --- read-only marketplace queries for the tools ------------------------------------------------

_POD_SUMMARY = """d.id, d.title, d.category, d.price_sui, d.average_rating, d.purchase_count,
                  left(coalesce(d.description, ''), 300) AS description"""


def pod_summary(row: asyncpg.Record) -> dict[str, Any]:
    return {"datapod_id": str(row["id"]), "title": row["title"], "category": row["category"],
            "price_sui": plain_decimal(row["price_sui"]),
            "average_rating": float(row["average_rating"]), "purchase_count": row["purchase_count"],
            "description": row["description"]}


async def search_datapods(conn: asyncpg.Connection, query: str | None, category: str | None,
                          min_price: Any | None, max_price: Any | None, limit: int) -> list[dict[str, Any]]:
    """Published DataPods matching any word of `query` (full text, best match first)."""
    rows = await conn.fetch(
        f"""WITH q AS (
                SELECT CASE WHEN count(*) = 0 THEN NULL
                            ELSE to_tsquery('simple', string_agg(quote_literal(lexeme), ' | ')) END AS tsq
                  FROM unnest(to_tsvector('english', coalesce($1, '')))
            )
            SELECT {_POD_SUMMARY}, CASE WHEN q.tsq IS NULL THEN 0 ELSE ts_rank(d.search_vector, q.tsq) END AS rank
              FROM datapods d, q
             WHERE d.published
               AND (q.tsq IS NULL OR d.search_vector @@ q.tsq)
               AND ($2::text IS NULL OR lower(d.category) = lower($2))
               AND ($3::numeric IS NULL OR d.price_sui >= $3)
               AND ($4::numeric IS NULL OR d.price_sui <= $4)
             ORDER BY rank DESC, d.average_rating DESC, d.purchase_count DESC, d.created_at DESC
             LIMIT $5""", query, category, min_price, max_price, limit)
    return [pod_summary(row) for row in rows]


async def get_datapod(conn: asyncpg.Connection, datapod_id: uuid.UUID) -> dict[str, Any] | None:
    """A published DataPod's public details: schema, a few sample rows, price, rating."""
    row = await conn.fetchrow(
        f"""SELECT {_POD_SUMMARY}, d."schema", d.sample_data, d.file_type, d.file_size, d.created_at,
                   u.username AS seller
              FROM datapods d LEFT JOIN users u ON u.id = d.seller_id
             WHERE d.id = $1 AND d.published""", datapod_id)
    if row is None:
        return None
    sample = row["sample_data"]
    return {**pod_summary(row), "schema": row["schema"],
            "sample_rows": sample[:5] if isinstance(sample, list) else sample,
            "file_type": row["file_type"], "file_size": row["file_size"], "seller": row["seller"],
            "created_at": row["created_at"].isoformat()}


async def list_categories(conn: asyncpg.Connection) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        """SELECT category, count(*) AS datapods, min(price_sui) AS min_price, max(price_sui) AS max_price
             FROM datapods WHERE published AND category IS NOT NULL
            GROUP BY category ORDER BY count(*) DESC, category""")
    return [{"category": r["category"], "datapods": r["datapods"],
             "min_price_sui": plain_decimal(r["min_price"]), "max_price_sui": plain_decimal(r["max_price"])}
            for r in rows]


async def my_purchases(conn: asyncpg.Connection, user_id: uuid.UUID, limit: int = 20) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        """SELECT p.id, p.datapod_id, d.title, p.status, p.amount_sui, p.created_at
             FROM purchases p JOIN datapods d ON d.id = p.datapod_id
            WHERE p.buyer_id = $1 ORDER BY p.created_at DESC LIMIT $2""", user_id, limit)
    return [{"purchase_id": str(r["id"]), "datapod_id": str(r["datapod_id"]), "title": r["title"],
             "status": r["status"], "amount_sui": plain_decimal(r["amount_sui"]),
             "purchased_at": r["created_at"].isoformat()} for r in rows]
