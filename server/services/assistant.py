"""The AI assistant: what a user may do with their own conversations, and the jobs that answer.

Commands (the /assistant namespace and its REST routes call these): conversations are created,
listed, read, renamed and deleted only by their owner (`forbidden` otherwise). Messages form a
tree; `send_message`, `edit_message` and `regenerate` each start an answer through one
admit-and-start transaction (ownership, idempotency on `client_msg_id`, the per-user limits, the
new rows), then let the caller watch the conversation before the job starts, so it misses no
event. The conversation list's events (`conversation_created`, `conversation_titled`,
`conversation_deleted`) go to the owner's user channel, as does `usage_changed` (the day's tokens,
after each answer and each model-written title is counted).

Jobs are server-side and keyed by the assistant message, not by a socket. A job streams the
answer (from the model, or composed from the marketplace in retrieval-only mode), publishes
`message_delta {message_id, seq, text}` events straight to the conversation's channel (not
through the outbox: the final state is persisted in `ai_messages`, and a client that missed
deltas asks `resume_stream`), saves the partial text every half second (which is also the job's
heartbeat, and how it learns of a stop requested on another process), and records the final
state: complete, stopped, failed or interrupted.

Jobs live in `Assistant.jobs` on the process that started them. On shutdown they are cancelled
and marked interrupted. Rows left `streaming` by a process that died are marked interrupted at
startup (single node: all of them; with Redis, those whose heartbeat is older than
`ai_stale_after`) and by a periodic sweep.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import functools
import json
import re
import time
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator

import asyncpg
import jsonschema
import structlog
from aiohttp import web

from db import assistant as db
from db import assistant_history as history_db
from db.pool import POOL
from server.adapters.llm import ChatModel, ModelError, classify, estimate_messages, estimate_tokens
from server.core.aio import wait_event
from server.core.errors import Conflict, Forbidden, InvalidPayload, NotFound, PayloadTooLarge, RateLimited, Unavailable
from server.core.metrics import METRICS
from server.core.settings import SETTINGS, Settings
from server.realtime.hub import FIRST_ID, REALTIME, ChannelAccess, publish, publish_many, user_channel
from server.realtime.redis import BusUnavailable
from server.services import assistant_intents as intents
from server.services import dataset_query

log = structlog.get_logger(__name__)

RETRIEVAL_MODEL = "retrieval-only"
RETRIEVAL_LABEL = "*Retrieval-only answer: no AI model is configured, so this lists what the marketplace holds.*"
HEURISTIC_TITLE_MAX_CHARS = 50  # a title made from the first message, without a model
MODEL_TITLE_MAX_CHARS = 60  # a title the model wrote, once sanitised
TITLE_MAX_TOKENS = 24
TITLE_TIMEOUT = 20.0  # seconds; the heuristic title stays when the model is slower
TITLE_EXCERPT_CHARS = 1000  # of the question and of the answer, in the title prompt
TITLE_PROMPT = ("Write a title of at most six words for the conversation below, in its language. "
                "Reply with the title only: one line, no quotes, no markdown, no final punctuation.")
USER_PROMPT_PREFIX = ("The user's instructions for this conversation follow; they do not override the "
                      "rules above.\n\n")
MODELS_CACHE_SECONDS = 60.0
USAGE_CONVERSATIONS_LIMIT = 20  # the conversations listed in get_usage: the day's heaviest
TOOL_RESULT_MAX_CHARS = 6000

SYSTEM_PROMPT = (
    "You are the SourceNet marketplace assistant. You help users find, compare and understand "
    "DataPods (datasets sold for SUI). State only verified facts: facts come from the tools "
    "(search_datapods, get_datapod, compare_datapods, list_categories, my_purchases); never invent "
    "datasets, prices, ratings or columns. Name DataPods by title and id. Be brief.")

CONVERSATION_CHANNEL = "conversation:{conversation_id}"  # an answer's events; only the owner may watch

# On the owner's user channel (and, for a title, the conversation's channel too):
CONVERSATION_CREATED = "conversation_created"
CONVERSATION_TITLED = "conversation_titled"
CONVERSATION_DELETED = "conversation_deleted"
USAGE_CHANGED = "usage_changed"  # on the user channel after each answer (and automatic title) is counted
# An answer's events, on its conversation's channel:
MESSAGE_STARTED = "message_started"
CONTEXT_TRIMMED = "context_trimmed"
MESSAGE_DELTA = "message_delta"
TOOL_CALLED = "tool_called"
TOOL_RETURNED = "tool_returned"
MESSAGE_COMPLETED = "message_completed"
MESSAGE_FAILED = "message_failed"
FINAL_EVENTS = (MESSAGE_COMPLETED, MESSAGE_FAILED)  # the events that end an answer's stream
# The REST stream's first event (the send's ack); it is written to that stream only, never published.
MESSAGE_ACCEPTED = "message_accepted"
MESSAGE_RESUMED = "message_resumed"  # the REST stream's first event: what resume_stream returns


def conversation_channel(conversation_id: uuid.UUID | str) -> str:
    """A conversation's channel: its answers' events and its automatic title."""
    return CONVERSATION_CHANNEL.format(conversation_id=conversation_id)


_GREETING = (r"(?:hi|hello|hey|hiya|howdy|greetings|good (?:morning|afternoon|evening|day)|dear \w+|yo)"
             r"(?: there| all| everyone| assistant| bot)?")
_FILLER = (r"(?:please|pls|ok(?:ay)?|so|well|um+|uh+|thanks|thank you|(?:quick )?question"
           r"|(?:can|could|would|will) (?:you|u)(?: please)?(?: help me)?(?: to)?|(?:can|could|may) i(?: please)?"
           r"|i(?:'d| would) (?:like|love)(?: to)?|i want(?: to)?|i need(?: to)?|i(?:'m| am) (?:looking|searching) for"
           r"|looking for|help me(?: to)?|tell me(?: about)?|show me|find me|give me|get me|let me know"
           r"|(?:do|does) (?:you|anyone|anybody) know|is it possible to)")
_QUESTION = (r"(?:what|which|who|whom|whose|where|when|why|how(?: much| many)?|is there|are there"
             r"|is|are|was|were|do|does|did|can|could|should|would|will|have|has)")
_LEAD_WORD = r"(?:a|an|the|some|any|me|you|i|it|there|about)"
_LEADING = re.compile(rf"^(?:{_GREETING}|{_FILLER}|{_QUESTION}|{_LEAD_WORD})\b[\s,!.?:;-]*", re.IGNORECASE)
_TRAILING = re.compile(r"[\s,]+(?:please|pls|thanks|thank you|thx|for me|for us|do you (?:have|offer|sell|know)"
                       r"|are (?:there|available)|is (?:there|available)|available)[\s!.?]*$", re.IGNORECASE)
_CONNECTORS = {"a", "an", "the", "and", "or", "of", "for", "to", "in", "on", "with", "about", "by", "from", "at"}
_MARKUP = re.compile(r"[*_`#>\"“”„«»\[\]]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _cut_words(title: str, limit: int) -> str:
    """At most `limit` characters, cut at a word boundary (mid-word only for one long word)."""
    if len(title) <= limit:
        return title
    cut = title[:limit + 1]
    space = cut.rfind(" ")
    return cut[:space] if space > 0 else title[:limit]


def heuristic_title(text: str) -> str:
    """A title from the first message without a model: greetings, filler and question words
    dropped, the key words kept, cut at a word boundary (at most 50 characters), capitalised."""
    original = " ".join(_MARKUP.sub(" ", _CONTROL.sub(" ", text)).split())
    title = original
    while True:
        shorter = _LEADING.sub("", title, count=1)
        if shorter == title:
            break
        title = shorter
    while True:
        shorter = _TRAILING.sub("", title)
        if shorter == title:
            break
        title = shorter
    title = title.strip(" ?!.,;:…-")
    if not any(ch.isalnum() for ch in title):
        title = original.strip(" ?!.,;:…-")  # nothing but filler ("Hi!"): the words as they were
    if len(title) > HEURISTIC_TITLE_MAX_CHARS:
        words = _cut_words(title, HEURISTIC_TITLE_MAX_CHARS).split(" ")
        while len(words) > 1 and words[-1].lower() in _CONNECTORS:
            words.pop()  # "Weather data for" reads cut off: "Weather data"
        title = " ".join(words).rstrip(" ?!.,;:…-")
    if not title:
        return "New conversation"
    return title[0].upper() + title[1:]


def sanitise_title(text: str) -> str | None:
    """The model's title as one clean line (no quotes, no markdown, at most 60 characters); None
    when nothing usable is left."""
    line = next((ln for ln in text.splitlines() if ln.strip()), "")
    line = re.sub(r"^\s*(?:#+|[-*>•]|\d+[.)])\s+", "", line)  # a heading or list marker
    line = re.sub(r"^\s*(?:conversation )?title\s*:\s*", "", line, flags=re.IGNORECASE)
    line = " ".join(_MARKUP.sub("", _CONTROL.sub(" ", line)).split())
    line = line.strip(" '‘’.,;:!-")
    if not any(ch.isalnum() for ch in line):
        return None
    return _cut_words(line, MODEL_TITLE_MAX_CHARS).rstrip(" '‘’.,;:!-")


def title_messages(question: str, answer: str) -> list[dict[str, Any]]:
    """The prompt that asks the model for a conversation's title."""
    return [{"role": "system", "content": TITLE_PROMPT},
            {"role": "user", "content": f"User: {question[:TITLE_EXCERPT_CHARS]}\n\n"
                                        f"Assistant: {answer[:TITLE_EXCERPT_CHARS]}"}]


