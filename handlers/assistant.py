"""Namespace /assistant: AI assistant: conversations and streamed answers (a signed-in user only).

Every command reads or changes only the caller's own conversations (`forbidden` otherwise); the
rules live in server/services/assistant.py. Commands that start an answer subscribe the calling
connection to the conversation's channel before its job starts, so it misses no event.
"""

from __future__ import annotations

import asyncio
import functools
import re
from typing import Any

from aiohttp import web

from server.core import jsonutil, protocol
from server.core.errors import HubError, InvalidPayload, NotFound
from server.edge.namespace import Ctx, HubNamespace, command
from server.edge.rest import client_ip, endpoint, int_query, ok_response, query_payload, session_lives
from server.edge.schemas import COUNT, PAGE_LIMIT, UUID, compile_schema, obj, string
from server.realtime.hub import SIGNED_OUT_EVENT, USER_CHANNEL, ChannelRule, own_user
from server.realtime.redis import REDIS
from server.services import assistant as service
from server.services import assistant_history as history
from server.services.assistant import (
    CONVERSATION_CHANNEL,
    FINAL_EVENTS,
    MESSAGE_ACCEPTED,
    MESSAGE_DELTA,
    own_conversation,
)

MAX_CONTENT_SCHEMA_CHARS = 1_000_000  # the configurable limit (AI_MAX_INPUT_CHARS) is checked in code
CLIENT_MSG_ID = string(1, 100)
CONTENT = string(1, MAX_CONTENT_SCHEMA_CHARS)
TITLE = string(1, 255)
MODEL = {"type": ["string", "null"], "minLength": 1, "maxLength": 200}  # null: AI_MODEL
# The configurable limit (AI_SYSTEM_PROMPT_MAX_CHARS) is checked in code.
SYSTEM_PROMPT = {"type": ["string", "null"], "maxLength": MAX_CONTENT_SCHEMA_CHARS}
CREATE_CONVERSATION_SCHEMA = {"anyOf": [{"type": "null"}, obj({"title": TITLE, "model": MODEL,
                                                               "system_prompt": SYSTEM_PROMPT})]}
LIST_CONVERSATIONS_SCHEMA = {"anyOf": [{"type": "null"}, obj({
    "limit": {"type": "integer", "minimum": 1, "maximum": 100},
    "before": {"type": "string", "format": "date-time", "maxLength": 40}})]}
CONVERSATION_REF = obj({"conversation_id": UUID}, required=("conversation_id",))
MESSAGE_REF = obj({"message_id": UUID}, required=("message_id",))
RENAME_SCHEMA = obj({"conversation_id": UUID, "title": TITLE}, required=("conversation_id", "title"))
SEND_SCHEMA = obj({"conversation_id": UUID, "content": CONTENT, "client_msg_id": CLIENT_MSG_ID},
                  required=("conversation_id", "content", "client_msg_id"))
EDIT_SCHEMA = obj({"message_id": UUID, "content": CONTENT, "client_msg_id": CLIENT_MSG_ID},
                  required=("message_id", "content"))
RESUME_SCHEMA = obj({"message_id": UUID, "after_seq": COUNT},
                    required=("message_id", "after_seq"))
REST_SEND_SCHEMA = obj({"content": CONTENT, "client_msg_id": CLIENT_MSG_ID, "stream": {"type": "boolean"}},
                       required=("content", "client_msg_id"))
DEFAULT_PAGE = 50
CONVERSATION_PATH = {"conversation_id": UUID}
MESSAGE_PATH = {"message_id": UUID}


def _rest_body(schema: dict, path_field: str) -> dict:
    """A socket command's schema as its REST body: the id it names moves to the URL path."""
    return obj({name: value for name, value in schema["properties"].items() if name != path_field},
               required=tuple(name for name in schema["required"] if name != path_field))


UPDATE_SCHEMA = obj({"conversation_id": UUID, "title": TITLE, "model": MODEL, "system_prompt": SYSTEM_PROMPT},
                    required=("conversation_id",), minProperties=2)
