"""The AI assistant over real sockets, real PostgreSQL and a real model.

The real model is the tiny `stories260K.gguf` served by llama-cpp-python (tests/llm_server.py):
its text is children's-story gibberish, so the tests check structure (deltas in order, their
concatenation equals the saved content, usage recorded, status transitions), never words. A
scripted OpenAI-compatible server covers what a real model cannot be made to do on demand:
HTTP 429 with Retry-After, HTTP 500, and a tool call followed by an answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
import time
import uuid

import asyncpg
import jsonschema
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from db import assistant as assistant_db
from db.pool import POOL
from server.adapters.llm import ChatModel, ModelError
from server.app import create_app
from server.core.crypto import MASTER_KEY
from server.core.settings import SETTINGS, Settings
from server.realtime.hub import REALTIME
from server.realtime.redis import BusUnavailable
from server.services.assistant import ASSISTANT, TOOL_SPECS, first_tool_choice
from server.services.demo import load_if_empty
from tests.helpers import SocketClient, register, server_url, wait_until
from tests.llm_server import ScriptedModel, SlowProxy, llm_server, llm_tools_server  # noqa: F401 - fixtures

NS = "/assistant"


def events(sock: SocketClient, type_: str, message_id: str | None = None) -> list[dict]:
    found = [data["data"] for _, name, data in sock.events if name == type_]
    if message_id is not None:
        found = [d for d in found if d.get("message_id") == message_id]
    return found


def finished(sock: SocketClient, message_id: str) -> dict | None:
    for type_ in ("message_completed", "message_failed"):
        done = events(sock, type_, message_id)
        if done:
            return {"type": type_, **done[0]}
    return None


async def wait_finished(sock: SocketClient, message_id: str, timeout: float = 30.0) -> dict:
    await wait_until(lambda: finished(sock, message_id) is not None, timeout)
    return finished(sock, message_id)


def delta_text(sock: SocketClient, message_id: str) -> tuple[list[int], str]:
    deltas = events(sock, "message_delta", message_id)
    return [d["seq"] for d in deltas], "".join(d["text"] for d in deltas)


class User:
    """A signed-in user with an /assistant socket."""

    def __init__(self, account: dict, sock: SocketClient) -> None:
        self.account, self.sock = account, sock
        self.id = account["user"]["id"]

    async def call(self, event: str, payload=None) -> dict:
        return await self.sock.call(NS, event, payload)

    async def ok(self, event: str, payload=None) -> dict:
        reply = await self.call(event, payload)
        assert reply["ok"] is True, reply
        return reply["data"]

    async def conversation(self, **payload) -> str:
        return (await self.ok("create_conversation", payload or None))["conversation"]["id"]

    async def send(self, conversation_id: str, content: str = "Tell me a story about a dog.",
                   client_msg_id: str | None = None) -> dict:
        return await self.ok("send_message", {"conversation_id": conversation_id, "content": content,
                                              "client_msg_id": client_msg_id or uuid.uuid4().hex})


async def sign_in(client, sockets, account: dict | None = None) -> User:
    account = account or await register(client)
    sock = sockets()
    await sock.connect(server_url(client), NS, token=account["token"])
    return User(account, sock)


async def start_app(aiohttp_client, settings, **changes):
    return await aiohttp_client(create_app(settings.replace(**changes)))


@pytest.fixture
async def model_app(aiohttp_client, settings, llm_server):  # noqa: F811
    """The app answering with the real model."""
    return await start_app(aiohttp_client, settings, openai_base_url=llm_server, ai_model="stories260K",
                           ai_max_output_tokens=200, ai_context_tokens=1500, ai_max_tool_rounds=0)


async def scripted(script: list[dict]) -> tuple[ScriptedModel, TestServer]:
    model = ScriptedModel(script)
    server = TestServer(model.app)
    await server.start_server()
    return model, server


async def message_row(app, message_id: str):
    async with app[POOL].acquire() as conn:
        return await conn.fetchrow("SELECT * FROM ai_messages WHERE id = $1", uuid.UUID(message_id))


# --- retrieval-only (no OPENAI_BASE_URL) ----------------------------------------------------------

async def test_retrieval_only_answers_from_the_marketplace(client, sockets):
    async with client.app[POOL].acquire() as conn:
        await load_if_empty(conn, client.app[SETTINGS], client.app[MASTER_KEY])
    alice = await sign_in(client, sockets)
    conversation_id = await alice.conversation()
    sent = await alice.send(conversation_id, "Is there weather data for cities?")
    message_id = sent["assistant_message"]["id"]
    assert sent["assistant_message"]["status"] == "streaming" and sent["duplicate"] is False
    done = await wait_finished(alice.sock, message_id)
    assert done["type"] == "message_completed" and done["status"] == "complete"
    started = events(alice.sock, "message_started", message_id)[0]
    assert started["mode"] == "retrieval_only" and started["user_message"]["content"].startswith("Is there")
    called = events(alice.sock, "tool_called", message_id)[0]
    returned = events(alice.sock, "tool_returned", message_id)[0]
    assert called["name"] == returned["name"] == "search_datapods" and returned["ok"] is True
    assert returned["datapod_ids"], "the search found the demo weather DataPod"
    seqs, text = delta_text(alice.sock, message_id)
    assert seqs == list(range(1, len(seqs) + 1)) and done["seq"] == len(seqs)
    assert text.startswith("*Retrieval-only answer") and "Daily city weather" in text
    assert f"datapod:{returned['datapod_ids'][0]}" in text
    row = await message_row(client.app, message_id)
    assert row["content"] == text and row["status"] == "complete" and row["model"] == "retrieval-only"
    titled = events(alice.sock, "conversation_titled")
    assert titled and titled[0]["title"] == "Weather data for cities"  # the question words dropped
    conversation = await alice.ok("get_conversation", {"conversation_id": conversation_id})
    assert [m["role"] for m in conversation["messages"]] == ["user", "assistant"]
    assert conversation["conversation"]["title"] == "Weather data for cities"


# --- the scripted endpoint: exact upstream behaviours --------------------------------------------

async def test_usage_chunk_is_recorded_and_total_tokens_kept(aiohttp_client, settings, sockets):
    model, server = await scripted([{"text": ["Hel", "lo", " there"],
                                     "usage": {"prompt_tokens": 42, "completion_tokens": 3, "total_tokens": 45}}])
    try:
        client = await start_app(aiohttp_client, settings, openai_base_url=str(server.make_url("/v1")))
        alice = await sign_in(client, sockets)
        conversation_id = await alice.conversation(title="Mine")
        first = (await alice.send(conversation_id, "hi"))["assistant_message"]["id"]
        done = await wait_finished(alice.sock, first)
        assert done["usage"] == {"prompt_tokens": 42, "completion_tokens": 3, "total_tokens": 45, "estimated": False}
        assert done["finish_reason"] == "stop"
        assert model.requests[0]["stream"] is True
        assert model.requests[0]["stream_options"] == {"include_usage": True}
        assert model.requests[0]["messages"][0]["role"] == "system"
        second = (await alice.send(conversation_id, "again"))["assistant_message"]["id"]
        await wait_finished(alice.sock, second)
        # The second prompt replays the first exchange.
        assert [m["role"] for m in model.requests[1]["messages"]] == ["system", "user", "assistant", "user"]
        assert model.requests[1]["messages"][2]["content"] == "Hello there"
        conversation = await alice.ok("get_conversation", {"conversation_id": conversation_id})
        assert conversation["conversation"]["total_tokens"] == 90
        assert conversation["conversation"]["title"] == "Mine"  # a given title is not replaced
        assert not events(alice.sock, "conversation_titled")
    finally:
        await server.close()


async def test_missing_usage_is_estimated(aiohttp_client, settings, sockets):
    model, server = await scripted([{"text": ["abcd", "efgh"], "usage": None}])
    try:
        client = await start_app(aiohttp_client, settings, openai_base_url=str(server.make_url("/v1")))
        alice = await sign_in(client, sockets)
        conversation_id = await alice.conversation()
        message_id = (await alice.send(conversation_id, "hi"))["assistant_message"]["id"]
        done = await wait_finished(alice.sock, message_id)
        assert done["usage"]["estimated"] is True and done["usage"]["completion_tokens"] == 2
        assert done["usage"]["prompt_tokens"] > 0
        row = await message_row(client.app, message_id)
        assert row["tokens_estimated"] is True and row["tokens"] == done["usage"]["total_tokens"]
    finally:
        await server.close()


async def test_429_with_retry_after_is_honoured_then_succeeds(aiohttp_client, settings, sockets):
    model, server = await scripted([{"status": 429, "headers": {"Retry-After": "1"}}, {"text": ["ok"]}])
    try:
        client = await start_app(aiohttp_client, settings, openai_base_url=str(server.make_url("/v1")))
        alice = await sign_in(client, sockets)
        conversation_id = await alice.conversation()
        message_id = (await alice.send(conversation_id))["assistant_message"]["id"]
        done = await wait_finished(alice.sock, message_id)
        assert done["type"] == "message_completed"
        assert len(model.requests) == 2 and model.times[1] - model.times[0] >= 0.95
    finally:
        await server.close()


async def test_upstream_errors_give_message_failed_with_retryable(aiohttp_client, settings, sockets):
    model, server = await scripted([{"status": 500}])
    try:
        client = await start_app(aiohttp_client, settings, openai_base_url=str(server.make_url("/v1")),
                                 ai_max_retries=1)
        alice = await sign_in(client, sockets)
        conversation_id = await alice.conversation()
        message_id = (await alice.send(conversation_id))["assistant_message"]["id"]
        failed = await wait_finished(alice.sock, message_id)
        assert failed["type"] == "message_failed" and failed["status"] == "failed"
        assert failed["code"] == "upstream_unavailable" and failed["retryable"] is True
        assert len(model.requests) == 2  # one retry
        row = await message_row(client.app, message_id)
        assert row["status"] == "failed" and row["error"]["code"] == "upstream_unavailable"
        # A Retry-After beyond what we wait is passed on to the client instead.
        model.script = [{"status": 429, "headers": {"Retry-After": "3600"}}]
        again = (await alice.ok("regenerate", {"message_id": message_id}))["assistant_message"]["id"]
        limited = await wait_finished(alice.sock, again)
        assert limited["code"] == "upstream_rate_limited" and limited["retryable"] is True
        assert 3500 < limited["retry_after"] <= 3600
        # A refusal that retrying cannot fix is not retryable.
        model.script = [{"status": 401}]
        third = (await alice.ok("regenerate", {"message_id": again}))["assistant_message"]["id"]
        refused = await wait_finished(alice.sock, third)
        assert refused["code"] == "upstream_auth" and refused["retryable"] is False
    finally:
        await server.close()


async def test_tool_call_then_answer(aiohttp_client, settings, sockets):
    model, server = await scripted([
        {"tool_calls": [{"name": "search_datapods", "arguments": {"query": "token prices"}}]},
        {"text": ["Here ", "it is."], "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}}])
    try:
        client = await start_app(aiohttp_client, settings, openai_base_url=str(server.make_url("/v1")))
        async with client.app[POOL].acquire() as conn:
            await load_if_empty(conn, client.app[SETTINGS], client.app[MASTER_KEY])
        alice = await sign_in(client, sockets)
        conversation_id = await alice.conversation()
        message_id = (await alice.send(conversation_id, "What do token prices cost?"))["assistant_message"]["id"]
        done = await wait_finished(alice.sock, message_id)
        assert done["type"] == "message_completed"
        called = events(alice.sock, "tool_called", message_id)
        returned = events(alice.sock, "tool_returned", message_id)
        assert [c["name"] for c in called] == ["search_datapods"]
        assert called[0]["arguments"] == {"query": "token prices"}
        assert returned[0]["ok"] is True and returned[0]["datapod_ids"]
        assert returned[0]["result"][0]["title"] == "Token prices and volumes"
        assert "tools" in model.requests[0] and "tool_choice" not in model.requests[0]  # AI_TOOL_CHOICE=auto
        second = model.requests[1]["messages"]
        assert second[-2]["tool_calls"][0]["function"]["name"] == "search_datapods"
        assert second[-1]["role"] == "tool" and returned[0]["datapod_ids"][0] in second[-1]["content"]
        row = await message_row(client.app, message_id)
        assert row["content"] == "Here it is." and row["tool_calls"][0]["datapod_ids"] == returned[0]["datapod_ids"]
    finally:
        await server.close()


async def test_a_tool_past_its_timeout_is_an_error_the_model_sees(aiohttp_client, settings, sockets):
    model, server = await scripted([
        {"tool_calls": [{"name": "search_datapods", "arguments": {"query": "weather"}}]},
        {"text": ["No luck."]}])
    try:
        # A timeout no database query can meet.
        client = await start_app(aiohttp_client, settings, openai_base_url=str(server.make_url("/v1")),
                                 ai_tool_timeout=1e-6)
        alice = await sign_in(client, sockets)
        conversation_id = await alice.conversation()
        message_id = (await alice.send(conversation_id, "Weather?"))["assistant_message"]["id"]
        assert (await wait_finished(alice.sock, message_id))["type"] == "message_completed"
        returned = events(alice.sock, "tool_returned", message_id)
        assert returned[0]["ok"] is False and returned[0]["result"] == {"error": "the tool took too long"}
        assert "took too long" in model.requests[1]["messages"][-1]["content"]
    finally:
        await server.close()


def test_tool_choice_setting_is_checked():
    assert first_tool_choice("auto") is None
    assert first_tool_choice("get_datapod") == {"type": "function", "function": {"name": "get_datapod"}}
    with pytest.raises(ValueError, match="AI_TOOL_CHOICE"):
        first_tool_choice("drop_tables")


async def test_real_model_calls_a_tool_then_answers(aiohttp_client, settings, sockets,
                                                   llm_tools_server):  # noqa: F811
    # llama-cpp-python's chatml-function-calling streams tool calls only when the choice is
    # forced (AI_TOOL_CHOICE); its grammar makes the model write JSON with the schema's keys, but
    # not within its bounds, so the server's own validation decides whether the tool runs.
    client = await start_app(aiohttp_client, settings, openai_base_url=llm_tools_server,
                             ai_model="stories260K", ai_max_output_tokens=120, ai_context_tokens=1500,
                             ai_max_tool_rounds=1, ai_tool_choice="search_datapods")
    async with client.app[POOL].acquire() as conn:
        await load_if_empty(conn, client.app[SETTINGS], client.app[MASTER_KEY])
    alice = await sign_in(client, sockets)
    conversation_id = await alice.conversation()
    message_id = (await alice.send(conversation_id, "Any weather data?"))["assistant_message"]["id"]
    done = await wait_finished(alice.sock, message_id, timeout=60)
    assert done["type"] == "message_completed", done
    called = events(alice.sock, "tool_called", message_id)
    returned = events(alice.sock, "tool_returned", message_id)
    assert [c["name"] for c in called] == ["search_datapods"]  # once, though llama-cpp repeats it per chunk
    spec = next(t["function"] for t in TOOL_SPECS if t["function"]["name"] == "search_datapods")
    arguments = called[0]["arguments"]
    assert isinstance(arguments, dict) and arguments.keys() <= spec["parameters"]["properties"].keys()
    errors = list(jsonschema.Draft202012Validator(spec["parameters"]).iter_errors(arguments))
    assert returned[0]["ok"] is not errors
    assert ("error" in returned[0]["result"]) is bool(errors)
    row = await message_row(client.app, message_id)
    assert row["status"] == "complete" and json.loads(row["tool_calls"][0]["arguments"]) == arguments
    # The second round (the tool's result in the prompt, no tools) streamed the model's answer.
    _, text = delta_text(alice.sock, message_id)
    assert text and row["content"] == text


SLOW = {"text": [f"w{n} " for n in range(400)], "delay": 0.02}


async def test_limits_refuse_clearly(aiohttp_client, settings, sockets):
    model, server = await scripted([SLOW])
    try:
        client = await start_app(aiohttp_client, settings, openai_base_url=str(server.make_url("/v1")),
                                 ai_messages_per_minute=2, ai_max_input_chars=50)
        alice = await sign_in(client, sockets)
        conversation_id = await alice.conversation()
        too_long = await alice.call("send_message", {"conversation_id": conversation_id, "content": "x" * 51,
                                                     "client_msg_id": "a"})
        assert too_long["error"]["code"] == "payload_too_large" and too_long["error"]["field"] == "content"
        first = (await alice.send(conversation_id, "one"))["assistant_message"]["id"]
        busy = await alice.call("send_message", {"conversation_id": conversation_id, "content": "two",
                                                 "client_msg_id": "b"})
        assert busy["error"]["code"] == "conflict" and busy["error"]["message_id"] == first
        assert (await alice.ok("stop_generation", {"message_id": first}))["status"] == "stopped"
        second = (await alice.send(conversation_id, "two"))["assistant_message"]["id"]
        await alice.ok("stop_generation", {"message_id": second})
        limited = await alice.call("send_message", {"conversation_id": conversation_id, "content": "three",
                                                    "client_msg_id": "c"})
        assert limited["error"]["code"] == "rate_limited" and 50 < limited["error"]["retry_after"] <= 60
        # Deleting the conversation gives nothing back.
        await alice.ok("delete_conversation", {"conversation_id": conversation_id})
        again = await alice.call("send_message", {"conversation_id": await alice.conversation(),
                                                  "content": "four", "client_msg_id": "d"})
        assert again["error"]["code"] == "rate_limited"
        # Someone else is not limited by Alice's use.
        bob = await sign_in(client, sockets)
        other = (await bob.send(await bob.conversation(), "hi"))["assistant_message"]["id"]
        await bob.ok("stop_generation", {"message_id": other})
    finally:
        await server.close()


async def test_a_process_writing_its_most_answers_refuses_more_and_writes_nothing(aiohttp_client, settings,
                                                                                  sockets):
    model, server = await scripted([SLOW])
    try:
        client = await start_app(aiohttp_client, settings, openai_base_url=str(server.make_url("/v1")),
                                 ai_max_streams=2)
        users = [await sign_in(client, sockets) for _ in range(4)]
        conversations = [await user.conversation() for user in users]
        # Sent at once: the admissions wait on the database together, and still only two pass.
        replies = await asyncio.gather(*(user.call("send_message", {
            "conversation_id": conversation, "content": "hello", "client_msg_id": uuid.uuid4().hex})
            for user, conversation in zip(users[:3], conversations)))
        started = [(user, reply["data"]["assistant_message"]["id"])
                   for user, reply in zip(users, replies) if reply["ok"]]
        [(refused_user, refused)] = [(user, reply) for user, reply in zip(users, replies) if not reply["ok"]]
        assert len(started) == 2
        assert refused["error"]["code"] == "rate_limited" and refused["error"]["retry_after"] == 1.0
        refused_conversation = conversations[users.index(refused_user)]
        assert (await refused_user.ok("get_conversation", {"conversation_id": refused_conversation}))["messages"] == []
        assert (await users[3].call("send_message", {"conversation_id": conversations[3], "content": "hi",
                                                     "client_msg_id": "d"}))["error"]["code"] == "rate_limited"
        assert "\nhub_assistant_streams 2.0\n" in await (await client.get("/metrics")).text()
        # A finished answer frees its place.
        first_user, first = started[0]
        await first_user.ok("stop_generation", {"message_id": first})
        again = (await refused_user.send(refused_conversation, "hello again"))["assistant_message"]["id"]
        for user, message_id in (started[1], (refused_user, again)):
            await user.ok("stop_generation", {"message_id": message_id})
    finally:
        await server.close()


async def test_starts_sent_at_once_start_one_answer_per_user_and_one_per_client_msg_id(aiohttp_client, settings,
                                                                                        sockets):
    model, server = await scripted([SLOW])
    try:
        client = await start_app(aiohttp_client, settings, openai_base_url=str(server.make_url("/v1")))
        alice = await sign_in(client, sockets)
        conversations = [await alice.conversation() for _ in range(4)]
        # One answer at a time per user, even when the starts race in different conversations.
        replies = await asyncio.gather(*(alice.call("send_message", {
            "conversation_id": conversation, "content": "hello", "client_msg_id": uuid.uuid4().hex})
            for conversation in conversations))
        [started] = [reply["data"] for reply in replies if reply["ok"]]
        running = started["assistant_message"]["id"]
        refused = [reply["error"] for reply in replies if not reply["ok"]]
        assert len(refused) == 3
        assert all(error["code"] == "conflict" and error["message_id"] == running for error in refused)
        await alice.ok("stop_generation", {"message_id": running})
        # The same send twice at once: one start, and the other one is told it is the same.
        refused_conversation = next(c for c, reply in zip(conversations, replies) if not reply["ok"])
        twice = await asyncio.gather(*(alice.send(refused_conversation, "once", client_msg_id="same")
                                       for _ in range(2)))
        assert sorted(reply["duplicate"] for reply in twice) == [False, True]
        assert twice[0]["assistant_message"]["id"] == twice[1]["assistant_message"]["id"]
        assert twice[0]["user_message"]["id"] == twice[1]["user_message"]["id"]
        await alice.ok("stop_generation", {"message_id": twice[0]["assistant_message"]["id"]})
        async with client.app[POOL].acquire() as conn:
            counts = await conn.fetch(
                "SELECT conversation_id, count(*) AS n FROM ai_messages WHERE conversation_id = ANY($1::uuid[])"
                " GROUP BY conversation_id", [uuid.UUID(c) for c in conversations])
        assert sorted(row["n"] for row in counts) == [2, 2]  # nothing written for the refused starts
    finally:
        await server.close()


async def test_daily_token_quota(aiohttp_client, settings, sockets):
    model, server = await scripted([{"text": ["a"], "usage": {"prompt_tokens": 60, "completion_tokens": 1,
                                                              "total_tokens": 61}}])
    try:
        client = await start_app(aiohttp_client, settings, openai_base_url=str(server.make_url("/v1")),
                                 ai_daily_token_quota=100)
        alice = await sign_in(client, sockets)
        conversation_id = await alice.conversation()
        for n in range(2):
            message_id = (await alice.send(conversation_id, f"m{n}"))["assistant_message"]["id"]
            await wait_finished(alice.sock, message_id)
        refused = await alice.call("send_message", {"conversation_id": conversation_id, "content": "more",
                                                    "client_msg_id": "q"})
        assert refused["error"]["code"] == "rate_limited" and "quota" in refused["error"]["message"]
        assert 0 < refused["error"]["retry_after"] <= 86400
        # Deleting the conversation does not give its tokens back.
        await alice.ok("delete_conversation", {"conversation_id": conversation_id})
        again = await alice.call("send_message", {"conversation_id": await alice.conversation(),
                                                  "content": "more", "client_msg_id": "r"})
        assert again["error"]["code"] == "rate_limited" and "quota" in again["error"]["message"]
    finally:
        await server.close()


async def test_another_user_cannot_read_join_stop_or_resume(aiohttp_client, settings, sockets):
    model, server = await scripted([SLOW])
    try:
        client = await start_app(aiohttp_client, settings, openai_base_url=str(server.make_url("/v1")))
        alice, mallory = await sign_in(client, sockets), await sign_in(client, sockets)
        conversation_id = await alice.conversation()
        sent = await alice.send(conversation_id)
        message_id, user_message_id = sent["assistant_message"]["id"], sent["user_message"]["id"]
        ref = {"conversation_id": conversation_id}
        for event, payload in [("get_conversation", ref), ("rename_conversation", {**ref, "title": "x"}),
                               ("delete_conversation", ref),
                               ("send_message", {**ref, "content": "hi", "client_msg_id": "m"}),
                               ("stop_generation", {"message_id": message_id}),
                               ("regenerate", {"message_id": message_id}),
                               ("edit_message", {"message_id": user_message_id, "content": "x"}),
                               ("switch_branch", {"message_id": message_id}),
                               ("resume_stream", {"message_id": message_id, "after_seq": 0}),
                               ("subscribe", {"channel": f"conversation:{conversation_id}"})]:
            reply = await mallory.call(event, payload)
            assert reply["ok"] is False and reply["error"]["code"] == "forbidden", (event, reply)
        assert (await mallory.ok("list_conversations"))["conversations"] == []
        await asyncio.sleep(0.2)
        assert not events(mallory.sock, "message_delta")
        assert (await message_row(client.app, message_id))["status"] == "streaming"  # not stopped by mallory
        await alice.ok("stop_generation", {"message_id": message_id})
        missing = await alice.call("get_conversation", {"conversation_id": str(uuid.uuid4())})
        assert missing["error"]["code"] == "not_found"
    finally:
        await server.close()


async def test_conversation_crud_and_sync_on_the_user_channel(client, sockets):
    alice = await sign_in(client, sockets)
    other_tab = await sign_in(client, sockets, alice.account)
    await other_tab.ok("subscribe", {"channel": f"user:{alice.id}"})
    first = await alice.conversation(title="First")
    second = await alice.conversation()
    listed = (await alice.ok("list_conversations"))["conversations"]
    assert [c["id"] for c in listed] == [second, first]
    page = await alice.ok("list_conversations", {"limit": 1})
    assert [c["id"] for c in page["conversations"]] == [second] and page["next_before"]
    rest = await alice.ok("list_conversations", {"limit": 1, "before": page["next_before"]})
    assert [c["id"] for c in rest["conversations"]] == [first]
    renamed = await alice.ok("rename_conversation", {"conversation_id": first, "title": "  Renamed  "})
    assert renamed["conversation"]["title"] == "Renamed"
    await alice.ok("delete_conversation", {"conversation_id": second})
    assert [c["id"] for c in (await alice.ok("list_conversations"))["conversations"]] == [first]
    await wait_until(lambda: events(other_tab.sock, "conversation_deleted"))
    assert [e["conversation"]["id"] for e in events(other_tab.sock, "conversation_created")] == [first, second]
    assert events(other_tab.sock, "conversation_titled")[0]["title"] == "Renamed"
    bad = await alice.call("rename_conversation", {"conversation_id": first, "title": ""})
    assert bad["error"]["code"] == "invalid_payload"


async def test_startup_marks_leftover_streaming_rows_interrupted(db, settings, aiohttp_client):
    user_id = await db.fetchval(
        "INSERT INTO users (username, email, password_hash) VALUES ('left', 'left@example.org', 'x') RETURNING id")
    conversation_id = await db.fetchval("INSERT INTO ai_conversations (user_id) VALUES ($1) RETURNING id", user_id)
    message_id = await db.fetchval(
        """INSERT INTO ai_messages (conversation_id, role, content, status, seq)
           VALUES ($1, 'assistant', 'half an ans', 'streaming', 3) RETURNING id""", conversation_id)
    await start_app(aiohttp_client, settings)
    row = await db.fetchrow("SELECT status, content, error FROM ai_messages WHERE id = $1", message_id)
    assert row["status"] == "interrupted" and row["content"] == "half an ans"
    assert row["error"] == {"code": "interrupted", "retryable": True}


async def test_shutdown_marks_running_answers_interrupted(db, settings, aiohttp_client, sockets):
    model, server = await scripted([SLOW])
    try:
        client = await start_app(aiohttp_client, settings, openai_base_url=str(server.make_url("/v1")))
        alice = await sign_in(client, sockets)
        message_id = (await alice.send(await alice.conversation()))["assistant_message"]["id"]
        await wait_until(lambda: len(events(alice.sock, "message_delta")) >= 3)
        await client.close()
        row = await db.fetchrow("SELECT status, content, error FROM ai_messages WHERE id = $1",
                                uuid.UUID(message_id))
        assert row["status"] == "interrupted" and row["content"].startswith("w0 w1 w2 ")
        assert row["error"]["code"] == "interrupted" and row["error"]["retryable"] is True
    finally:
        await server.close()


# --- the real model -----------------------------------------------------------------------------

async def slow_model(llm_server, delay: float = 0.03) -> tuple[SlowProxy, TestServer]:  # noqa: F811
    proxy = SlowProxy(llm_server, delay)
    server = TestServer(proxy.app)
    await server.start_server()
    return proxy, server


async def test_real_model_streams_to_every_tab_and_completes(model_app, sockets):
    alice = await sign_in(model_app, sockets)
    conversation_id = await alice.conversation()
    other_tab = await sign_in(model_app, sockets, alice.account)
    await other_tab.ok("subscribe", {"channel": f"conversation:{conversation_id}"})
    sent = await alice.send(conversation_id, "Once upon a time there was a dog.")
    message_id = sent["assistant_message"]["id"]
    done = await wait_finished(alice.sock, message_id)
    assert done["type"] == "message_completed" and done["status"] == "complete"
    assert done["finish_reason"] in ("stop", "length")
    seqs, text = delta_text(alice.sock, message_id)
    assert len(seqs) > 3 and seqs == list(range(1, len(seqs) + 1)) and done["seq"] == len(seqs)
    await wait_until(lambda: finished(other_tab.sock, message_id) is not None)
    assert delta_text(other_tab.sock, message_id) == (seqs, text)  # the other tab saw the same stream
    assert events(other_tab.sock, "message_started")[0]["user_message"]["id"] == sent["user_message"]["id"]
    row = await message_row(model_app.app, message_id)
    assert row["content"] == text and row["status"] == "complete" and row["model"] == "stories260K"
    # llama-cpp-python ignores stream_options.include_usage, so the server estimates.
    usage = done["usage"]
    assert usage["completion_tokens"] > 0 and usage["prompt_tokens"] > 0
    assert row["tokens"] == usage["total_tokens"] and row["tokens_estimated"] is usage["estimated"]
    conversation = await alice.ok("get_conversation", {"conversation_id": conversation_id})
    assert conversation["conversation"]["total_tokens"] == usage["total_tokens"]
    # Titled at once from the first message, then (in the background) by the model itself.
    await wait_until(lambda: events(alice.sock, "conversation_titled"))
    assert events(alice.sock, "conversation_titled")[0]["title"] == "Once upon a time there was a dog"
    assert [m["id"] for m in conversation["messages"]] == [sent["user_message"]["id"], message_id]
    assert conversation["messages"][1]["content"] == text


async def test_resending_a_client_msg_id_creates_nothing_twice(model_app, sockets):
    alice = await sign_in(model_app, sockets)
    conversation_id = await alice.conversation()
    first = await alice.send(conversation_id, "A cat sat.", client_msg_id="tab1-1")
    again = await alice.send(conversation_id, "A cat sat.", client_msg_id="tab1-1")
    assert again["duplicate"] is True
    assert again["user_message"]["id"] == first["user_message"]["id"]
    assert again["assistant_message"]["id"] == first["assistant_message"]["id"]
    await wait_finished(alice.sock, first["assistant_message"]["id"])
    after = await alice.send(conversation_id, "A cat sat.", client_msg_id="tab1-1")
    assert after["assistant_message"]["status"] == "complete" and after["duplicate"] is True
    async with model_app.app[POOL].acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM ai_messages WHERE conversation_id = $1",
                                   uuid.UUID(conversation_id)) == 2
    assert len(events(alice.sock, "message_started")) == 1


async def test_stop_mid_stream_keeps_the_partial_answer(aiohttp_client, settings, sockets, llm_server):  # noqa: F811
    proxy, server = await slow_model(llm_server)
    try:
        client = await start_app(aiohttp_client, settings, openai_base_url=str(server.make_url("/v1")),
                                 ai_max_output_tokens=400, ai_context_tokens=1500, ai_max_tool_rounds=0)
        alice = await sign_in(client, sockets)
        message_id = (await alice.send(await alice.conversation()))["assistant_message"]["id"]
        await wait_until(lambda: len(events(alice.sock, "message_delta")) >= 3)
        stopped = await alice.ok("stop_generation", {"message_id": message_id})
        assert stopped["status"] == "stopped"
        done = await wait_finished(alice.sock, message_id)
        assert done["type"] == "message_completed" and done["status"] == "stopped"
        assert done["finish_reason"] == "stopped" and done["usage"]["estimated"] is True
        await wait_until(lambda: proxy.disconnects == 1)  # the upstream stream was closed
        await asyncio.sleep(0.3)
        seqs, text = delta_text(alice.sock, message_id)
        assert seqs == list(range(1, done["seq"] + 1)) and 3 <= done["seq"] < 400
        row = await message_row(client.app, message_id)
        assert row["status"] == "stopped" and row["content"] == text and text
        # Stopping again changes nothing.
        assert (await alice.ok("stop_generation", {"message_id": message_id}))["status"] == "stopped"
    finally:
        await server.close()


async def test_refresh_mid_stream_resumes_without_gap_or_duplicate(aiohttp_client, settings, sockets,
                                                                   llm_server):  # noqa: F811
    proxy, server = await slow_model(llm_server)
    try:
        client = await start_app(aiohttp_client, settings, openai_base_url=str(server.make_url("/v1")),
                                 ai_max_output_tokens=150, ai_context_tokens=1500, ai_max_tool_rounds=0)
        tab = await sign_in(client, sockets)
        message_id = (await tab.send(await tab.conversation()))["assistant_message"]["id"]
        await wait_until(lambda: len(events(tab.sock, "message_delta")) >= 5)
        await tab.sock.close()  # the refresh
        before_seqs, before_text = delta_text(tab.sock, message_id)
        await asyncio.sleep(0.3)  # deltas flow meanwhile, to nobody
        fresh = await sign_in(client, sockets, tab.account)
        resumed = await fresh.ok("resume_stream", {"message_id": message_id, "after_seq": before_seqs[-1]})
        assert resumed["reset"] is False and resumed["status"] == "streaming"
        missed = resumed["deltas"]
        assert [d["seq"] for d in missed] == list(range(before_seqs[-1] + 1, resumed["seq"] + 1))
        assert missed, "deltas were produced while the tab was away"
        done = await wait_finished(fresh.sock, message_id)
        text, last = before_text + "".join(d["text"] for d in missed), resumed["seq"]
        for delta in events(fresh.sock, "message_delta", message_id):
            if delta["seq"] <= last:
                continue  # arrived both live and in the ack
            assert delta["seq"] == last + 1, "no gap"
            text, last = text + delta["text"], delta["seq"]
        assert last == done["seq"]
        row = await message_row(client.app, message_id)
        assert row["content"] == text
        # After the end, the saved answer serves late resumes.
        late = await fresh.ok("resume_stream", {"message_id": message_id, "after_seq": 2})
        assert late["reset"] is True and late["content"] == text and late["status"] == "complete"
        current = await fresh.ok("resume_stream", {"message_id": message_id, "after_seq": last})
        assert current["reset"] is False and current["deltas"] == []
    finally:
        await server.close()


async def test_edit_message_forks_a_branch(model_app, sockets):
    alice = await sign_in(model_app, sockets)
    conversation_id = await alice.conversation()
    first = await alice.send(conversation_id, "The sun was hot.")
    await wait_finished(alice.sock, first["assistant_message"]["id"])
    second = await alice.send(conversation_id, "The bird sang.")
    await wait_finished(alice.sock, second["assistant_message"]["id"])
    edited = await alice.ok("edit_message", {"message_id": first["user_message"]["id"],
                                             "content": "The moon was cold."})
    await wait_finished(alice.sock, edited["assistant_message"]["id"])
    conversation = await alice.ok("get_conversation", {"conversation_id": conversation_id})
    messages = conversation["messages"]
    assert [m["id"] for m in messages] == [edited["user_message"]["id"], edited["assistant_message"]["id"]]
    assert messages[0]["content"] == "The moon was cold." and messages[0]["parent_id"] is None
    assert messages[0]["sibling_ids"] == [first["user_message"]["id"], edited["user_message"]["id"]]
    assert conversation["conversation"]["current_leaf_id"] == edited["assistant_message"]["id"]
    # The old branch is still there.
    back = await alice.ok("switch_branch", {"message_id": first["user_message"]["id"]})
    assert [m["id"] for m in back["messages"]] == [
        first["user_message"]["id"], first["assistant_message"]["id"],
        second["user_message"]["id"], second["assistant_message"]["id"]]
    # Regenerating adds a sibling answer and makes it current.
    regenerated = await alice.ok("regenerate", {"message_id": second["assistant_message"]["id"]})
    await wait_finished(alice.sock, regenerated["assistant_message"]["id"])
    now = await alice.ok("get_conversation", {"conversation_id": conversation_id})
    assert now["messages"][-1]["id"] == regenerated["assistant_message"]["id"]
    assert now["messages"][-1]["sibling_ids"] == [second["assistant_message"]["id"],
                                                  regenerated["assistant_message"]["id"]]
    total = sum(m["usage"]["total_tokens"] for m in now["messages"] + back["messages"] if m["usage"])
    assert now["conversation"]["total_tokens"] > 0 and total > 0


async def test_another_process_resumes_and_stops_a_stream(aiohttp_client, settings, sockets, redis_url,
                                                          llm_server):  # noqa: F811
    proxy, server = await slow_model(llm_server, delay=0.05)
    try:
        shared = settings.replace(redis_url=redis_url, redis_prefix=f"t{uuid.uuid4().hex[:12]}:",
                                  openai_base_url=str(server.make_url("/v1")), ai_max_output_tokens=400,
                                  ai_context_tokens=1500, ai_max_tool_rounds=0)
        node_a = await aiohttp_client(create_app(shared))
        node_b = await aiohttp_client(create_app(shared))
        writer = await sign_in(node_a, sockets)
        message_id = (await writer.send(await writer.conversation()))["assistant_message"]["id"]
        await wait_until(lambda: len(events(writer.sock, "message_delta")) >= 10)
        reader = await sign_in(node_b, sockets, writer.account)
        resumed = await reader.ok("resume_stream", {"message_id": message_id, "after_seq": 0})
        assert resumed["status"] == "streaming"
        await asyncio.sleep(0.2)
        stopping = await reader.ok("stop_generation", {"message_id": message_id})
        assert stopping["status"] == "stopping"
        done = await wait_finished(reader.sock, message_id)
        assert done["status"] == "stopped"
        row = await message_row(node_a.app, message_id)
        # Node B's view: the resume snapshot, then live deltas (dropping those already applied).
        text = resumed.get("content", "") + "".join(d["text"] for d in resumed["deltas"])
        last = resumed["seq"]
        for delta in events(reader.sock, "message_delta", message_id):
            if delta["seq"] > last:
                assert delta["seq"] == last + 1
                text, last = text + delta["text"], delta["seq"]
        assert last == done["seq"] == row["seq"] and text == row["content"]
    finally:
        await server.close()


async def test_one_save_serves_every_running_answer_and_stops_only_those_asked(
        aiohttp_client, settings, sockets, monkeypatch):
    # A stop requested by another process (the row's flag) and a row deleted by another process
    # reach their answers through the one periodic save; the third answer streams on.
    saved_together: list[int] = []
    save_partials = assistant_db.save_partials

    async def counting(conn, saves):
        stops = await save_partials(conn, saves)
        saved_together.append(len(saves))  # once written: the test reads the rows after it
        return stops

    monkeypatch.setattr(assistant_db, "save_partials", counting)
    _, server = await scripted([{"text": [f"w{i} " for i in range(60)], "delay": 0.05}] * 3)
    try:
        client = await start_app(aiohttp_client, settings, openai_base_url=str(server.make_url("/v1")),
                                 ai_save_interval=0.2)
        users = [await sign_in(client, sockets) for _ in range(3)]
        ids = [(await user.send(await user.conversation()))["assistant_message"]["id"] for user in users]
        await wait_until(lambda: all(len(events(u.sock, "message_delta")) >= 3 for u in users))
        saves_before = len(saved_together)  # the text is out: a save from now on holds some
        await wait_until(lambda: 3 in saved_together[saves_before:])
        streaming = await message_row(client.app, ids[2])
        assert streaming["status"] == "streaming" and streaming["content"] and streaming["seq"] >= 1
        async with client.app[POOL].acquire() as conn:
            assert await assistant_db.request_stop(conn, uuid.UUID(ids[0]))
            await conn.execute("DELETE FROM ai_messages WHERE id = $1", uuid.UUID(ids[1]))
        stopped = await wait_finished(users[0].sock, ids[0])
        assert stopped["status"] == "stopped" and stopped["finish_reason"] == "stopped"
        await wait_until(lambda: client.app[ASSISTANT].local(uuid.UUID(ids[1])) is None)
        assert finished(users[1].sock, ids[1]) is None  # its row is gone: nothing to finish or tell
        completed = await wait_finished(users[2].sock, ids[2])
        assert completed["status"] == "complete" and completed["seq"] > streaming["seq"]
        row = await message_row(client.app, ids[2])
        assert row["content"] == delta_text(users[2].sock, ids[2])[1]
        assert max(saved_together) == 3
    finally:
        await server.close()


async def test_deltas_whose_batch_cannot_be_stored_still_reach_the_watchers_in_order(
        aiohttp_client, settings, sockets, monkeypatch):
    # A batch of deltas goes to history in one call; when that call finds the bus unavailable, each
    # delta is published on its own, which delivers it here even while Redis stays down.
    _, server = await scripted([{"text": [f"w{i} " for i in range(20)], "delay": 0.01}])
    try:
        client = await start_app(aiohttp_client, settings, openai_base_url=str(server.make_url("/v1")))
        history = client.app[REALTIME].bus.history
        refused: list[int] = []

        async def unavailable(events):
            refused.append(len(events))
            raise BusUnavailable()

        monkeypatch.setattr(history, "append_many", unavailable)
        alice = await sign_in(client, sockets)
        message_id = (await alice.send(await alice.conversation()))["assistant_message"]["id"]
        done = await wait_finished(alice.sock, message_id)
        seqs, text = delta_text(alice.sock, message_id)
        assert refused and done["status"] == "complete"
        assert seqs == list(range(1, done["seq"] + 1)) and text == "".join(f"w{i} " for i in range(20))
        assert (await message_row(client.app, message_id))["content"] == text
    finally:
        await server.close()


async def test_text_emitted_within_the_delta_interval_goes_out_in_one_history_call(
        aiohttp_client, settings, sockets, monkeypatch):
    # Three answers stream a token every 5 ms; with a 50 ms interval each history call carries a
    # delta of every running answer, and a delta carries the tokens of its interval.
    tokens = [f"w{i} " for i in range(40)]
    _, server = await scripted([{"text": tokens, "delay": 0.005}] * 3)
    try:
        client = await start_app(aiohttp_client, settings, openai_base_url=str(server.make_url("/v1")),
                                 ai_delta_interval=0.05)
        history = client.app[REALTIME].bus.history
        batches: list[list[str]] = []
        append_many = history.append_many

        async def recording(events):
            batches.append([channel for channel, type, _ in events if type == "message_delta"])
            return await append_many(events)

        monkeypatch.setattr(history, "append_many", recording)
        users = [await sign_in(client, sockets) for _ in range(3)]
        conversations = [await user.conversation() for user in users]
        ids = [(await user.send(conversation))["assistant_message"]["id"]
               for user, conversation in zip(users, conversations)]
        for user, message_id in zip(users, ids):
            done = await wait_finished(user.sock, message_id)
            seqs, text = delta_text(user.sock, message_id)
            assert done["status"] == "complete" and text == "".join(tokens)
            assert seqs == list(range(1, done["seq"] + 1)) and len(seqs) <= 12, seqs
        assert all(len(channels) == len(set(channels)) for channels in batches)  # a delta per answer
        assert max(len(channels) for channels in batches) == 3, batches
    finally:
        await server.close()


async def test_an_answers_first_text_does_not_wait_for_the_interval(aiohttp_client, settings, sockets):
    # A long interval (100 ms, the most allowed) so that waiting for it would show.
    model, server = await scripted([{"text": ["first ", "second"], "delay": 1.0}])
    try:
        client = await start_app(aiohttp_client, settings, openai_base_url=str(server.make_url("/v1")),
                                 ai_delta_interval=0.1)
        alice = await sign_in(client, sockets)
        message_id = (await alice.send(await alice.conversation()))["assistant_message"]["id"]
        await wait_until(lambda: events(alice.sock, "message_delta", message_id), interval=0.002)
        assert time.monotonic() - model.times[0] < 0.08  # asked at times[0]; the interval alone is 0.1
        await alice.ok("stop_generation", {"message_id": message_id})
    finally:
        await server.close()


async def test_an_answer_checks_out_a_pooled_connection_twice_to_start_and_to_finish(
        aiohttp_client, settings, sockets, monkeypatch):
    # Each checkout can queue behind every other answer's: with 200 answers of three messages the
    # prompt's reads, on connections of their own after the start's, were most of the time to the
    # first token. The prompt is read in the start's transaction, the usage with the final state.
    model, server = await scripted([{"text": ["Hel", "lo"], "usage": {"prompt_tokens": 42, "completion_tokens": 2}}])
    checkouts: list[str] = []
    acquire = asyncpg.Pool.acquire

    def counted(pool, *args, **kwargs):
        caller = sys._getframe(1).f_code
        if "/server/services/" in caller.co_filename:
            checkouts.append(caller.co_qualname)
        return acquire(pool, *args, **kwargs)

    monkeypatch.setattr(asyncpg.Pool, "acquire", counted)
    try:
        # No save or sweep during the answer; titled, so no title job.
        client = await start_app(aiohttp_client, settings, openai_base_url=str(server.make_url("/v1")),
                                 ai_save_interval=60.0, ai_stale_after=600.0)
        alice = await sign_in(client, sockets)
        await alice.ok("subscribe", {"channel": f"user:{alice.id}"})
        conversation_id = await alice.conversation(title="Mine")
        checkouts.clear()
        message_id = (await alice.send(conversation_id, "hi"))["assistant_message"]["id"]
        assert (await wait_finished(alice.sock, message_id))["type"] == "message_completed"
        await wait_until(lambda: events(alice.sock, "usage_changed"))
        assert events(alice.sock, "usage_changed")[0]["today"]["total_tokens"] == 44
        assert checkouts == ["_admit_and_start", "Assistant._finish"]
        # What the start read went to the model: the user's turn, and no query_dataset for a user
        # who holds no dataset.
        request = model.requests[0]
        assert [m["role"] for m in request["messages"]] == ["system", "user"]
        assert request["messages"][-1]["content"] == "hi"
        assert "query_dataset" not in [t["function"]["name"] for t in request["tools"]]
    finally:
        await server.close()


async def test_context_is_trimmed_to_the_budget_oldest_first(aiohttp_client, settings, sockets):
    model, server = await scripted([{"text": ["x" * 200]}])  # each answer ~50 estimated tokens
    try:
        client = await start_app(aiohttp_client, settings, openai_base_url=str(server.make_url("/v1")),
                                 ai_context_tokens=400, ai_max_output_tokens=100)
        alice = await sign_in(client, sockets)
        conversation_id = await alice.conversation()
        answers = []
        for n in range(4):
            answers.append((await alice.send(conversation_id, f"question {n} " + "y" * 100))["assistant_message"]["id"])
            await wait_finished(alice.sock, answers[-1])
        trimmed = events(alice.sock, "context_trimmed")
        assert trimmed and trimmed[0]["message_id"] in answers[1:] and trimmed[-1]["message_id"] == answers[-1]
        last_prompt = model.requests[-1]["messages"]
        assert last_prompt[0]["role"] == "system" and last_prompt[1]["role"] == "user"
        assert last_prompt[-1]["content"].startswith("question 3")
        assert not any(m["content"].startswith("question 0") for m in last_prompt if m["role"] == "user")
        assert len(last_prompt) - 1 < 7  # fewer than the 7 stored messages before the last question
        too_big = await alice.call("send_message", {"conversation_id": conversation_id, "content": "z" * 1500,
                                                    "client_msg_id": "big"})
        failed = await wait_finished(alice.sock, too_big["data"]["assistant_message"]["id"])
        assert failed["code"] == "context_too_long" and failed["retryable"] is False
    finally:
        await server.close()


async def read_sse_until(response, final_types=("message_completed", "message_failed")) -> list[tuple[str, dict]]:
    import json

    messages, current = [], {}
    while True:
        line = (await asyncio.wait_for(response.content.readline(), 30)).decode().rstrip("\n")
        if line.startswith(":"):
            continue
        if not line:
            if "event" in current:
                messages.append((current["event"], json.loads(current["data"])))
                if current["event"] in final_types:
                    return messages
            current = {}
            continue
        name, _, value = line.partition(": ")
        current[name] = value


async def test_rest_fallback_streams_server_sent_events(model_app):
    alice, bob = await register(model_app), await register(model_app)
    auth = {"Authorization": f"Bearer {alice['token']}"}
    created = await model_app.post("/api/v1/conversations", json={"title": "Over REST"}, headers=auth)
    assert created.status == 201
    conversation_id = (await created.json())["data"]["conversation"]["id"]
    url = f"/api/v1/conversations/{conversation_id}/messages"
    async with model_app.post(url, json={"content": "A frog hopped.", "client_msg_id": "r1"},
                              headers=auth) as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        stream = await read_sse_until(response)
    assert stream[0][0] == "message_accepted" and stream[1][0] == "message_started"
    message_id = stream[0][1]["assistant_message"]["id"]
    deltas = [data for type_, data in stream if type_ == "message_delta"]
    assert [d["seq"] for d in deltas] == list(range(1, len(deltas) + 1))
    assert stream[-1][0] == "message_completed" and stream[-1][1]["seq"] == len(deltas)
    listed = await (await model_app.get(url, headers=auth)).json()
    assert listed["data"]["messages"][-1]["content"] == "".join(d["text"] for d in deltas)
    # JSON instead of a stream.
    plain = await model_app.post(url, json={"content": "A bee buzzed.", "client_msg_id": "r2", "stream": False},
                                 headers=auth)
    body = (await plain.json())["data"]
    assert body["assistant_message"]["status"] == "complete" and body["assistant_message"]["content"]
    resent = await model_app.post(url, json={"content": "A bee buzzed.", "client_msg_id": "r2"}, headers=auth)
    assert (await resent.json())["data"]["duplicate"] is True
    stop = await model_app.post(f"/api/v1/messages/{message_id}/stop", headers=auth)
    assert (await stop.json())["data"]["status"] == "complete"
    conversations = await (await model_app.get("/api/v1/conversations", headers=auth)).json()
    assert [c["id"] for c in conversations["data"]["conversations"]] == [conversation_id]
    assert (await model_app.get(url)).status == 401
    assert (await model_app.get(url, headers={"Authorization": f"Bearer {bob['token']}"})).status == 403
    assert (await model_app.get("/api/v1/conversations/nope/messages", headers=auth)).status == 400


async def test_stream_breaking_midway_keeps_the_partial_text(aiohttp_client, settings, sockets):
    model, server = await scripted([{"text": ["Half ", "an ", "answer"], "break": True}])
    try:
        client = await start_app(aiohttp_client, settings, openai_base_url=str(server.make_url("/v1")))
        alice = await sign_in(client, sockets)
        message_id = (await alice.send(await alice.conversation()))["assistant_message"]["id"]
        failed = await wait_finished(alice.sock, message_id)
        assert failed["type"] == "message_failed" and failed["code"] == "upstream_interrupted"
        assert failed["retryable"] is True
        assert len(model.requests) == 1  # text was produced: no silent retry that would repeat it
        row = await message_row(client.app, message_id)
        assert row["status"] == "failed" and row["content"] == "Half an answer" and row["tokens_estimated"]
        # Text that arrives together may go out as one delta; the seq counts the deltas sent.
        assert 1 <= failed["seq"] == row["seq"] <= 3
    finally:
        await server.close()


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
async def test_a_stream_is_read_whatever_its_line_ends_and_wherever_its_packets_split(newline):
    # Events cut mid-line, mid-CRLF and mid-event, each piece its own write; a multi-line event,
    # comments and other fields; chunks with and without text; then [DONE] and bytes after it.
    def event(*lines: bytes) -> bytes:
        return b"".join(line + newline for line in lines) + newline

    body = (event(b": keep-alive") + event(b"event: chunk", b'data: {"choices": [{"delta": {"content": "Hel"}}]}')
            + event(b'data: {"choices": [{"delta":', b'data: {"content": "lo"}}]}')
            + event(b'data:{"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}')
            + event(b"data: [DONE]") + event(b'data: {"choices": [{"delta": {"content": "late"}}]}'))
    mid_line_end = body.index(b'"delta":' + newline) + len(b'"delta":') + 1  # between CR and LF
    cuts = sorted({7, 30, mid_line_end, body.index(b"lo") + 1, len(body) // 2, body.index(b"[DONE]") + 2})

    asked: list[tuple[str | None, dict]] = []

    async def answer(request: web.Request) -> web.StreamResponse:
        asked.append((request.headers.get("Authorization"), await request.json()))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for start, end in zip([0, *cuts], [*cuts, len(body)]):
            await response.write(body[start:end])
            await asyncio.sleep(0.01)  # each piece reaches the reader on its own
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    server = TestServer(app)
    await server.start_server()
    model = ChatModel(Settings().replace(openai_base_url=str(server.make_url("/v1")), openai_api_key="sk-test",
                                         ai_model="m1", ai_max_retries=0))
    try:
        chunks = [chunk async for chunk in model.stream([{"role": "user", "content": "hi"}])]
    finally:
        await model.close()
        await server.close()
    texts = [c["delta"]["content"] for chunk in chunks for c in chunk["choices"]]
    assert texts == ["Hel", "lo"]  # the second event's two data lines joined by a newline
    assert chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 2} and len(chunks) == 3
    [(authorization, request)] = asked
    assert authorization == "Bearer sk-test"
    assert request["model"] == "m1" and request["stream"] is True and request["messages"][0]["content"] == "hi"
    assert request["stream_options"] == {"include_usage": True}


async def test_more_than_a_hundred_streams_reach_the_model_at_once():
    # aiohttp's default connector holds 100 connections: the 101st answer waited, unseen by the
    # user and with no timeout, for another one to end.
    streams = 130
    open_now, peak, everyone = 0, 0, asyncio.Event()

    async def answer(request: web.Request) -> web.StreamResponse:
        nonlocal open_now, peak
        open_now += 1
        peak = max(peak, open_now)
        if open_now == streams:
            everyone.set()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        with contextlib.suppress(asyncio.TimeoutError):  # held open until every stream has come
            await asyncio.wait_for(everyone.wait(), 3)
        await response.write(b'data: {"choices": [{"delta": {"content": "ok"}}]}\n\ndata: [DONE]\n\n')
        open_now -= 1
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    server = TestServer(app)
    await server.start_server()
    model = ChatModel(Settings().replace(openai_base_url=str(server.make_url("/v1")), ai_max_retries=0))

    async def read() -> list[dict]:
        return [chunk async for chunk in model.stream([{"role": "user", "content": "hi"}])]
    try:
        answers = await asyncio.gather(*(read() for _ in range(streams)))
    finally:
        await model.close()
        await server.close()
    assert peak == streams, f"only {peak} of {streams} streams reached the model together"
    assert all(chunks[0]["choices"][0]["delta"]["content"] == "ok" for chunks in answers)


async def test_a_stream_the_model_leaves_silent_fails_after_ai_timeout_and_keep_alives_count_as_heard():
    def chunk(text: str) -> bytes:
        return b"data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": text}}]}).encode() + b"\n\n"

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(chunk("first"))
        if body["messages"][-1]["content"] == "stall":
            await asyncio.sleep(0.2)
            await response.write(chunk(" more"))
            await asyncio.sleep(30)  # silent after its second token
        else:
            for _ in range(6):  # 1.8 s of comments only, longer than AI_TIMEOUT
                await asyncio.sleep(0.3)
                await response.write(b": still thinking\n\n")
            await response.write(chunk(" second") + b"data: [DONE]\n\n")
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", completions)
    server = TestServer(app)
    await server.start_server()
    model = ChatModel(Settings().replace(openai_base_url=str(server.make_url("/v1")), ai_timeout=1, ai_max_retries=0))
    try:
        texts: list[str] = []
        started = time.monotonic()
        with pytest.raises(ModelError) as failure:
            async for chunk_ in model.stream([{"role": "user", "content": "stall"}]):
                texts.append(chunk_["choices"][0]["delta"]["content"])
        assert failure.value.code == "upstream_timeout" and texts == ["first", " more"]
        assert 1.1 < time.monotonic() - started < 5
        texts.clear()
        async for chunk_ in model.stream([{"role": "user", "content": "keep alive"}]):
            texts.append(chunk_["choices"][0]["delta"]["content"])
        assert texts == ["first", " second"]
    finally:
        await model.close()
        await server.close()


@pytest.mark.parametrize("call", ["stream", "complete"])
async def test_an_endpoint_that_refuses_or_never_answers_is_told_apart(call):
    # The SDK's aiohttp transport calls a refused connection a connect timeout; the client must be
    # told the endpoint is unreachable, not slow.
    silent_connections: list[asyncio.StreamWriter] = []

    async def accept_and_say_nothing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        silent_connections.append(writer)

    silent = await asyncio.start_server(accept_and_say_nothing, "127.0.0.1", 0)
    refusing = socket.socket()
    refusing.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    messages = [{"role": "user", "content": "hello"}]
    try:
        for port, code in ((refusing.getsockname()[1], "upstream_unreachable"),
                           (silent.sockets[0].getsockname()[1], "upstream_timeout")):
            model = ChatModel(Settings().replace(openai_base_url=f"http://127.0.0.1:{port}/v1", ai_timeout=1,
                                                 ai_max_retries=0))
            try:
                with pytest.raises(ModelError) as failure:
                    if call == "stream":
                        async for _ in model.stream(messages):
                            pass
                    else:
                        await model.complete(messages)
                assert failure.value.code == code and failure.value.retryable
            finally:
                await model.close()
    finally:
        refusing.close()
        silent.close()
        for writer in silent_connections:
            writer.close()