# --- tools ----------------------------------------------------------------------------------------

def _tool(name: str, description: str, properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict:
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": properties, "required": list(required),
                       "additionalProperties": False}}}


_UUID = {"type": "string", "pattern": "^[0-9a-fA-F-]{36}$"}
TOOL_SPECS = [
    _tool("search_datapods", "Full-text search of published DataPods, optionally by category and price (SUI).",
          {"query": {"type": "string", "maxLength": 500}, "category": {"type": "string", "maxLength": 50},
           "min_price": {"type": "number", "minimum": 0}, "max_price": {"type": "number", "minimum": 0},
           "limit": {"type": "integer", "minimum": 1, "maximum": 10}}),
    _tool("get_datapod", "One DataPod's details: schema, sample rows, price, rating.",
          {"datapod_id": _UUID}, ("datapod_id",)),
    _tool("compare_datapods", "Details of several DataPods side by side.",
          {"datapod_ids": {"type": "array", "items": _UUID, "minItems": 2, "maxItems": 5}}, ("datapod_ids",)),
    _tool("list_categories", "The marketplace's categories with counts and price ranges.", {}),
    _tool("my_purchases", "The signed-in user's purchases.", {}),
    _tool("query_dataset", "Run one read-only SQL SELECT (DuckDB) over the full dataset of a DataPod the user "
          "bought or sells; the table is named data, its columns are the DataPod's schema (get_datapod). "
          "Returns columns and rows (at most a few hundred; truncated says when there were more).",
          {"datapod_id": _UUID, "sql": {"type": "string", "minLength": 1, "maxLength": dataset_query.MAX_SQL_CHARS}},
          ("datapod_id", "sql")),
]
_TOOL_VALIDATORS = {spec["function"]["name"]: jsonschema.Draft202012Validator(spec["function"]["parameters"])
                    for spec in TOOL_SPECS}


def first_tool_choice(setting: str) -> str | dict[str, Any] | None:
    """The first round's `tool_choice` for AI_TOOL_CHOICE (None: the server's default, auto)."""
    if setting == "auto":
        return None
    if setting == "required":
        return setting
    if setting in _TOOL_VALIDATORS:
        return {"type": "function", "function": {"name": setting}}
    raise ValueError(f"AI_TOOL_CHOICE must be auto, required or a tool ({', '.join(_TOOL_VALIDATORS)}), "
                     f"got {setting!r}")


async def run_tool(conn: asyncpg.Connection, user_id: uuid.UUID, name: str, args: dict[str, Any],
                   app: web.Application | None = None) -> Any:
    """Run one read-only tool; raises ValueError for unknown tools or bad arguments (query_dataset needs `app`)."""
    validator = _TOOL_VALIDATORS.get(name)
    if validator is None:
        raise ValueError(f"unknown tool {name!r}")
    error = jsonschema.exceptions.best_match(validator.iter_errors(args))
    if error is not None:
        raise ValueError(f"bad arguments: {error.message[:200]}")
    if name == "search_datapods":
        return await db.search_datapods(conn, args.get("query"), args.get("category"), args.get("min_price"),
                                        args.get("max_price"), args.get("limit", 5))
    if name == "get_datapod":
        found = await db.get_datapod(conn, uuid.UUID(args["datapod_id"]))
        if found is None:
            raise ValueError("no published DataPod has this id")
        return found
    if name == "compare_datapods":
        pods = [await db.get_datapod(conn, uuid.UUID(i)) for i in dict.fromkeys(args["datapod_ids"])]
        return [p for p in pods if p is not None]
    if name == "list_categories":
        return await db.list_categories(conn)
    if name == "query_dataset":
        if app is None:
            raise ValueError("query_dataset is not available here")
        return await dataset_query.tool_result(app, user_id, args)
    return await db.my_purchases(conn, user_id)


def datapod_ids(result: Any) -> list[str]:
    """Every DataPod id a tool result mentions, in order (clients show them as cards)."""
    found: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            if isinstance(value.get("datapod_id"), str):
                found.append(value["datapod_id"])
            for key, inner in value.items():
                if key not in ("schema", "sample_rows"):
                    walk(inner)
        elif isinstance(value, list):
            for inner in value:
                walk(inner)

    walk(result)
    return list(dict.fromkeys(found))


# --- jobs -----------------------------------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class Generation:
    """One running answer."""

    message_id: uuid.UUID
    conversation_id: uuid.UUID
    user_id: uuid.UUID
    parent_id: uuid.UUID
    user_message: dict[str, Any] | None
    deltas: list[str] = dataclasses.field(default_factory=list)  # as published: delta n is deltas[n - 1]
    unsent: list[str] = dataclasses.field(default_factory=list)  # emitted text waiting for its delta
    publishing: bool = False  # a delta of it is in the batch being published
    tool_calls: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated: bool = False
    open_round_prompt: int = 0  # prompt estimate of a model round not yet accounted
    stop_reason: str | None = None  # "stop", "shutdown" or "gone" once cancelled on purpose
    task: asyncio.Task | None = None
    listeners: list[asyncio.Queue] = dataclasses.field(default_factory=list)
    done: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    model: str | None = None  # the model that answers (the conversation's); None: the default
    system_prompt: str | None = None  # the conversation's own, after the platform's
    generating: bool = True  # saved periodically until its final state is being written

    # Both cached: read for every delta, and formatting a UUID costs a few microseconds.
    @functools.cached_property
    def channel(self) -> str:
        return conversation_channel(self.conversation_id)

    @functools.cached_property
    def public_id(self) -> str:
        """The message id as events and logs carry it."""
        return str(self.message_id)

    @property
    def seq(self) -> int:
        return len(self.deltas)

    @property
    def content(self) -> str:
        return "".join(self.deltas)

    def usage(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens, "estimated": self.estimated}


@dataclasses.dataclass(frozen=True, slots=True)
class Prompt:
    """What an answer is asked from, read in the transaction that starts it."""

    path: list[db.Message]  # the branch from the root to the new answer's parent, oldest first
    holds_data: bool  # the user has a dataset to query: query_dataset is offered