REST_UPDATE_SCHEMA = {**_rest_body(UPDATE_SCHEMA, "conversation_id"), "minProperties": 1}
REST_EDIT_SCHEMA = _rest_body(EDIT_SCHEMA, "message_id")
# `from` is resume_stream's `after_seq`: the number of deltas the client already has.
REST_STREAM_QUERY = obj({"from": RESUME_SCHEMA["properties"]["after_seq"]})

# History: search, export, share, feedback (server/services/assistant_history.py).
SEARCH_SCHEMA = obj({"q": string(1, history.SEARCH_MAX_CHARS), "limit": PAGE_LIMIT, "cursor": string(1, 200)},
                    required=("q",))
EXPORT_SCHEMA = obj({"conversation_id": UUID, "format": {"enum": list(history.EXPORT_FORMATS)}},
                    required=("conversation_id", "format"))
RATING = {"enum": list(history.RATINGS)}
FEEDBACK_SCHEMA = obj({"message_id": UUID, "rating": RATING,
                       "comment": {"type": ["string", "null"], "maxLength": history.FEEDBACK_COMMENT_MAX_CHARS}},
                      required=("message_id", "rating"))
REST_FEEDBACK_SCHEMA = _rest_body(FEEDBACK_SCHEMA, "message_id")
REST_EXPORT_QUERY = _rest_body(EXPORT_SCHEMA, "conversation_id")
FEEDBACK_LIST_QUERY = obj({"rating": RATING, "cursor": string(1, 200), "limit": PAGE_LIMIT})
SHARE_TOKEN_RE = re.compile("^[A-Za-z0-9_-]{16,100}$")  # secrets.token_urlsafe's alphabet
SHARE_TOKEN_PATH = {"token": string(16, 100, pattern=SHARE_TOKEN_RE.pattern)}


