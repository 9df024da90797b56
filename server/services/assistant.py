"""Assistant generations: server-side jobs keyed by the assistant message, not by a socket.

A job streams the answer (from the model, or composed from the marketplace in retrieval-only
mode), publishes `message_delta {message_id, seq, text}` events straight to the conversation's
channel (not through the outbox: the final state is persisted in `ai_messages`, and a client that
missed deltas asks `resume_stream`), saves the partial text every half second (which is also the
job's heartbeat, and how it learns of a stop requested on another process), and records the
final state: complete, stopped, failed or interrupted.

Jobs live in `Assistant.jobs` on the process that started them. On shutdown they are cancelled
and marked interrupted. Rows left `streaming` by a process that died are marked interrupted at
startup (single node: all of them; with Redis, those whose heartbeat is older than
`ai_stale_after`) and by a periodic sweep.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
import time
import uuid
from typing import Any, AsyncIterator

import asyncpg
import jsonschema
import structlog
from aiohttp import web

from db import assistant as db
from db.pool import POOL
from server.adapters.llm import ChatModel, ModelError, classify, estimate_messages, estimate_tokens
from server.core.aio import wait_event
from server.core.settings import SETTINGS, Settings
from server.realtime.hub import publish, user_channel

log = structlog.get_logger(__name__)

RETRIEVAL_MODEL = "retrieval-only"
RETRIEVAL_LABEL = "*Retrieval-only answer: no AI model is configured, so this lists what the marketplace holds.*"
TITLE_MAX_CHARS = 80
TOOL_RESULT_MAX_CHARS = 6000

SYSTEM_PROMPT = (
    "You are the SourceNet marketplace assistant. You help users find, compare and understand "
    "DataPods (datasets sold for SUI). State only verified facts: facts come from the tools "
    "(search_datapods, get_datapod, compare_datapods, list_categories, my_purchases); never invent "
    "datasets, prices, ratings or columns. Name DataPods by title and id. Be brief.")


def conversation_channel(conversation_id: uuid.UUID | str) -> str:
    return f"conversation:{conversation_id}"


def auto_title(text: str) -> str:
    """A title from the first message: whitespace collapsed, cut at a word boundary."""
    title = " ".join(text.split())
    if len(title) <= TITLE_MAX_CHARS:
        return title or "New conversation"
    cut = title[:TITLE_MAX_CHARS - 1]
    space = cut.rfind(" ")
    return (cut[:space] if space > TITLE_MAX_CHARS // 2 else cut).rstrip(" ,.;:") + "…"


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


async def run_tool(conn: asyncpg.Connection, user_id: uuid.UUID, name: str, args: dict[str, Any]) -> Any:
    """Run one read-only tool; raises ValueError for unknown tools or bad arguments."""
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
    deltas: list[str] = dataclasses.field(default_factory=list)
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

    @property
    def channel(self) -> str:
        return conversation_channel(self.conversation_id)

    @property
    def seq(self) -> int:
        return len(self.deltas)

    @property
    def content(self) -> str:
        return "".join(self.deltas)

    def usage(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens, "estimated": self.estimated}


class Assistant:
    """The registry of running generations on this process, and the code that runs them."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.settings: Settings = app[SETTINGS]
        self.model = ChatModel(self.settings) if self.settings.openai_base_url else None
        self.first_tool_choice = first_tool_choice(self.settings.ai_tool_choice)
        self.jobs: dict[uuid.UUID, Generation] = {}

    @property
    def model_name(self) -> str:
        return self.settings.ai_model if self.model else RETRIEVAL_MODEL

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
            await self._publish(conversation_channel(row["conversation_id"]), "message_failed", {
                "message_id": str(row["id"]), "status": "interrupted", "seq": row["seq"], "code": "interrupted",
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

    def start(self, gen: Generation) -> None:
        """Run a generation whose streaming row has been committed."""
        self.jobs[gen.message_id] = gen
        gen.task = asyncio.create_task(self._run(gen), name=f"assistant:{gen.message_id}")

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

    # --- the job ----------------------------------------------------------------------------

    async def _publish(self, channel: str, type: str, data: dict[str, Any]) -> None:
        try:
            await publish(self.app, channel, type, data)
        except Exception:  # noqa: BLE001 - the state is saved; clients recover with resume_stream
            log.warning("assistant_publish_failed", channel=channel, type=type, exc_info=True)

    async def _gen_event(self, gen: Generation, type: str, data: dict[str, Any]) -> None:
        """Publish one of a generation's events; local listeners (REST streams) get it too."""
        for queue in gen.listeners:
            queue.put_nowait((type, data))
        await self._publish(gen.channel, type, data)

    async def emit(self, gen: Generation, text: str) -> None:
        """One delta: buffered (for resume_stream), then published."""
        if gen.stop_reason is not None:
            # The task was cancelled, but the cancellation can be lost on the way (seen under load
            # with Redis; Python 3.11's wait_for drops a cancel that races with its result), so a
            # stop must not depend on it alone.
            raise asyncio.CancelledError
        if not text:
            return
        gen.deltas.append(text)
        await self._gen_event(gen, "message_delta",
                            {"message_id": str(gen.message_id), "seq": gen.seq, "text": text})

    async def _saver(self, gen: Generation) -> None:
        """Save the partial text periodically; it is also the heartbeat and the stop mailbox."""
        while True:
            await asyncio.sleep(self.settings.ai_save_interval)
            try:
                async with self.pool.acquire() as conn:
                    stop = await db.save_partial(conn, gen.message_id, gen.content, gen.seq)
            except Exception:  # noqa: BLE001 - the next round retries
                log.warning("assistant_save_failed", message_id=str(gen.message_id), exc_info=True)
                continue
            if stop is None or stop:
                if gen.stop_reason is None and gen.task is not None:
                    gen.stop_reason = "stop" if stop else "gone"
                    gen.task.cancel()
                return

    async def _run(self, gen: Generation) -> None:
        settings = self.settings
        saver = asyncio.create_task(self._saver(gen))
        error: ModelError | None = None
        status = "complete"
        try:
            await self._gen_event(gen, "message_started", {
                "message_id": str(gen.message_id), "conversation_id": str(gen.conversation_id),
                "parent_id": str(gen.parent_id), "model": self.model_name,
                "mode": "model" if self.model else "retrieval_only", "user_message": gen.user_message})
            async with asyncio.timeout(settings.ai_generation_timeout):
                if self.model is not None:
                    await self._generate(gen)
                else:
                    await self._retrieve(gen)
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
                log.exception("assistant_generation_failed", message_id=str(gen.message_id))
            elif gen.deltas and error.code in ("upstream_unreachable", "upstream_timeout"):
                error = ModelError("upstream_interrupted", "the model's stream broke off midway", True)
            status = "failed"
        finally:
            saver.cancel()
            with contextlib.suppress(BaseException):
                await saver
        try:
            if gen.stop_reason != "gone":
                await self._finish(gen, status, error)
        except Exception:  # noqa: BLE001 - the sweep marks the row interrupted later
            log.exception("assistant_finish_failed", message_id=str(gen.message_id))
        finally:
            self.jobs.pop(gen.message_id, None)
            gen.done.set()

    async def _finish(self, gen: Generation, status: str, error: ModelError | None) -> None:
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
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                row = await db.finish_message(
                    conn, gen.message_id, status=status, content=gen.content, seq=gen.seq,
                    finish_reason=gen.finish_reason,
                    prompt_tokens=gen.prompt_tokens if has_usage else None,
                    completion_tokens=gen.completion_tokens if has_usage else None,
                    estimated=gen.estimated, tool_calls=gen.tool_calls or None,
                    error=error.to_event() if error else None)
                titled = None
                if row is not None and status == "complete" and gen.user_message is not None:
                    titled = auto_title(gen.user_message["content"])
                    if not await db.set_title_if_unset(conn, gen.conversation_id, titled):
                        titled = None
        if row is None:
            return  # deleted meanwhile, or already finalised
        base = {"message_id": str(gen.message_id), "status": status, "seq": gen.seq}
        if status in ("complete", "stopped"):
            await self._gen_event(gen, "message_completed", {
                **base, "finish_reason": gen.finish_reason, "usage": gen.usage() if has_usage else None})
        else:
            assert error is not None
            await self._gen_event(gen, "message_failed", {**base, **error.to_event()})
        if titled:
            data = {"conversation_id": str(gen.conversation_id), "title": titled, "auto": True}
            await self._gen_event(gen, "conversation_titled", data)
            await self._publish(user_channel(gen.user_id), "conversation_titled", data)
        log.info("assistant_generation_finished", message_id=str(gen.message_id), status=status,
                 seq=gen.seq, code=error.code if error else None)

    # --- context ----------------------------------------------------------------------------

    async def context(self, gen: Generation) -> tuple[list[dict[str, Any]], int]:
        """System prompt + the newest turns that fit the budget (whole tool pairs, oldest dropped
        first); returns the messages and how many stored messages were left out."""
        async with self.pool.acquire() as conn:
            rows = await db.branch(conn, gen.parent_id)
        units: list[list[dict[str, Any]]] = []
        for row in rows:
            if row["role"] == "user":
                units.append([{"role": "user", "content": row["content"]}])
            elif row["role"] == "assistant" and row["content"] and row["status"] != "streaming":
                unit: list[dict[str, Any]] = []
                for call in row["tool_calls"] or ():
                    unit.append({"role": "assistant", "content": "", "tool_calls": [{
                        "id": call["id"], "type": "function",
                        "function": {"name": call["name"], "arguments": call["arguments"]}}]})
                    unit.append({"role": "tool", "tool_call_id": call["id"], "content": call["result"]})
                unit.append({"role": "assistant", "content": row["content"]})
                units.append(unit)
        system = [{"role": "system", "content": SYSTEM_PROMPT}]
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

    async def _generate(self, gen: Generation) -> None:
        assert self.model is not None
        messages, dropped = await self.context(gen)
        if dropped:
            await self._gen_event(gen, "context_trimmed", {
                "message_id": str(gen.message_id), "dropped_messages": dropped,
                "budget_tokens": self.settings.ai_context_tokens})
        rounds = self.settings.ai_max_tool_rounds
        for round_no in range(rounds + 1):
            tools = TOOL_SPECS if round_no < rounds else None
            # Forcing every round would loop until the rounds run out: only the first is forced.
            tool_choice = self.first_tool_choice if tools and round_no == 0 else None
            text_before = gen.seq
            calls: dict[int, dict[str, Any]] = {}
            finish: str | None = None
            usage = None
            prompt_estimate = estimate_messages(messages)
            # aclosing: a stop cancels us between chunks too, and the HTTP stream must close then.
            async with contextlib.aclosing(self.model.stream(messages, tools, tool_choice)) as chunks:
                async for chunk in chunks:
                    if gen.stop_reason is not None:
                        raise asyncio.CancelledError  # see emit()
                    gen.open_round_prompt = prompt_estimate  # the upstream has started to answer
                    if getattr(chunk, "usage", None) is not None:
                        usage = chunk.usage
                    for choice in chunk.choices or ():
                        delta = choice.delta
                        if delta is not None and delta.content:
                            await self.emit(gen, delta.content)
                        for call in (delta.tool_calls if delta is not None else None) or ():
                            slot = calls.setdefault(call.index or 0, {"id": None, "name": "", "arguments": ""})
                            if call.id:
                                slot["id"] = call.id
                            if call.function is not None:
                                # OpenAI names the function in the first chunk only; llama-cpp-python
                                # repeats the whole name in every chunk.
                                if call.function.name and call.function.name != slot["name"]:
                                    slot["name"] += call.function.name
                                slot["arguments"] += call.function.arguments or ""
                        if choice.finish_reason:
                            finish = choice.finish_reason
            gen.open_round_prompt = 0
            round_text = "".join(gen.deltas[text_before:])
            if usage is not None and (usage.prompt_tokens or usage.completion_tokens):
                gen.prompt_tokens += usage.prompt_tokens or 0
                gen.completion_tokens += usage.completion_tokens or 0
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
            content = json.dumps(result, default=str)
            if len(content) > TOOL_RESULT_MAX_CHARS:
                content = content[:TOOL_RESULT_MAX_CHARS] + "…(truncated)"
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": content})
            gen.tool_calls.append({"id": call["id"], "name": call["name"], "arguments": call["arguments"],
                                   "result": content, "ok": ok, "datapod_ids": datapod_ids(result)})

    async def _call_tool(self, gen: Generation, call_id: str, name: str, arguments: str) -> tuple[Any, bool]:
        """Run a tool with a time bound, announcing it; errors go back to the model as results."""
        try:
            args = json.loads(arguments or "{}")
            if not isinstance(args, dict):
                raise ValueError("arguments must be a JSON object")
        except ValueError:
            args = None
        await self._gen_event(gen, "tool_called", {
            "message_id": str(gen.message_id), "call_id": call_id, "name": name,
            "arguments": args if args is not None else arguments})
        started = time.perf_counter()
        try:
            if args is None:
                raise ValueError("arguments are not valid JSON")
            # asyncio.timeout, not wait_for: a stop cancelling this task as the tool's timeout
            # fires must not be swallowed (gh-86296, see server.aio).
            async with self.pool.acquire() as conn, asyncio.timeout(self.settings.ai_tool_timeout):
                result = await run_tool(conn, gen.user_id, name, args)
            ok = True
        except asyncio.TimeoutError:
            result, ok = {"error": "the tool took too long"}, False
        except ValueError as exc:
            result, ok = {"error": str(exc)}, False
        await self._gen_event(gen, "tool_returned", {
            "message_id": str(gen.message_id), "call_id": call_id, "name": name, "ok": ok,
            "datapod_ids": datapod_ids(result), "result": result,
            "duration_ms": round((time.perf_counter() - started) * 1000, 1)})
        return result, ok

    # --- retrieval-only ---------------------------------------------------------------------

    async def _retrieve(self, gen: Generation) -> None:
        """Answer without a model: search the marketplace for the question, compose the results."""
        question = gen.user_message["content"] if gen.user_message else ""
        if not question:
            async with self.pool.acquire() as conn:
                parent = await db.get_message(conn, gen.parent_id)
            question = parent["content"] if parent else ""
        call_id = f"call_{gen.message_id.hex[:8]}_0"
        arguments = json.dumps({"query": question[:500], "limit": 5})
        found, _ = await self._call_tool(gen, call_id, "search_datapods", arguments)
        gen.tool_calls.append({"id": call_id, "name": "search_datapods", "arguments": arguments,
                               "result": json.dumps(found, default=str)[:TOOL_RESULT_MAX_CHARS], "ok": True,
                               "datapod_ids": datapod_ids(found)})
        for piece in _chunks(_compose(found if isinstance(found, list) else [], question)):
            await self.emit(gen, piece)
        gen.finish_reason = "stop"


ASSISTANT: web.AppKey[Assistant] = web.AppKey("assistant", Assistant)


def _compose(pods: list[dict[str, Any]], question: str) -> str:
    lines = [RETRIEVAL_LABEL, ""]
    if not pods:
        lines.append("No published DataPod matches your words. Try other keywords or browse the categories.")
        return "\n".join(lines)
    lines.append(f"DataPods matching “{auto_title(question)}”:")
    lines.append("")
    for n, pod in enumerate(pods, 1):
        rating = f"{pod['average_rating']:.1f}★" if pod["average_rating"] else "not rated yet"
        lines.append(f"{n}. **{pod['title']}** ({pod['category'] or 'uncategorised'}) — {pod['price_sui']} SUI, "
                     f"{rating}, {pod['purchase_count']} sold. {pod['description']} [datapod:{pod['datapod_id']}]")
    return "\n".join(lines)


def _chunks(text: str) -> list[str]:
    """Split composed text into word-sized deltas, as a model would stream it."""
    return re.findall(r"\S+\s*|\s+", text)


# --- app wiring -----------------------------------------------------------------------------------

async def assistant_ctx(app: web.Application) -> AsyncIterator[None]:
    """The generation registry: sweep leftovers at start, cancel and mark interrupted at exit."""
    assistant = app[ASSISTANT] = Assistant(app)
    settings = app[SETTINGS]
    # One process without Redis: every streaming row is a leftover of this process's earlier life.
    await assistant.sweep(everything=settings.redis_url is None)
    sweeper = asyncio.create_task(assistant.sweep_loop())
    yield
    sweeper.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await sweeper
    await assistant.shutdown()