class Assistant:
    """The registry of running generations on this process, and the code that runs them."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.settings: Settings = app[SETTINGS]
        self.model = ChatModel(self.settings) if self.settings.openai_base_url else None
        self.first_tool_choice = first_tool_choice(self.settings.ai_tool_choice)
        self.jobs: dict[uuid.UUID, Generation] = {}
        self._admitting = 0  # answers between stream_slot and start
        self.title_jobs: set[asyncio.Task] = set()
        # Answers with emitted text waiting for its delta, and the one task publishing them.
        self._unsent: dict[uuid.UUID, Generation] = {}
        self._delta_publisher: asyncio.Task | None = None
        self._deltas_due = asyncio.Event()  # set: publish the waiting text now, not after the interval
        self._models: tuple[float, list[str]] | None = None  # (when read, the endpoint's model ids)

    @property
    def model_name(self) -> str:
        return self.settings.ai_model if self.model else RETRIEVAL_MODEL

    @property
    def allowed_models(self) -> frozenset[str]:
        """The models a conversation may choose: AI_MODEL_ALLOWLIST, and AI_MODEL always."""
        return frozenset(self.settings.ai_model_allowlist) | {self.settings.ai_model}

    def answering_model(self, chosen: str | None) -> str:
        """The model a conversation's answers use: its choice while still allowed, else the default."""
        if self.model is None:
            return RETRIEVAL_MODEL
        return chosen if chosen in self.allowed_models else self.settings.ai_model

    def check_model(self, chosen: str | None) -> None:
        """A conversation's model choice: None (the default) or an allowed model; InvalidPayload otherwise."""
        if chosen is None:
            return
        if self.model is None:
            raise InvalidPayload("no model is configured: the assistant is retrieval-only", field="model")
        if chosen not in self.allowed_models:
            raise InvalidPayload("this model is not offered (see list_models)", field="model")

    async def list_models(self) -> dict[str, Any]:
        """The endpoint's models that are allowed (its list is read at most once a minute)."""
        if self.model is None:
            return {"mode": "retrieval_only", "default": RETRIEVAL_MODEL,
                    "models": [{"id": RETRIEVAL_MODEL, "default": True}]}
        now = time.monotonic()
        if self._models is None or now - self._models[0] > MODELS_CACHE_SECONDS:
            try:
                ids = await self.model.list_models()
            except ModelError as exc:
                raise Unavailable("the model endpoint cannot list its models", reason=exc.code) from exc
            self._models = (now, ids)
        allowed = self.allowed_models
        default = self.settings.ai_model
        return {"mode": "model", "default": default,
                "models": [{"id": i, "default": i == default} for i in dict.fromkeys(self._models[1])
                           if i in allowed]}

    @property
    def pool(self) -> asyncpg.Pool:
        return self.app[POOL]

    # --- lifecycle --------------------------------------------------------------------------

    async def sweep(self, *, everything: bool = False) -> int:
        """Mark abandoned streaming rows interrupted and tell their watchers."""
        stale_after = -1.0 if everything else self.settings.ai_stale_after
        async with self.pool.acquire() as conn:
            rows = await db.interrupt_abandoned(conn, stale_after, list(self.jobs))
        for row in rows:
            await self._publish(conversation_channel(row.conversation_id), MESSAGE_FAILED, {
                "message_id": str(row.id), "status": "interrupted", "seq": row.seq, "code": "interrupted",
                "message": "the server that was writing this answer stopped", "retryable": True})
        if rows:
            log.info("assistant_interrupted_abandoned", count=len(rows))
        return len(rows)

    async def sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(max(1.0, self.settings.ai_stale_after / 3))
            try:
                await self.sweep()
            except Exception:  # noqa: BLE001 - a failed sweep is retried next round
                log.warning("assistant_sweep_failed", exc_info=True)

    async def shutdown(self) -> None:
        """Cancel every running job; each marks its answer interrupted."""
        for job in list(self.title_jobs):
            job.cancel()  # a title is a nicety: the heuristic one stays
        if self.title_jobs:
            await asyncio.wait(list(self.title_jobs), timeout=5)
        jobs = list(self.jobs.values())
        for gen in jobs:
            gen.stop_reason = gen.stop_reason or "shutdown"
            if gen.task is not None:
                gen.task.cancel()
        if jobs:
            await asyncio.wait([asyncio.ensure_future(gen.done.wait()) for gen in jobs], timeout=5)
        if self.model is not None:
            await self.model.close()

    # --- control ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def stream_slot(self) -> Iterator[None]:
        """Hold one of this process's AI_MAX_STREAMS places while an answer is admitted; RateLimited if none is left."""
        if len(self.jobs) + self._admitting >= self.settings.ai_max_streams:
            raise RateLimited(f"this server is writing {self.settings.ai_max_streams} answers, as many as it "
                              "takes at once; retry shortly", retry_after=1.0)
        # Counted until the job is registered: admissions awaiting the database would otherwise all pass.
        self._admitting += 1
        try:
            yield
        finally:
            self._admitting -= 1

    async def read_prompt(self, conn: asyncpg.Connection, user_id: uuid.UUID, parent_id: uuid.UUID | None) -> Prompt:
        """The branch an answer under `parent_id` continues, and whether to offer query_dataset."""
        path = await db.branch(conn, parent_id)
        holds_data = False
        if self.model is not None and self.settings.ai_max_tool_rounds:
            holds_data = await dataset_query.holds_data(conn, user_id)
        return Prompt(path, holds_data)

    def start(self, gen: Generation, prompt: Prompt) -> None:
        """Run a generation whose streaming row has been committed."""
        self.jobs[gen.message_id] = gen
        gen.task = asyncio.create_task(self._run(gen, prompt), name=f"assistant:{gen.message_id}")

    def local(self, message_id: uuid.UUID) -> Generation | None:
        return self.jobs.get(message_id)

    async def stop(self, message_id: uuid.UUID, reason: str = "stop", wait: float = 5.0) -> bool:
        """Stop a job of this process; returns False when it does not run here."""
        gen = self.jobs.get(message_id)
        if gen is None:
            return False
        if gen.stop_reason is None:
            gen.stop_reason = reason
            if gen.task is not None:
                gen.task.cancel()
        await wait_event(gen.done, wait)
        return True

    async def drop_conversation(self, conversation_id: uuid.UUID) -> None:
        """Stop this process's jobs in a deleted conversation; their rows are gone, nothing is saved."""
        for gen in list(self.jobs.values()):
            if gen.conversation_id == conversation_id:
                await self.stop(gen.message_id, reason="gone")

    # --- the job ----------------------------------------------------------------------------

    async def _publish(self, channel: str, type: str, data: dict[str, Any]) -> None:
        try:
            await publish(self.app, channel, type, data)
        except Exception:  # noqa: BLE001 - the state is saved; clients recover with resume_stream
            log.warning("assistant_publish_failed", channel=channel, type=type, exc_info=True)

    async def _gen_event(self, gen: Generation, type: str, data: dict[str, Any]) -> None:
        """Publish one of a generation's events (its deltas go by `emit`); local listeners (REST
        streams) get it too."""
        await self._flush_deltas(gen)  # every event follows the text emitted before it
        for queue in gen.listeners:
            queue.put_nowait((type, data))
        await self._publish(gen.channel, type, data)

    async def emit(self, gen: Generation, text: str) -> None:
        """Queue text for the generation's next delta; the model's stream is read on meanwhile.

        A delta waits for its history append (a Redis round trip) before it is delivered. Waiting
        for that before reading the next token held every stream to one token per round trip: with
        200 streams the round trips grew and tokens reached clients seconds late. Text emitted while
        a delta is out goes together in the next one, so a loaded hub sends fewer, larger deltas.
        """
        if gen.stop_reason is not None:
            # The task was cancelled, but the cancellation can be lost on the way (seen under load
            # with Redis; Python 3.11's wait_for drops a cancel that races with its result), so a
            # stop must not depend on it alone.
            raise asyncio.CancelledError
        if not text:
            return
        gen.unsent.append(text)
        self._queue_deltas(gen)

    def _queue_deltas(self, gen: Generation) -> None:
        """Have the answer's waiting text published, starting the publisher if none runs."""
        self._unsent[gen.message_id] = gen
        if not gen.deltas:
            # An answer's first text does not wait for others': the interval would add to its first token.
            self._deltas_due.set()
        if self._delta_publisher is None:
            self._delta_publisher = asyncio.create_task(self._publish_deltas(), name="assistant-deltas")

    async def _publish_deltas(self) -> None:
        """Publish every answer's waiting text, a delta each, all in one batch, until none waits.

        One task and one history round trip for the deltas of every answer emitted within
        `AI_DELTA_INTERVAL_MS`: a task and a publish chain per delta cost more than its encoding, and
        on Redis a batch costs about 230 us of CPU however few deltas it holds (the script call, the
        copy for the other nodes and this node's listener reading that copy), against 13 us a delta
        in batches of 100. Sent as soon as the previous batch was stored, 200 streams made batches
        of 5.7 on average; 2 ms makes them 17 and cut the hub's CPU per token by 12-38%
        (docs/performance.md, stop 38). An answer's first text does not wait: it goes in the next
        batch at once, with whatever else is waiting.
        """
        try:
            while self._unsent:
                if self.settings.ai_delta_interval and not self._deltas_due.is_set():
                    await wait_event(self._deltas_due, self.settings.ai_delta_interval)
                self._deltas_due.clear()
                batch = list(self._unsent.values())
                self._unsent.clear()
                events: list[tuple[str, str, dict[str, Any]]] = []
                for gen in batch:
                    text = "".join(gen.unsent)
                    gen.unsent.clear()
                    gen.deltas.append(text)  # buffered for resume_stream before it is published
                    gen.publishing = True
                    data = {"message_id": gen.public_id, "seq": gen.seq, "text": text}
                    for queue in gen.listeners:
                        queue.put_nowait((MESSAGE_DELTA, data))
                    events.append((gen.channel, MESSAGE_DELTA, data))
                try:
                    await self._publish_delta_batch(events)
                finally:
                    for gen in batch:
                        gen.publishing = False
        finally:
            self._delta_publisher = None

    async def _publish_delta_batch(self, events: list[tuple[str, str, dict[str, Any]]]) -> None:
        try:
            await publish_many(self.app, events)
        except BusUnavailable:
            # Redis is down: each event still reaches this node's watchers, unstored, as a single
            # publish delivers it; clients recover the rest with resume_stream.
            for channel, type, data in events:
                await self._publish(channel, type, data)
        except Exception:  # noqa: BLE001 - the state is saved; clients recover with resume_stream
            log.warning("assistant_publish_failed", type=MESSAGE_DELTA, deltas=len(events), exc_info=True)

    async def _flush_deltas(self, gen: Generation) -> None:
        """Wait until every emitted text of the answer is in a published delta."""
        while gen.unsent or gen.publishing:
            if self._delta_publisher is None:  # cancelled with text left
                self._queue_deltas(gen)
            await asyncio.wait([self._delta_publisher])  # not cancelled if we are: the text still goes out

    def _drop_deltas(self, gen: Generation) -> None:
        """Forget an answer's unpublished text (its rows are gone)."""
        gen.unsent.clear()
        self._unsent.pop(gen.message_id, None)

    async def save_loop(self) -> None:
        """Save every running answer's text periodically: it is also their heartbeat and stop mailbox."""
        while True:
            await asyncio.sleep(self.settings.ai_save_interval)
            try:
                await self.save_running()
            except Exception:  # noqa: BLE001 - the next round retries
                log.warning("assistant_save_failed", exc_info=True)

    async def save_running(self) -> None:
        """Save the text of this process's answers still generating, in one statement; stop those
        whose stop was requested (by any process) or whose row no longer streams.

        One statement for all: a save each was a round trip every half second per answer, 10% of
        the hub's CPU with 200 answers streaming.
        """
        running = [gen for gen in self.jobs.values() if gen.generating]
        if not running:
            return
        async with self.pool.acquire() as conn:
            stops = await db.save_partials(conn, [{"id": gen.message_id, "content": gen.content, "seq": gen.seq}
                                                  for gen in running])
        for gen in running:
            if not gen.generating:
                continue  # it finished meanwhile: its row left 'streaming' by its own hand
            stop = stops.get(gen.message_id)
            if (stop is None or stop) and gen.stop_reason is None and gen.task is not None:
                gen.stop_reason = "stop" if stop else "gone"
                gen.task.cancel()

    async def _run(self, gen: Generation, prompt: Prompt) -> None:
        settings = self.settings
        error: ModelError | None = None
        status = "complete"
        try:
            started = {
                "message_id": gen.public_id, "conversation_id": str(gen.conversation_id),
                "parent_id": str(gen.parent_id), "model": gen.model or self.model_name,
                "mode": "model" if self.model else "retrieval_only", "user_message": gen.user_message}
            async with asyncio.timeout(settings.ai_generation_timeout):
                await self._gen_event(gen, MESSAGE_STARTED, started)
                if self.model is not None:
                    await self._generate(gen, prompt)
                else:
                    await self._retrieve(gen, prompt.path)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            if gen.stop_reason is None:
                gen.stop_reason = "shutdown"
            status = "stopped" if gen.stop_reason == "stop" else "interrupted"
        except Exception as exc:  # noqa: BLE001 - every failure is reported to the client
            error = classify(exc)
            if error.code == "internal_error":
                log.exception("assistant_generation_failed", message_id=gen.public_id)
            elif (gen.deltas or gen.unsent) and error.code in ("upstream_unreachable", "upstream_timeout"):
                error = ModelError("upstream_interrupted", "the model's stream broke off midway", True)
            status = "failed"
        finally:
            gen.generating = False  # saves stop here: the final state is written next
        try:
            if gen.stop_reason == "gone":
                self._drop_deltas(gen)
            else:
                await self._finish(gen, status, error)
        except Exception:  # noqa: BLE001 - the sweep marks the row interrupted later
            log.exception("assistant_finish_failed", message_id=gen.public_id)
        finally:
            self.jobs.pop(gen.message_id, None)
            gen.done.set()

    async def _finish(self, gen: Generation, status: str, error: ModelError | None) -> None:
        await self._flush_deltas(gen)  # the saved text and seq are the published ones
        if status == "stopped":
            gen.finish_reason = "stopped"
        elif status == "interrupted":
            gen.finish_reason = "interrupted"
            error = ModelError("interrupted", "the server stopped while answering; regenerate", True)
        elif status == "failed":
            gen.finish_reason = "error"
        elif gen.finish_reason is None:
            gen.finish_reason = "stop"
        has_usage = gen.prompt_tokens or gen.completion_tokens
        if status != "complete" and gen.open_round_prompt:
            # The upstream was cut off before its usage chunk: count what it was sent and wrote.
            gen.prompt_tokens += gen.open_round_prompt
            gen.completion_tokens = max(gen.completion_tokens, estimate_tokens(gen.content))
            gen.estimated = True
            has_usage = True
        # The first complete exchange claims the title (once: only while it has none) with the
        # heuristic one; with a model, a job then asks it for a better one.
        claim = (heuristic_title(gen.user_message["content"])
                 if status == "complete" and gen.user_message is not None else None)
        async with self.pool.acquire() as conn:
            row, title_set = await db.finish_message(
                conn, gen.message_id, status=status, content=gen.content, seq=gen.seq,
                finish_reason=gen.finish_reason,
                prompt_tokens=gen.prompt_tokens if has_usage else None,
                completion_tokens=gen.completion_tokens if has_usage else None,
                estimated=gen.estimated, tool_calls=gen.tool_calls or None,
                error=error.to_event() if error else None, title=claim)
            # On this connection, not on another after the events: a client sends its next message
            # on message_completed, and that checkout queued with the next answers' admissions
            # (200 x 100 x 3: first-token p99 265-335 ms, against 423-480). It costs message_completed
            # a round trip, which did not show among that figure's 136-210 ms p50.
            usage = await self._read_usage(conn, gen.user_id) if row is not None else None
        titled = claim if title_set else None
        if row is None:
            return  # deleted meanwhile, or already finalised
        base = {"message_id": gen.public_id, "status": status, "seq": gen.seq}
        if status in ("complete", "stopped"):
            await self._gen_event(gen, MESSAGE_COMPLETED, {
                **base, "finish_reason": gen.finish_reason, "usage": gen.usage() if has_usage else None})
        else:
            assert error is not None
            await self._gen_event(gen, MESSAGE_FAILED, {**base, **error.to_event()})
        if titled:
            data = {"conversation_id": str(gen.conversation_id), "title": titled, "auto": True}
            await self._gen_event(gen, CONVERSATION_TITLED, data)
            await self._publish(user_channel(gen.user_id), CONVERSATION_TITLED, data)
            if self.model is not None and gen.user_message is not None:
                job = asyncio.create_task(self._title_job(gen, titled, gen.user_message["content"], gen.content),
                                          name=f"assistant-title:{gen.conversation_id}")
                self.title_jobs.add(job)
                job.add_done_callback(self.title_jobs.discard)
        await self._publish_usage(gen.user_id, gen.conversation_id, usage)
        log.info("assistant_generation_finished", message_id=gen.public_id, status=status,
                 seq=gen.seq, code=error.code if error else None)

    async def _title_job(self, gen: Generation, heuristic: str, question: str, answer: str) -> None:
        """Ask the model for the conversation's title; it replaces the heuristic one unless the user
        renamed it meanwhile. Any failure keeps the heuristic title. Its tokens count to the quota."""
        assert self.model is not None
        messages = title_messages(question, answer)
        try:
            async with asyncio.timeout(TITLE_TIMEOUT):
                text, prompt_tokens, completion_tokens = await self.model.complete(
                    messages, model=gen.model, max_tokens=TITLE_MAX_TOKENS)
        except Exception as exc:  # noqa: BLE001 - the heuristic title stays
            log.info("assistant_title_failed", conversation_id=str(gen.conversation_id),
                     error=str(classify(exc)))
            return
        title = sanitise_title(text)
        try:
            async with self.pool.acquire() as conn:
                replaced = await db.record_title(
                    conn, gen.user_id, gen.conversation_id,
                    prompt_tokens if prompt_tokens is not None else estimate_messages(messages),
                    completion_tokens if completion_tokens is not None else estimate_tokens(text),
                    heuristic, title if title and title != heuristic else None)
                usage = await self._read_usage(conn, gen.user_id)
        except Exception:  # noqa: BLE001 - a background job: nobody else would see it
            log.warning("assistant_title_save_failed", conversation_id=str(gen.conversation_id), exc_info=True)
            return
        if replaced:
            data = {"conversation_id": str(gen.conversation_id), "title": title, "auto": True}
            await self._publish(gen.channel, CONVERSATION_TITLED, data)
            await self._publish(user_channel(gen.user_id), CONVERSATION_TITLED, data)
        await self._publish_usage(gen.user_id, gen.conversation_id, usage)

    async def _read_usage(self, conn: asyncpg.Connection, user_id: uuid.UUID) -> dict[str, Any] | None:
        """The user's usage summary for `usage_changed`; None when it cannot be read (logged)."""
        try:
            return await usage_summary(self.settings, conn, user_id)
        except Exception:  # noqa: BLE001 - get_usage still answers
            log.warning("assistant_usage_read_failed", user_id=str(user_id), exc_info=True)
            return None

    async def _publish_usage(self, user_id: uuid.UUID, conversation_id: uuid.UUID,
                             summary: dict[str, Any] | None) -> None:
        """`usage_changed` on the user's channel: the day's usage after an answer or title was counted."""
        if summary is not None:
            await self._publish(user_channel(user_id), USAGE_CHANGED,
                                {**summary, "conversation_id": str(conversation_id)})

    # --- context ----------------------------------------------------------------------------

    def context(self, gen: Generation, path: list[db.Message]) -> tuple[list[dict[str, Any]], int]:
        """System prompts (the platform's, then the conversation's) + the newest turns of `path` that
        fit the budget (whole tool pairs, oldest dropped first); returns the messages and how many
        stored messages were left out."""
        units: list[list[dict[str, Any]]] = []
        for row in path:
            if row.role == "user":
                units.append([{"role": "user", "content": row.content}])
            elif row.role == "assistant" and row.content and row.status != "streaming":
                unit: list[dict[str, Any]] = []
                for call in row.tool_calls or ():
                    unit.append({"role": "assistant", "content": "", "tool_calls": [{
                        "id": call["id"], "type": "function",
                        "function": {"name": call["name"], "arguments": call["arguments"]}}]})
                    unit.append({"role": "tool", "tool_call_id": call["id"], "content": call["result"]})
                unit.append({"role": "assistant", "content": row.content})
                units.append(unit)
        system = [{"role": "system", "content": SYSTEM_PROMPT}]
        if gen.system_prompt:
            # After the platform's, never instead of it: its rules still hold.
            system.append({"role": "system", "content": USER_PROMPT_PREFIX + gen.system_prompt})
        budget = self.settings.ai_context_tokens - self.settings.ai_max_output_tokens - estimate_messages(system)
        kept: list[list[dict[str, Any]]] = []
        used = 0
        for unit in reversed(units):
            cost = estimate_messages(unit)
            if used + cost > budget and kept:
                break
            kept.append(unit)
            used += cost
        kept.reverse()
        while len(kept) > 1 and kept[0][0]["role"] != "user":
            kept.pop(0)  # a conversation starts with the user's turn
        if used > budget:
            raise ModelError("context_too_long", "the message does not fit the model's context window", False)
        dropped = len(units) - len(kept)
        return system + [m for unit in kept for m in unit], dropped

    # --- model generation -------------------------------------------------------------------

    async def _generate(self, gen: Generation, prompt: Prompt) -> None:
        """Stream the model's answer, with up to AI_MAX_TOOL_ROUNDS tool rounds."""
        assert self.model is not None
        rounds = self.settings.ai_max_tool_rounds
        messages, dropped = self.context(gen, prompt.path)
        if dropped:
            await self._gen_event(gen, CONTEXT_TRIMMED, {
                "message_id": gen.public_id, "dropped_messages": dropped,
                "budget_tokens": self.settings.ai_context_tokens})
        specs = TOOL_SPECS
        if rounds and not prompt.holds_data:
            # Offered only to users with a dataset to query: the others' prompts stay as they were.
            specs = [spec for spec in TOOL_SPECS if spec["function"]["name"] != "query_dataset"]
        for round_no in range(rounds + 1):
            tools = specs if round_no < rounds else None
            # Forcing every round would loop until the rounds run out: only the first is forced.
            tool_choice = self.first_tool_choice if tools and round_no == 0 else None
            text_before = gen.seq
            calls: dict[int, dict[str, Any]] = {}
            finish: str | None = None
            usage = None
            prompt_estimate = estimate_messages(messages)
            # aclosing: a stop cancels us between chunks too, and the HTTP stream must close then.
            async with contextlib.aclosing(self.model.stream(messages, tools, tool_choice, gen.model)) as chunks:
                async for chunk in chunks:
                    if gen.stop_reason is not None:
                        raise asyncio.CancelledError  # see emit()
                    gen.open_round_prompt = prompt_estimate  # the upstream has started to answer
                    if chunk.get("usage") is not None:
                        usage = chunk["usage"]
                    for choice in chunk.get("choices") or ():
                        delta = choice.get("delta") or {}
                        if delta.get("content"):
                            await self.emit(gen, delta["content"])
                        for call in delta.get("tool_calls") or ():
                            slot = calls.setdefault(call.get("index") or 0, {"id": None, "name": "", "arguments": ""})
                            if call.get("id"):
                                slot["id"] = call["id"]
                            function = call.get("function")
                            if function is not None:
                                # OpenAI names the function in the first chunk only; llama-cpp-python
                                # repeats the whole name in every chunk.
                                if function.get("name") and function["name"] != slot["name"]:
                                    slot["name"] += function["name"]
                                slot["arguments"] += function.get("arguments") or ""
                        if choice.get("finish_reason"):
                            finish = choice["finish_reason"]
            gen.open_round_prompt = 0
            await self._flush_deltas(gen)
            round_text = "".join(gen.deltas[text_before:])
            if usage is not None and (usage.get("prompt_tokens") or usage.get("completion_tokens")):
                gen.prompt_tokens += usage.get("prompt_tokens") or 0
                gen.completion_tokens += usage.get("completion_tokens") or 0
            else:
                gen.prompt_tokens += estimate_messages(messages)
                gen.completion_tokens += estimate_tokens(round_text) + sum(
                    estimate_tokens(c["name"] + c["arguments"]) for c in calls.values())
                gen.estimated = True
            if not calls:
                gen.finish_reason = finish or "stop"
                return
            await self._run_tools(gen, messages, round_text, [calls[i] for i in sorted(calls)])
        gen.finish_reason = "tool_rounds_exhausted"

    async def _run_tools(self, gen: Generation, messages: list[dict[str, Any]], round_text: str,
                         calls: list[dict[str, Any]]) -> None:
        for n, call in enumerate(calls):
            call["id"] = call["id"] or f"call_{gen.message_id.hex[:8]}_{len(gen.tool_calls) + n}"
        # "" rather than null: some servers (llama-cpp-python) refuse a null content.
        messages.append({"role": "assistant", "content": round_text, "tool_calls": [
            {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
            for c in calls]})
        for call in calls:
            result, ok = await self._call_tool(gen, call["id"], call["name"], call["arguments"])
            if ok and call["name"] == "query_dataset":
                # The rows stream into the answer as a table; the model then explains them.
                table = dataset_query.QueryResult.from_public(result).to_markdown()
                await self.emit(gen, ("\n\n" if gen.content else "") + table + "\n\n")
            content = json.dumps(result, default=str)
            if len(content) > TOOL_RESULT_MAX_CHARS:
                content = content[:TOOL_RESULT_MAX_CHARS] + "…(truncated)"
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": content})
            gen.tool_calls.append({"id": call["id"], "name": call["name"], "arguments": call["arguments"],
                                   "result": content, "ok": ok, "datapod_ids": datapod_ids(result)})

    async def _call_tool(self, gen: Generation, call_id: str, name: str, arguments: str) -> tuple[Any, bool]:
        """Run a tool with a time bound, announcing it; errors go back to the model as results."""
        try:
            # strict=False: models write raw newlines inside JSON strings (an SQL query over lines).
            args = json.loads(arguments or "{}", strict=False)
            if not isinstance(args, dict):
                raise ValueError("arguments must be a JSON object")
        except ValueError:
            args = None
        await self._gen_event(gen, TOOL_CALLED, {
            "message_id": gen.public_id, "call_id": call_id, "name": name,
            "arguments": args if args is not None else arguments})
        started = time.perf_counter()
        try:
            if args is None:
                raise ValueError("arguments are not valid JSON")
            # asyncio.timeout, not wait_for: a stop cancelling this task as the tool's timeout
            # fires must not be swallowed (gh-86296, see server.aio).
            timeout = self.settings.ai_tool_timeout
            if name == "query_dataset":  # decrypting and loading come on top of the query's own limit
                timeout = max(timeout, self.settings.dataset_query_timeout + 30)
            async with self.pool.acquire() as conn, asyncio.timeout(timeout):
                result = await run_tool(conn, gen.user_id, name, args, self.app)
            ok = True
        except asyncio.TimeoutError:
            result, ok = {"error": "the tool took too long"}, False
        except ValueError as exc:
            result, ok = {"error": str(exc)}, False
        await self._gen_event(gen, TOOL_RETURNED, {
            "message_id": gen.public_id, "call_id": call_id, "name": name, "ok": ok,
            "datapod_ids": datapod_ids(result), "result": result,
            "duration_ms": round((time.perf_counter() - started) * 1000, 1)})
        return result, ok

    # --- retrieval-only ---------------------------------------------------------------------

    async def _retrieve(self, gen: Generation, path: list[db.Message]) -> None:
        """Answer without a model: the intent router (assistant_intents) reads the marketplace by
        documented rules; each read is announced as a tool call. The disclaimer opens the branch's
        first retrieval-only answer only."""
        question = path[-1].content if path and path[-1].role == "user" else ""
        if not question and gen.user_message:
            question = gen.user_message["content"]
        earlier = [m for m in path[:-1] if m.role == "assistant"]
        previous: list[uuid.UUID] = []
        if earlier:  # a follow-up ("which one...", "them") means the DataPods of the previous answer
            ids = [i for call in earlier[-1].tool_calls or () for i in call.get("datapod_ids") or ()]
            previous = [uuid.UUID(i) for i in dict.fromkeys(ids)]

        async def tool(name: str, arguments: dict[str, Any], run: intents.Run) -> Any:
            call_id = f"call_{gen.message_id.hex[:8]}_{len(gen.tool_calls)}"
            await self._gen_event(gen, TOOL_CALLED, {
                "message_id": gen.public_id, "call_id": call_id, "name": name, "arguments": arguments})
            started = time.perf_counter()
            try:
                async with self.pool.acquire() as conn, asyncio.timeout(self.settings.ai_tool_timeout):
                    raw = await run(conn)
                result, ok = intents.public(raw), True
            except asyncio.TimeoutError:
                raw, result, ok = None, {"error": "the tool took too long"}, False
            except Exception as exc:  # noqa: BLE001 - a failed read is reported in the answer, not fatal
                log.warning("assistant_intent_tool_failed", name=name, exc_info=True)
                raw, result, ok = None, {"error": type(exc).__name__}, False
            ids = datapod_ids(result)
            await self._gen_event(gen, TOOL_RETURNED, {
                "message_id": gen.public_id, "call_id": call_id, "name": name, "ok": ok,
                "datapod_ids": ids, "result": result,
                "duration_ms": round((time.perf_counter() - started) * 1000, 1)})
            content = json.dumps(result, default=str)
            if len(content) > TOOL_RESULT_MAX_CHARS:
                content = content[:TOOL_RESULT_MAX_CHARS] + "…(truncated)"
            gen.tool_calls.append({"id": call_id, "name": name, "arguments": json.dumps(arguments, default=str),
                                   "result": content, "ok": ok, "datapod_ids": ids})
            if not ok:
                raise intents.ToolFailed(result["error"])
            return raw

        async def read(run: intents.Run) -> Any:
            async with self.pool.acquire() as conn:
                return await run(conn)

        ask = intents.Ask(question, gen.user_id, tool, previous, self.app, read)
        intent, answer = await intents.route(ask)
        log.info("assistant_intent", message_id=gen.public_id, intent=intent)
        first = not any(m.model == RETRIEVAL_MODEL and m.content for m in earlier)
        for piece in _chunks(_compose(answer, first)):
            await self.emit(gen, piece)
            await asyncio.sleep(0)  # streamed as words, as a model would (merged while a delta is out)
        gen.finish_reason = "stop"


ASSISTANT: web.AppKey[Assistant] = web.AppKey("assistant", Assistant)


def _compose(answer: str, first: bool) -> str:
    """A retrieval-only answer: the disclaimer on the conversation's first one, then the intent's markdown."""
    return f"{RETRIEVAL_LABEL}\n\n{answer}" if first else answer


def _chunks(text: str) -> list[str]:
    """Split composed text into word-sized deltas, as a model would stream it."""
    return re.findall(r"\S+\s*|\s+", text)


# --- who may see what ----------------------------------------------------------------------------

def parse_uuid(value: str, field: str) -> uuid.UUID:
    """An id from the client (REST paths are not schema-checked); InvalidPayload naming `field` otherwise."""
    try:
        return uuid.UUID(value)
    except ValueError:
        raise InvalidPayload(f"{field} must be a UUID", field=field) from None


async def own_conversation(access: ChannelAccess) -> bool:
    """`conversation:{conversation_id}` channels: only the conversation's owner."""
    if access.identity is None:
        return False
    try:
        conversation_id = uuid.UUID(access.params["conversation_id"])
    except ValueError:
        return False
    async with access.app[POOL].acquire() as conn:
        owner = await db.conversation_owner(conn, conversation_id)
    return owner == access.identity.user_id


async def owned_conversation(conn: asyncpg.Connection, user_id: uuid.UUID, conversation_id: uuid.UUID, *,
                             for_update: bool = False) -> db.Conversation:
    """The caller's conversation; NotFound when there is none, Forbidden when it is someone else's."""
    row = await db.get_conversation(conn, conversation_id, for_update=for_update)
    if row is None:
        raise NotFound("no such conversation", field="conversation_id")
    if row.user_id != user_id:
        raise Forbidden("this conversation is not yours", field="conversation_id")
    return row


async def owned_message(conn: asyncpg.Connection, user_id: uuid.UUID, message_id: uuid.UUID) -> db.Message:
    """The caller's message; NotFound when there is none, Forbidden when it is someone else's."""
    row = await db.get_message(conn, message_id)
    if row is None:
        raise NotFound("no such message", field="message_id")
    if row.user_id != user_id:
        raise Forbidden("this message is not yours", field="message_id")
    return row


# --- conversations --------------------------------------------------------------------------------

def check_system_prompt(settings: Settings, text: str | None) -> str | None:
    """A conversation's system prompt: within AI_SYSTEM_PROMPT_MAX_CHARS; blank is none."""
    if text is None or not text.strip():
        return None
    limit = settings.ai_system_prompt_max_chars
    if len(text) > limit:
        raise PayloadTooLarge(f"a system prompt may hold at most {limit} characters", field="system_prompt")
    return text.strip()


async def create_conversation(app: web.Application, user_id: uuid.UUID, title: str | None,
                              model: str | None = None, system_prompt: str | None = None) -> dict[str, Any]:
    """A new, empty conversation, announced on the owner's user channel."""
    app[ASSISTANT].check_model(model)
    system_prompt = check_system_prompt(app[SETTINGS], system_prompt)
    async with app[POOL].acquire() as conn:
        row = await db.create_conversation(conn, user_id, title, model, system_prompt)
    conversation = row.to_public()
    await publish(app, user_channel(user_id), CONVERSATION_CREATED, {"conversation": conversation})
    return {"conversation": conversation}


async def list_conversations(app: web.Application, user_id: uuid.UUID, limit: int,
                             before: str | None) -> dict[str, Any]:
    """The user's conversations, most recently active first; `before` (ISO 8601) pages."""
    try:
        since = datetime.datetime.fromisoformat(before) if before else None
    except ValueError:
        raise InvalidPayload("before must be an ISO 8601 timestamp", field="before") from None
    async with app[POOL].acquire() as conn:
        rows = await db.list_conversations(conn, user_id, limit, since)
    items = [row.to_public() for row in rows]
    return {"conversations": items, "next_before": items[-1]["updated_at"] if len(items) == limit else None}


async def get_conversation(app: web.Application, user_id: uuid.UUID, conversation_id: str) -> dict[str, Any]:
    """The user's conversation and the messages of its current branch, oldest first."""
    conversation_uuid = parse_uuid(conversation_id, "conversation_id")
    async with app[POOL].acquire() as conn:
        row = await owned_conversation(conn, user_id, conversation_uuid)
        messages = await db.branch(conn, row.current_leaf_id)
        return await branch_answer(conn, user_id, row, messages)


async def branch_answer(conn: asyncpg.Connection, user_id: uuid.UUID, conversation: db.Conversation,
                        messages: list[db.Message]) -> dict[str, Any]:
    """A conversation's branch as get_conversation and switch_branch answer it: with the caller's
    ratings of its answers (`feedback`), so a page shows them again."""
    rated = await history_db.feedback_on(conn, user_id, [m.id for m in messages if m.role == "assistant"])
    return {"conversation": conversation.to_public(), "messages": [m.to_public() for m in messages],
            "feedback": [f.to_public() for f in rated]}


async def rename_conversation(app: web.Application, user_id: uuid.UUID, conversation_id: str,
                              title: str) -> dict[str, Any]:
    """Give the user's conversation a title (whitespace collapsed), announced on both channels."""
    return await update_conversation(app, user_id, conversation_id, {"title": title})


async def update_conversation(app: web.Application, user_id: uuid.UUID, conversation_id: str,
                              changes: dict[str, Any]) -> dict[str, Any]:
    """Change the user's conversation: `title` (whitespace collapsed; announced on both channels, and
    never replaced by an automatic one), `model` (null: the default) and/or `system_prompt` (null
    or blank: none); only the fields given. All are checked before anything is written."""
    if not changes.keys() & {"title", "model", "system_prompt"}:
        raise InvalidPayload("nothing to change: give title, model or system_prompt")
    title = None
    if "title" in changes:
        title = " ".join(changes["title"].split())
        if not title:
            raise InvalidPayload("the title is empty", field="title")
    if "model" in changes:
        app[ASSISTANT].check_model(changes["model"])
    system_prompt = check_system_prompt(app[SETTINGS], changes.get("system_prompt"))
    conversation_uuid = parse_uuid(conversation_id, "conversation_id")
    async with app[POOL].acquire() as conn:
        async with conn.transaction():
            row = await owned_conversation(conn, user_id, conversation_uuid, for_update=True)
            if title is not None:
                row = await db.rename_conversation(conn, conversation_uuid, title)
            if "model" in changes or "system_prompt" in changes:
                row = await db.update_settings(
                    conn, conversation_uuid, set_model="model" in changes, model=changes.get("model"),
                    set_system_prompt="system_prompt" in changes, system_prompt=system_prompt)
    if title is not None:
        data = {"conversation_id": conversation_id, "title": title, "auto": False}
        await publish(app, conversation_channel(row.id), CONVERSATION_TITLED, data)
        await publish(app, user_channel(user_id), CONVERSATION_TITLED, data)
    return {"conversation": row.to_public()}


async def list_models(app: web.Application) -> dict[str, Any]:
    """The models a conversation may choose (the endpoint's, filtered by AI_MODEL_ALLOWLIST)."""
    return await app[ASSISTANT].list_models()


async def usage_summary(settings: Settings, conn: asyncpg.Connection, user_id: uuid.UUID) -> dict[str, Any]:
    """The user's tokens today (the quota's day, UTC), what the quota leaves and the rate limit."""
    usage = await db.user_usage(conn, user_id, settings.ai_stale_after)
    quota = settings.ai_daily_token_quota
    return {"day": usage.day.isoformat(), "resets_in": round(usage.reset_in, 3),
            "today": {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                      "total_tokens": usage.total_tokens},
            "quota": {"daily_tokens": quota, "used_tokens": usage.total_tokens,
                      "remaining_tokens": max(0, quota - usage.total_tokens)},
            "rate": {"messages_per_minute": settings.ai_messages_per_minute,
                     "messages_last_minute": usage.started_last_minute}}


async def get_usage(app: web.Application, user_id: uuid.UUID) -> dict[str, Any]:
    """The user's usage today, and the conversations that used the most tokens today (at most 20)."""
    async with app[POOL].acquire() as conn:
        summary = await usage_summary(app[SETTINGS], conn, user_id)
        rows = await db.usage_by_conversation_today(conn, user_id, USAGE_CONVERSATIONS_LIMIT)
    return {**summary, "conversations": [
        {"conversation_id": str(r.conversation_id), "title": r.title, "prompt_tokens": r.prompt_tokens,
         "completion_tokens": r.completion_tokens, "total_tokens": r.total_tokens, "answers": r.answers}
        for r in rows]}


async def delete_conversation(app: web.Application, user_id: uuid.UUID, conversation_id: str) -> dict[str, Any]:
    """Delete the user's conversation and its messages; a running answer in it is dropped."""
    conversation_uuid = parse_uuid(conversation_id, "conversation_id")
    async with app[POOL].acquire() as conn:
        await owned_conversation(conn, user_id, conversation_uuid)
        await db.delete_conversation(conn, conversation_uuid)
    await app[ASSISTANT].drop_conversation(conversation_uuid)
    await publish(app, user_channel(user_id), CONVERSATION_DELETED, {"conversation_id": conversation_id})
    return {"conversation_id": conversation_id}


# --- starting an answer ---------------------------------------------------------------------------

Watch = Callable[[Generation], Awaitable[None]]
"""Called with a new answer after its rows commit and before its job starts: the caller subscribes
to the conversation's channel (or listens on this process), so it misses no event."""

Locate = Callable[[asyncpg.Connection], Awaitable[tuple[db.Conversation, uuid.UUID | None]]]
"""Inside the start's transaction: the user's conversation, locked, and the parent of the new message."""


def check_content(settings: Settings, content: str) -> None:
    """A user message's text: within AI_MAX_INPUT_CHARS and not blank."""
    limit = settings.ai_max_input_chars
    if len(content) > limit:
        raise PayloadTooLarge(f"a message may hold at most {limit} characters", field="content")
    if not content.strip():
        raise InvalidPayload("the message is empty", field="content")


async def admit(settings: Settings, conn: asyncpg.Connection, user_id: uuid.UUID) -> None:
    """The per-user limits of starting an answer; call inside the transaction that starts it, after
    `db.lock_user_starts` (two starts of one user, even on two processes, must not both pass)."""
    # Read after the lock, in a statement of its own: its snapshot then sees every start before it.
    usage = await db.user_usage(conn, user_id, settings.ai_stale_after)
    if usage.streaming_id is not None:
        raise Conflict("an answer is still being written; stop it or wait for it to finish",
                       field="message_id", message_id=str(usage.streaming_id))
    if usage.started_last_minute >= settings.ai_messages_per_minute:
        raise RateLimited(f"at most {settings.ai_messages_per_minute} messages per minute",
                          retry_after=max(0.1, 60.0 - usage.oldest_start_age))
    if usage.total_tokens >= settings.ai_daily_token_quota:
        raise RateLimited(f"the daily quota of {settings.ai_daily_token_quota} tokens is used up "
                          "(it resets at midnight UTC)", retry_after=usage.reset_in)


async def _admit_and_start(app: web.Application, user_id: uuid.UUID, locate: Locate, watch: Watch, *,
                           content: str | None = None, client_msg_id: str | None = None) -> dict[str, Any]:
    """The one transaction that starts an answer, then the job.

    In the transaction: `locate` the conversation; a resend of `client_msg_id` returns the first
    send's messages and starts nothing; `admit`; the user's message (`content`; none when
    regenerating) under the located parent; the streaming answer under it, made the current leaf;
    the answer's prompt.
    After the commit: `watch`, then the job.
    """
    assistant = app[ASSISTANT]
    with assistant.stream_slot():
        async with app[POOL].acquire() as conn:
            async with conn.transaction():
                conversation, parent_id = await locate(conn)
                existing = await db.lock_user_starts(conn, user_id, conversation.id, client_msg_id)
                if existing is not None:
                    reply = await db.first_reply(conn, existing.id)
                    return {"user_message": existing.to_public(),
                            "assistant_message": reply.to_public() if reply else None, "duplicate": True}
                await admit(app[SETTINGS], conn, user_id)
                model = assistant.answering_model(conversation.model)
                started = await db.start_answer(conn, conversation_id=conversation.id, parent_id=parent_id,
                                                content=content, client_msg_id=client_msg_id, model=model)
                user_message, answer = started.user_message, started.answer
                if user_message is not None:
                    parent_id = user_message.id
                # Read here, not by the job: under load a second wait for a pooled connection was
                # most of the time to the first token. A failed read writes nothing.
                prompt = await assistant.read_prompt(conn, user_id, parent_id)
        gen = Generation(message_id=answer.id, conversation_id=conversation.id, user_id=user_id,
                         parent_id=parent_id, user_message=user_message.to_public() if user_message else None,
                         model=model, system_prompt=conversation.system_prompt)
        await watch(gen)
        assistant.start(gen, prompt)
    if user_message is None:
        return {"assistant_message": answer.to_public()}
    return {"user_message": user_message.to_public(), "assistant_message": answer.to_public(),
            "duplicate": False}


async def send_message(app: web.Application, user_id: uuid.UUID, conversation_id: str, content: str,
                       client_msg_id: str, watch: Watch) -> dict[str, Any]:
    """Add the user's message to the current branch and start its answer (idempotent on client_msg_id)."""
    check_content(app[SETTINGS], content)
    conversation_uuid = parse_uuid(conversation_id, "conversation_id")

    async def after_current_leaf(conn: asyncpg.Connection) -> tuple[db.Conversation, uuid.UUID | None]:
        conversation = await owned_conversation(conn, user_id, conversation_uuid, for_update=True)
        return conversation, conversation.current_leaf_id

    return await _admit_and_start(app, user_id, after_current_leaf, watch, content=content,
                                  client_msg_id=client_msg_id)


async def edit_message(app: web.Application, user_id: uuid.UUID, message_id: str, content: str,
                       client_msg_id: str | None, watch: Watch) -> dict[str, Any]:
    """Fork: a new version of one of the user's messages (its sibling) and a new answer, made current."""
    check_content(app[SETTINGS], content)
    message_uuid = parse_uuid(message_id, "message_id")

    async def beside_original(conn: asyncpg.Connection) -> tuple[db.Conversation, uuid.UUID | None]:
        original = await owned_message(conn, user_id, message_uuid)
        if original.role != "user":
            raise InvalidPayload("only the user's own messages can be edited", field="message_id")
        conversation = await owned_conversation(conn, user_id, original.conversation_id, for_update=True)
        return conversation, original.parent_id

    return await _admit_and_start(app, user_id, beside_original, watch, content=content,
                                  client_msg_id=client_msg_id)


async def regenerate(app: web.Application, user_id: uuid.UUID, message_id: str, watch: Watch) -> dict[str, Any]:
    """A new answer to the same user message (a sibling of the given answer), made current."""
    message_uuid = parse_uuid(message_id, "message_id")

    async def beside_previous(conn: asyncpg.Connection) -> tuple[db.Conversation, uuid.UUID | None]:
        previous = await owned_message(conn, user_id, message_uuid)
        if previous.role != "assistant" or previous.parent_id is None:
            raise InvalidPayload("only an answer can be regenerated", field="message_id")
        if previous.status == "streaming":
            raise Conflict("this answer is still being written", field="message_id")
        conversation = await owned_conversation(conn, user_id, previous.conversation_id, for_update=True)
        return conversation, previous.parent_id

    return await _admit_and_start(app, user_id, beside_previous, watch)


class AnswerListener:
    """A reader of one answer's events on this process (the REST stream); pass `watch` to a start."""

    def __init__(self) -> None:
        self.events: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
        self.gen: Generation | None = None

    @property
    def started(self) -> bool:
        """Whether the start began an answer (False for a resend)."""
        return self.gen is not None

    async def watch(self, gen: Generation) -> None:
        """Listen to the answer's events from its first one on."""
        self.gen = gen
        gen.listeners.append(self.events)

    def close(self) -> None:
        """Stop listening; the answer goes on."""
        if self.gen is not None:
            self.gen.listeners.remove(self.events)

    async def final_answer(self, app: web.Application) -> dict[str, Any]:
        """Wait for the answer to end and return it as saved."""
        assert self.gen is not None
        await self.gen.done.wait()
        async with app[POOL].acquire() as conn:
            final = await db.get_message(conn, self.gen.message_id)
        return final.to_public()


# --- branches and running answers -----------------------------------------------------------------

async def switch_branch(app: web.Application, user_id: uuid.UUID, message_id: str) -> dict[str, Any]:
    """Make the branch through the user's message current (down to its newest leaf)."""
    message_uuid = parse_uuid(message_id, "message_id")
    async with app[POOL].acquire() as conn:
        async with conn.transaction():
            message = await owned_message(conn, user_id, message_uuid)
            conversation = await owned_conversation(conn, user_id, message.conversation_id, for_update=True)
            leaf = await db.newest_leaf_under(conn, message.id)
            await db.set_leaf(conn, conversation.id, leaf)
            row = await db.get_conversation(conn, conversation.id)
            messages = await db.branch(conn, leaf)
            return await branch_answer(conn, user_id, row, messages)


async def stop_generation(app: web.Application, user_id: uuid.UUID, message_id: str) -> dict[str, Any]:
    """Stop the user's answer: at once on the process running it, else at its job's next save."""
    message_uuid = parse_uuid(message_id, "message_id")
    async with app[POOL].acquire() as conn:
        message = await owned_message(conn, user_id, message_uuid)
    if message.role != "assistant":
        raise InvalidPayload("only an answer can be stopped", field="message_id")
    if message.status != "streaming":
        return {"message_id": message_id, "status": message.status}
    stopped_here = await app[ASSISTANT].stop(message.id)
    async with app[POOL].acquire() as conn:
        if not stopped_here:
            await db.request_stop(conn, message.id)
            return {"message_id": message_id, "status": "stopping"}
        row = await db.get_message(conn, message.id)
    return {"message_id": message_id, "status": row.status if row else "stopped"}


async def resume_stream(app: web.Application, user_id: uuid.UUID, message_id: str, after_seq: int,
                        join: Callable[[str], Awaitable[None]]) -> dict[str, Any]:
    """What the caller missed of the user's answer after delta `after_seq`; `join`s its channel first.

    `reset: false`: `deltas` continue exactly after `after_seq`. `reset: true`: the text is
    `content` (the answer up to `content_seq`, or `seq` once it ended), then `deltas`.
    """
    message_uuid = parse_uuid(message_id, "message_id")
    async with app[POOL].acquire() as conn:
        message = await owned_message(conn, user_id, message_uuid)
    if message.role != "assistant":
        raise InvalidPayload("only an answer has a stream", field="message_id")
    await join(conversation_channel(message.conversation_id))
    base = {"message_id": message_id}
    gen = app[ASSISTANT].local(message_uuid)
    if gen is not None:  # this process writes it: the whole stream is in memory
        return {**base, "status": "streaming", "seq": gen.seq, "reset": False,
                "deltas": [{"seq": n, "text": gen.deltas[n - 1]} for n in range(after_seq + 1, gen.seq + 1)]}
    async with app[POOL].acquire() as conn:
        message = await db.get_message(conn, message_uuid)  # re-read after joining
    saved_seq, content = message.seq, message.content
    if message.status != "streaming":
        final = {**base, "status": message.status, "finish_reason": message.finish_reason,
                 "error": message.error, "seq": saved_seq, "deltas": []}
        if after_seq >= saved_seq:
            return {**final, "reset": False}
        return {**final, "reset": True, "content": content}
    # Another process writes it: the saved text plus the deltas the channel history holds.
    history = await _history_deltas(app, message)
    start = after_seq if after_seq >= saved_seq else saved_seq
    run: list[dict[str, Any]] = []
    while start + len(run) + 1 in history:
        n = start + len(run) + 1
        run.append({"seq": n, "text": history[n]})
    if start == after_seq:
        return {**base, "status": "streaming", "seq": start + len(run), "reset": False, "deltas": run}
    return {**base, "status": "streaming", "seq": start + len(run), "reset": True, "content": content,
            "content_seq": saved_seq, "deltas": run}


def final_event(message: db.Message) -> tuple[str, dict[str, Any]]:
    """The event that ended a finished answer, rebuilt from its saved row (as the job published it)."""
    base = {"message_id": str(message.id), "status": message.status, "seq": message.seq}
    if message.status in ("complete", "stopped"):
        return MESSAGE_COMPLETED, {**base, "finish_reason": message.finish_reason,
                                   "usage": message.to_public()["usage"]}
    return MESSAGE_FAILED, {**base, **(message.error or {})}


async def follow_answer(app: web.Application, user_id: uuid.UUID, message_id: str, after_seq: int,
                        keepalive: float, poll_interval: float | None,
                        ) -> AsyncIterator[tuple[str, dict[str, Any]] | None]:
    """The user's answer after delta `after_seq`, then live to its end, for a reader without a socket.

    Yields `(MESSAGE_RESUMED, what resume_stream returns)`, then the answer's live events read from
    the conversation channel's history (only deltas after the last seq applied), and ends after its
    final event (`message_completed` or `message_failed`, rebuilt from the row if it had ended).
    Yields None after `keepalive` quiet seconds. The channel is followed as `GET
    /api/v1/events/stream` follows one: a publish on this process wakes the reader at once, other
    processes' are found by re-reading the history every `poll_interval` seconds. The first step
    raises the command's errors (not_found, forbidden...) before anything is yielded.
    """
    realtime = app[REALTIME]
    message_uuid = parse_uuid(message_id, "message_id")
    wanted = str(message_uuid)  # as events spell it, whatever case the client used
    position: dict[str, Any] = {}

    async def join(channel: str) -> None:
        # The reader's "subscribe": its place in the channel before the answer's state is read, so
        # every event published after that read is found in the history.
        position.update(channel=channel, since=await realtime.bus.latest_id(channel))

    while True:  # once, and again whenever the history was trimmed past the reader
        resumed = await resume_stream(app, user_id, message_id, after_seq, join)
        yield MESSAGE_RESUMED, resumed
        after_seq = resumed["seq"]
        while resumed["status"] == "streaming":
            result = await realtime.wait_after(position["channel"], position["since"], keepalive, poll_interval)
            if result.gap:
                break
            if not result.events:
                async with app[POOL].acquire() as conn:
                    row = await owned_message(conn, user_id, message_uuid)  # not_found once deleted
                if row.status != "streaming":  # ended, but its final event was not published (publish failed)
                    yield final_event(row)
                    return
                yield None
                continue
            position["since"] = result.events[-1].id
            for event in result.events:
                if event.data.get("message_id") != wanted:
                    continue  # the conversation's other answers, its title
                if event.type == MESSAGE_DELTA:
                    if event.data["seq"] <= after_seq:
                        continue
                    after_seq = event.data["seq"]
                yield event.type, event.data
                if event.type in FINAL_EVENTS:
                    return
        else:  # it had ended when read: its final event, rebuilt from the saved row
            async with app[POOL].acquire() as conn:
                row = await owned_message(conn, user_id, message_uuid)
            yield final_event(row)
            return


async def _history_deltas(app: web.Application, message: db.Message) -> dict[int, str]:
    """The deltas of one answer that the conversation channel's history still holds."""
    replay = await app[REALTIME].replay(conversation_channel(message.conversation_id), FIRST_ID)
    wanted = str(message.id)
    return {event.data["seq"]: event.data["text"] for event in replay.events
            if event.type == MESSAGE_DELTA and event.data.get("message_id") == wanted}


# --- app wiring -----------------------------------------------------------------------------------

async def assistant_ctx(app: web.Application) -> AsyncIterator[None]:
    """The generation registry: sweep leftovers at start, cancel and mark interrupted at exit."""
    assistant = app[ASSISTANT] = Assistant(app)
    app[METRICS].assistant_streams.set_function(lambda: len(assistant.jobs))
    settings = app[SETTINGS]
    # One process without Redis: every streaming row is a leftover of this process's earlier life.
    await assistant.sweep(everything=settings.redis_url is None)
    loops = [asyncio.create_task(assistant.sweep_loop()), asyncio.create_task(assistant.save_loop())]
    yield
    for loop in loops:
        loop.cancel()
    await asyncio.gather(*loops, return_exceptions=True)
    await assistant.shutdown()