class AssistantNamespace(HubNamespace):
    """AI assistant: conversations and streamed answers (a signed-in user only)."""

    name = "/assistant"
    allow_anonymous = False
    channels = (
        ChannelRule(CONVERSATION_CHANNEL, own_conversation),
        ChannelRule(USER_CHANNEL, own_user),
    )
    events = (service.CONVERSATION_CREATED, service.CONVERSATION_TITLED, service.CONVERSATION_DELETED,
              service.MESSAGE_STARTED, service.CONTEXT_TRIMMED, service.MESSAGE_DELTA, service.TOOL_CALLED,
              service.TOOL_RETURNED, service.MESSAGE_COMPLETED, service.MESSAGE_FAILED, service.USAGE_CHANGED)

    def _watch(self, ctx: Ctx) -> service.Watch:
        """What a start calls before the job runs: the caller joins the answer's conversation (the
        start found it the caller's)."""
        return lambda gen: self.join_owned(ctx.sid, gen.channel)

    # --- conversations ----------------------------------------------------------------------------

    @command(CREATE_CONVERSATION_SCHEMA)
    async def on_create_conversation(self, ctx: Ctx, payload: dict | None) -> dict:
        """A new, empty conversation (titled automatically after the first answer unless given),
        optionally with its `model` and `system_prompt`."""
        payload = payload or {}
        return await service.create_conversation(self.app, ctx.user_id, payload.get("title"), payload.get("model"),
                                                 payload.get("system_prompt"))

    @command(LIST_CONVERSATIONS_SCHEMA)
    async def on_list_conversations(self, ctx: Ctx, payload: dict | None) -> dict:
        """The caller's conversations, most recently active first; page with `before`."""
        payload = payload or {}
        return await service.list_conversations(self.app, ctx.user_id, payload.get("limit", DEFAULT_PAGE),
                                                payload.get("before"))

    @command(CONVERSATION_REF)
    async def on_get_conversation(self, ctx: Ctx, payload: dict) -> dict:
        """The conversation and the messages of its current branch, oldest first."""
        return await service.get_conversation(self.app, ctx.user_id, payload["conversation_id"])

    @command(RENAME_SCHEMA)
    async def on_rename_conversation(self, ctx: Ctx, payload: dict) -> dict:
        """Rename a conversation (whitespace collapsed); `conversation_titled` announces it."""
        return await service.rename_conversation(self.app, ctx.user_id, payload["conversation_id"],
                                                 payload["title"])

    @command(CONVERSATION_REF)
    async def on_delete_conversation(self, ctx: Ctx, payload: dict) -> dict:
        """Delete a conversation and its messages; a running answer in it is dropped."""
        return await service.delete_conversation(self.app, ctx.user_id, payload["conversation_id"])

    # --- messages ---------------------------------------------------------------------------------

    @command(SEND_SCHEMA)
    async def on_send_message(self, ctx: Ctx, payload: dict) -> dict:
        """Add the user's message to the current branch and start the answer.

        Idempotent on `client_msg_id`: resending returns the first send's messages, starts nothing.
        """
        return await service.send_message(self.app, ctx.user_id, payload["conversation_id"], payload["content"],
                                          payload["client_msg_id"], self._watch(ctx))

    @command(EDIT_SCHEMA)
    async def on_edit_message(self, ctx: Ctx, payload: dict) -> dict:
        """Fork: a new version of one of the user's messages (a sibling of it) and a new answer;
        the new branch becomes the current one. The old branch stays (`switch_branch`)."""
        return await service.edit_message(self.app, ctx.user_id, payload["message_id"], payload["content"],
                                          payload.get("client_msg_id"), self._watch(ctx))

    @command(MESSAGE_REF)
    async def on_regenerate(self, ctx: Ctx, payload: dict) -> dict:
        """A new answer to the same user message (a sibling of the given answer), made current."""
        return await service.regenerate(self.app, ctx.user_id, payload["message_id"], self._watch(ctx))

    @command(MESSAGE_REF)
    async def on_switch_branch(self, ctx: Ctx, payload: dict) -> dict:
        """Make the branch through this message current (down to its newest leaf)."""
        return await service.switch_branch(self.app, ctx.user_id, payload["message_id"])

    @command(MESSAGE_REF)
    async def on_stop_generation(self, ctx: Ctx, payload: dict) -> dict:
        """Stop an answer: the upstream stream is closed and the partial text kept as `stopped`.

        On the process that runs the job the ack comes after the answer is saved; elsewhere the
        job sees the request at its next save (within half a second) and the ack says
        `stopping`. Stopping a finished answer changes nothing.
        """
        return await service.stop_generation(self.app, ctx.user_id, payload["message_id"])

    @command(RESUME_SCHEMA)
    async def on_resume_stream(self, ctx: Ctx, payload: dict) -> dict:
        """What the client missed of an answer after delta `after_seq`; subscribes it first.

        `reset: false`: `deltas` continue exactly after `after_seq`. `reset: true`: replace the
        text with `content` (the answer up to `seq`), then apply `deltas`. Live deltas follow on
        the channel; drop those with `seq` <= the last one applied.
        """
        return await service.resume_stream(self.app, ctx.user_id, payload["message_id"], payload["after_seq"],
                                           functools.partial(self.join_owned, ctx.sid))

    # --- settings and usage: a conversation's model and system prompt, the day's tokens --------------

    @command(UPDATE_SCHEMA)
    async def on_update_conversation(self, ctx: Ctx, payload: dict) -> dict:
        """Change a conversation's `title`, `model` and/or `system_prompt` (only the fields given)."""
        return await service.update_conversation(self.app, ctx.user_id, payload["conversation_id"],
                                                 {k: v for k, v in payload.items() if k != "conversation_id"})

    @command(None)
    async def on_list_models(self, ctx: Ctx, payload: dict | None) -> dict:
        """The models a conversation may choose (the endpoint's, filtered by AI_MODEL_ALLOWLIST)."""
        return await service.list_models(self.app)

    @command(None)
    async def on_get_usage(self, ctx: Ctx, payload: dict | None) -> dict:
        """The caller's tokens today, the daily quota and what remains, the rate limit, by conversation."""
        return await service.get_usage(self.app, ctx.user_id)

    # --- history: search, export, share, feedback -------------------------------------------------

    @command(SEARCH_SCHEMA)
    async def on_search_conversations(self, ctx: Ctx, payload: dict) -> dict:
        """Full-text search of the caller's conversations (titles and messages), most recently active first."""
        return await history.search_conversations(self.app, ctx.user_id, payload["q"],
                                                  payload.get("limit", DEFAULT_PAGE), payload.get("cursor"))

    @command(EXPORT_SCHEMA)
    async def on_export_conversation(self, ctx: Ctx, payload: dict) -> dict:
        """The conversation's current branch as a Markdown or JSON document (its text in `content`)."""
        return await history.export_conversation(self.app, ctx.user_id, payload["conversation_id"],
                                                 payload["format"])

    @command(CONVERSATION_REF)
    async def on_share_conversation(self, ctx: Ctx, payload: dict) -> dict:
        """A read-only link to the conversation (its token is shown only when created)."""
        return await history.share_conversation(self.app, ctx.user_id, payload["conversation_id"])

    @command(CONVERSATION_REF)
    async def on_unshare_conversation(self, ctx: Ctx, payload: dict) -> dict:
        """Revoke the conversation's read-only link."""
        return await history.unshare_conversation(self.app, ctx.user_id, payload["conversation_id"])

    @command(FEEDBACK_SCHEMA)
    async def on_give_feedback(self, ctx: Ctx, payload: dict) -> dict:
        """Rate an answer `up` or `down` (an optional comment); replaces the caller's earlier rating."""
        return await history.give_feedback(self.app, ctx.user_id, payload["message_id"], payload["rating"],
                                           payload.get("comment"))

    @command(MESSAGE_REF)
    async def on_withdraw_feedback(self, ctx: Ctx, payload: dict) -> dict:
        """Withdraw the caller's rating of an answer."""
        return await history.withdraw_feedback(self.app, ctx.user_id, payload["message_id"])


# --- REST fallback ----------------------------------------------------------------------------------

routes = web.RouteTableDef()
SSE_KEEPALIVE_SECONDS = 15.0
# With Redis, another process may write the answer: its deltas reach this one's history but do not
# wake the reader, so the stream re-reads the history this often (a short poll, cheap: one XRANGE).
CROSS_NODE_POLL_SECONDS = 0.2


@routes.get("/api/v1/conversations")
@endpoint(auth="user", query=LIST_CONVERSATIONS_SCHEMA["anyOf"][1])
async def handle_list_conversations(request: web.Request, identity) -> web.Response:
    """The caller's conversations, most recently active first; page with `before`."""
    try:
        limit = int(request.query.get("limit", str(DEFAULT_PAGE)))
    except ValueError:
        raise InvalidPayload("limit must be an integer", field="limit") from None
    if not 1 <= limit <= 100:
        raise InvalidPayload("limit must be between 1 and 100", field="limit")
    return ok_response(await service.list_conversations(request.app, identity.user_id, limit,
                                                        request.query.get("before")))


@routes.post("/api/v1/conversations")
@endpoint(body=CREATE_CONVERSATION_SCHEMA, auth="user")
async def handle_create_conversation(request: web.Request, identity, body) -> web.Response:
    """A new, empty conversation (see `on_create_conversation`)."""
    body = body or {}
    return ok_response(await service.create_conversation(request.app, identity.user_id, body.get("title"),
                                                         body.get("model"), body.get("system_prompt")), 201)


@routes.get("/api/v1/conversations/{conversation_id}/messages")
@endpoint(auth="user", path=CONVERSATION_PATH)
async def handle_get_messages(request: web.Request, identity) -> web.Response:
    """The conversation and the messages of its current branch, oldest first."""
    return ok_response(await service.get_conversation(request.app, identity.user_id,
                                                      request.match_info["conversation_id"]))


@routes.post("/api/v1/conversations/{conversation_id}/messages")
@endpoint(body=REST_SEND_SCHEMA, auth="user", path=CONVERSATION_PATH)
async def handle_send_message(request: web.Request, identity, body) -> web.StreamResponse:
    """Send a message; the answer streams back as Server-Sent Events, or as JSON when stream=false."""
    listener = service.AnswerListener()
    result = await service.send_message(request.app, identity.user_id, request.match_info["conversation_id"],
                                        body["content"], body["client_msg_id"], listener.watch)
    if not listener.started:  # a resend: its answer runs or ran already
        return ok_response(result)
    if body.get("stream", True) is False:
        return ok_response({**result, "assistant_message": await listener.final_answer(request.app)})
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)
    try:
        await response.write(_sse(MESSAGE_ACCEPTED, result))
        while True:
            try:
                type_, data = await asyncio.wait_for(listener.events.get(), SSE_KEEPALIVE_SECONDS)
            except asyncio.TimeoutError:
                await response.write(b": keepalive\n\n")
                continue
            await response.write(_sse(type_, data, data.get("seq") if type_ == MESSAGE_DELTA else None))
            if type_ in FINAL_EVENTS:
                break
    except (ConnectionResetError, asyncio.CancelledError):
        pass  # the client went away; the answer goes on (resume_stream, GET .../messages)
    finally:
        listener.close()
    return response


@routes.get("/api/v1/conversations/{conversation_id}")
@endpoint(auth="user", path=CONVERSATION_PATH)
async def handle_get_conversation(request: web.Request, identity) -> web.Response:
    """The conversation and the messages of its current branch (see `on_get_conversation`)."""
    return ok_response(await service.get_conversation(request.app, identity.user_id,
                                                      request.match_info["conversation_id"]))


@routes.patch("/api/v1/conversations/{conversation_id}")
@endpoint(body=REST_UPDATE_SCHEMA, auth="user", path=CONVERSATION_PATH)
async def handle_update_conversation(request: web.Request, identity, body) -> web.Response:
    """Rename a conversation, or change its model or system prompt (see `on_update_conversation`)."""
    return ok_response(await service.update_conversation(request.app, identity.user_id,
                                                         request.match_info["conversation_id"], body))


@routes.delete("/api/v1/conversations/{conversation_id}")
@endpoint(auth="user", path=CONVERSATION_PATH)
async def handle_delete_conversation(request: web.Request, identity) -> web.Response:
    """Delete a conversation and its messages (see `on_delete_conversation`)."""
    return ok_response(await service.delete_conversation(request.app, identity.user_id,
                                                         request.match_info["conversation_id"]))


async def _no_watch(gen: service.Generation) -> None:
    """A REST start's watch: nothing to subscribe; the client follows with GET .../stream?from=0."""


@routes.patch("/api/v1/messages/{message_id}")
@endpoint(body=REST_EDIT_SCHEMA, auth="user", path=MESSAGE_PATH)
async def handle_edit_message(request: web.Request, identity, body) -> web.Response:
    """Fork: a new version of the user's message and a new answer, made current (see `on_edit_message`)."""
    return ok_response(await service.edit_message(request.app, identity.user_id, request.match_info["message_id"],
                                                  body["content"], body.get("client_msg_id"), _no_watch))


@routes.post("/api/v1/messages/{message_id}/regenerate")
@endpoint(auth="user", path=MESSAGE_PATH)
async def handle_regenerate(request: web.Request, identity) -> web.Response:
    """A new answer to the same user message, made current (see `on_regenerate`)."""
    return ok_response(await service.regenerate(request.app, identity.user_id, request.match_info["message_id"],
                                                _no_watch))


@routes.post("/api/v1/messages/{message_id}/switch")
@endpoint(auth="user", path=MESSAGE_PATH)
async def handle_switch_branch(request: web.Request, identity) -> web.Response:
    """Make the branch through this message current (see `on_switch_branch`)."""
    return ok_response(await service.switch_branch(request.app, identity.user_id, request.match_info["message_id"]))


@routes.get("/api/v1/messages/{message_id}/stream")
@endpoint(auth="user", path=MESSAGE_PATH, query=REST_STREAM_QUERY)
async def handle_answer_stream(request: web.Request, identity) -> web.StreamResponse:
    """An answer as Server-Sent Events: what resume_stream returns after delta `from` (or
    `Last-Event-ID`), then its live events, ending with `message_completed` or `message_failed`."""
    header = request.headers.get("Last-Event-ID")
    after_seq = int_query(request, "from", minimum=0) or 0
    if header is not None:  # a browser's EventSource reconnecting: the ids are delta seqs
        if not (header.isascii() and header.isdigit() and len(header) <= 10):
            raise InvalidPayload("Last-Event-ID must be a delta seq", field="Last-Event-ID")
        after_seq = int(header)
    poll = CROSS_NODE_POLL_SECONDS if request.app[REDIS] is not None else None
    events = service.follow_answer(request.app, identity.user_id, request.match_info["message_id"], after_seq,
                                   SSE_KEEPALIVE_SECONDS, poll)
    first = await anext(events)  # refusals (not_found, forbidden, bad id) answer as plain errors
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)
    try:
        await response.write(_sse(*first, first[1]["seq"]))  # ids are seqs: Last-Event-ID resumes
        async for item in events:
            if not await session_lives(request):
                # Signed out, revoked or suspended since the stream began: nothing more goes out.
                await response.write(_sse(SIGNED_OUT_EVENT, {"message_id": request.match_info["message_id"]}))
                break
            if item is None:
                await response.write(b": keepalive\n\n")
                continue
            await response.write(_sse(*item, item[1]["seq"] if item[0] == MESSAGE_DELTA else None))
    except HubError as error:  # the conversation was deleted meanwhile
        await response.write(_sse("error", error.to_error()))
    except ConnectionResetError:
        pass  # the client went away; the answer goes on
    finally:
        await events.aclose()
    return response


@routes.post("/api/v1/messages/{message_id}/stop")
@endpoint(auth="user", path=MESSAGE_PATH)
async def handle_stop(request: web.Request, identity) -> web.Response:
    """Stop an answer (see `on_stop_generation`)."""
    return ok_response(await service.stop_generation(request.app, identity.user_id, request.match_info["message_id"]))


def _sse(event_type: str, data: Any, event_id: Any = None) -> bytes:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event_type}\n".encode() + b"data: " + jsonutil.dumpb(data) + b"\n\n"


# --- REST: settings and usage ----------------------------------------------------------------------------

@routes.get("/api/v1/assistant/models")
@endpoint(auth="user")
async def handle_list_models(request: web.Request, identity) -> web.Response:
    """The models a conversation may choose (see `on_list_models`)."""
    return ok_response(await service.list_models(request.app))


@routes.get("/api/v1/me/usage")
@endpoint(auth="user")
async def handle_get_usage(request: web.Request, identity) -> web.Response:
    """The caller's assistant usage today (see `on_get_usage`)."""
    return ok_response(await service.get_usage(request.app, identity.user_id))


# --- REST: history: search, export, share, feedback ---------------------------------------------------

SEARCH_VALIDATOR = compile_schema(SEARCH_SCHEMA)
EXPORT_QUERY_VALIDATOR = compile_schema(REST_EXPORT_QUERY)
FEEDBACK_LIST_VALIDATOR = compile_schema(FEEDBACK_LIST_QUERY)


@routes.get("/api/v1/conversations/search")
@endpoint(auth="user", query=SEARCH_SCHEMA)
async def handle_search_conversations(request: web.Request, identity) -> web.Response:
    """Full-text search of the caller's conversations (see `on_search_conversations`)."""
    params = query_payload(request, SEARCH_VALIDATOR)
    return ok_response(await history.search_conversations(request.app, identity.user_id, params["q"],
                                                          params.get("limit", DEFAULT_PAGE), params.get("cursor")))


@routes.get("/api/v1/conversations/{conversation_id}/export")
@endpoint(auth="user", path=CONVERSATION_PATH, query=REST_EXPORT_QUERY)
async def handle_export_conversation(request: web.Request, identity) -> web.Response:
    """The conversation's current branch as a file to download: Markdown or JSON (`format`)."""
    params = query_payload(request, EXPORT_QUERY_VALIDATOR)
    document = await history.export_conversation(request.app, identity.user_id,
                                                 request.match_info["conversation_id"], params["format"])
    return web.Response(text=document["content"], content_type=document["content_type"], charset="utf-8",
                        headers={"Content-Disposition": f'attachment; filename="{document["filename"]}"',
                                 "Cache-Control": "private, no-store"})


@routes.post("/api/v1/conversations/{conversation_id}/share")
@endpoint(auth="user", path=CONVERSATION_PATH)
async def handle_share_conversation(request: web.Request, identity) -> web.Response:
    """A read-only link to the conversation: 201 with its token when created, 200 when it was shared already."""
    result = await history.share_conversation(request.app, identity.user_id, request.match_info["conversation_id"])
    return ok_response(result, 201 if result["created"] else 200)


@routes.delete("/api/v1/conversations/{conversation_id}/share")
@endpoint(auth="user", path=CONVERSATION_PATH)
async def handle_unshare_conversation(request: web.Request, identity) -> web.Response:
    """Revoke the conversation's read-only link (see `on_unshare_conversation`)."""
    return ok_response(await history.unshare_conversation(request.app, identity.user_id,
                                                          request.match_info["conversation_id"]))


@routes.get("/api/v1/shared/{token}")
@endpoint(path=SHARE_TOKEN_PATH)
async def handle_read_shared(request: web.Request) -> web.Response:
    """A shared conversation, for anyone with its link: title and current branch (rate-limited per address)."""
    token = request.match_info["token"]
    if not SHARE_TOKEN_RE.fullmatch(token):  # no link has another shape: no need to count or look it up
        raise NotFound("no conversation is shared under this link", field="token")
    response = ok_response(await history.read_shared(request.app, token, client_ip(request)))
    response.headers["Cache-Control"] = "no-store"  # a revoked link must stop working at once, caches included
    return response


@routes.put("/api/v1/messages/{message_id}/feedback")
@endpoint(body=REST_FEEDBACK_SCHEMA, auth="user", path=MESSAGE_PATH)
async def handle_give_feedback(request: web.Request, identity, body) -> web.Response:
    """Rate an answer (see `on_give_feedback`)."""
    return ok_response(await history.give_feedback(request.app, identity.user_id, request.match_info["message_id"],
                                                   body["rating"], body.get("comment")))


@routes.delete("/api/v1/messages/{message_id}/feedback")
@endpoint(auth="user", path=MESSAGE_PATH)
async def handle_withdraw_feedback(request: web.Request, identity) -> web.Response:
    """Withdraw the caller's rating of an answer (see `on_withdraw_feedback`)."""
    return ok_response(await history.withdraw_feedback(request.app, identity.user_id,
                                                       request.match_info["message_id"]))


@routes.get("/api/v1/admin/assistant/feedback")
@endpoint(auth="admin", query=FEEDBACK_LIST_QUERY)
async def handle_list_feedback(request: web.Request, identity) -> web.Response:
    """Administrators: every user's ratings of answers, newest first (`rating` filters), paged by `cursor`."""
    params = query_payload(request, FEEDBACK_LIST_VALIDATOR)
    return ok_response(await history.list_feedback(request.app, params.get("rating"), params.get("cursor"),
                                                   params.get("limit", protocol.DEFAULT_PAGE)))
