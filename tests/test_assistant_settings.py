"""Assistant settings over real HTTP, real sockets and real PostgreSQL (issue 20, part 2): the day's
usage and `usage_changed`, a conversation's model (listed from the real tiny model's server) and
system prompt, and automatic titles (heuristic, or written by the model)."""

from __future__ import annotations

import asyncio
import json
import urllib.request
import uuid

import pytest
from aiohttp.test_utils import TestServer

from db.pool import POOL
from server.services.assistant import ASSISTANT, SYSTEM_PROMPT, heuristic_title, sanitise_title
from tests.helpers import wait_until
from tests.llm_server import ScriptedModel, llm_server  # noqa: F401 - fixture
from tests.test_assistant import events, sign_in, start_app, wait_finished

USAGE = {"prompt_tokens": 42, "completion_tokens": 3, "total_tokens": 45}
TITLE_USAGE = {"prompt_tokens": 30, "completion_tokens": 7, "total_tokens": 37}


async def titled_model(script: list[dict], **options) -> tuple[ScriptedModel, TestServer]:
    model = ScriptedModel(script, title=options.pop("title", "Title"), title_usage=TITLE_USAGE, **options)
    server = TestServer(model.app)
    await server.start_server()
    return model, server


def auth(user) -> dict:
    return {"Authorization": f"Bearer {user.account['token']}"}


async def stored_usage_today(app, user_id: str) -> dict:
    """The day's usage summed from the stored answers themselves (not from ai_usage)."""
    async with app[POOL].acquire() as conn:
        row = await conn.fetchrow(
            """SELECT coalesce(sum(m.prompt_tokens), 0) AS prompt, coalesce(sum(m.completion_tokens), 0) AS completion,
                      coalesce(sum(m.tokens), 0) AS total
                 FROM ai_messages m JOIN ai_conversations c ON c.id = m.conversation_id
                WHERE c.user_id = $1 AND m.role = 'assistant'
                  AND m.created_at >= date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'""",
            uuid.UUID(user_id))
    return {"prompt_tokens": row["prompt"], "completion_tokens": row["completion"], "total_tokens": row["total"]}


async def conversation_row(app, conversation_id: str):
    async with app[POOL].acquire() as conn:
        return await conn.fetchrow("SELECT * FROM ai_conversations WHERE id = $1", uuid.UUID(conversation_id))


# --- usage ----------------------------------------------------------------------------------------

async def test_usage_equals_the_stored_answers_and_is_pushed_after_each(aiohttp_client, settings, sockets):
    model, server = await titled_model([{"text": ["Hel", "lo"], "usage": USAGE}])
    try:
        client = await start_app(aiohttp_client, settings, openai_base_url=str(server.make_url("/v1")),
                                 ai_model="scripted", ai_daily_token_quota=1000, ai_messages_per_minute=7)
        alice, bob = await sign_in(client, sockets), await sign_in(client, sockets)
        await alice.ok("subscribe", {"channel": f"user:{alice.id}"})
        empty = await alice.ok("get_usage")
        assert empty["today"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        assert empty["quota"] == {"daily_tokens": 1000, "used_tokens": 0, "remaining_tokens": 1000}
        assert empty["conversations"] == [] and empty["rate"]["messages_per_minute"] == 7
        first = await alice.conversation(title="First")  # titled: no title call, only answers count
        second = await alice.conversation(title="Second")
        for n, conversation_id in enumerate([first, first, second]):
            message_id = (await alice.send(conversation_id, f"question {n}"))["assistant_message"]["id"]
            assert (await wait_finished(alice.sock, message_id))["usage"]["total_tokens"] == 45
            await wait_until(lambda: len(events(alice.sock, "usage_changed")) == n + 1)
            pushed = events(alice.sock, "usage_changed")[-1]
            assert pushed["today"]["total_tokens"] == 45 * (n + 1) and pushed["conversation_id"] == conversation_id
            assert pushed["quota"]["remaining_tokens"] == 1000 - 45 * (n + 1)
        stored = await stored_usage_today(client.app, alice.id)
        assert stored == {"prompt_tokens": 126, "completion_tokens": 9, "total_tokens": 135}
        usage = await alice.ok("get_usage")
        assert usage["today"] == stored
        assert usage["quota"] == {"daily_tokens": 1000, "used_tokens": 135, "remaining_tokens": 1000 - 135}
        assert usage["rate"] == {"messages_per_minute": 7, "messages_last_minute": 3}
        assert 0 < usage["resets_in"] <= 86400 and len(usage["day"]) == 10
        assert usage["conversations"] == [
            {"conversation_id": first, "title": "First", "prompt_tokens": 84, "completion_tokens": 6,
             "total_tokens": 90, "answers": 2},
            {"conversation_id": second, "title": "Second", "prompt_tokens": 42, "completion_tokens": 3,
             "total_tokens": 45, "answers": 1}]
        over_rest = await client.get("/api/v1/me/usage", headers=auth(alice))
        assert over_rest.status == 200
        assert {**(await over_rest.json())["data"], "resets_in": None} == {**usage, "resets_in": None}
        assert (await client.get("/api/v1/me/usage")).status == 401
        # Each user sees only their own.
        assert (await bob.ok("get_usage"))["today"]["total_tokens"] == 0
        assert not events(bob.sock, "usage_changed")
        # A deleted conversation leaves the list, not the day's total (the quota does not give back).
        await alice.ok("delete_conversation", {"conversation_id": first})
        after = await alice.ok("get_usage")
        assert after["today"]["total_tokens"] == 135
        assert [c["conversation_id"] for c in after["conversations"]] == [second]
        assert model.title_requests == []
    finally:
        await server.close()


# --- models ---------------------------------------------------------------------------------------

def served_models(base: str) -> list[str]:
    with urllib.request.urlopen(base + "/models", timeout=5) as response:
        return [m["id"] for m in json.load(response)["data"]]


async def test_models_are_listed_from_the_endpoint_and_filtered_by_the_allow_list(aiohttp_client, settings, sockets,
                                                                                  llm_server):  # noqa: F811
    served = served_models(llm_server)
    assert served, "llama-cpp-python lists the model it serves"
    client = await start_app(aiohttp_client, settings, openai_base_url=llm_server, ai_model="stories260K",
                             ai_model_allowlist=(served[0], "not-served"), ai_max_output_tokens=30,
                             ai_context_tokens=1500, ai_max_tool_rounds=0)
    alice = await sign_in(client, sockets)
    listed = await alice.ok("list_models")
    assert listed == {"mode": "model", "default": "stories260K", "models": [{"id": served[0], "default": False}]}
    over_rest = await client.get("/api/v1/assistant/models", headers=auth(alice))
    assert over_rest.status == 200 and (await over_rest.json())["data"] == listed
    # A model outside the allow-list is refused, at creation and on update, and nothing is written.
    refused = await alice.call("create_conversation", {"title": "x", "model": "gpt-4o"})
    assert refused["error"]["code"] == "invalid_payload" and refused["error"]["field"] == "model"
    assert (await alice.ok("list_conversations"))["conversations"] == []
    conversation_id = await alice.conversation(model=served[0])
    bad = await client.patch(f"/api/v1/conversations/{conversation_id}", json={"model": "gpt-4o", "title": "New"},
                             headers=auth(alice))
    assert bad.status == 400 and (await bad.json())["error"]["field"] == "model"
    row = await conversation_row(client.app, conversation_id)
    assert row["model"] == served[0] and row["title"] is None
    # The chosen model answers: the real server is asked for it by name.
    sent = await alice.send(conversation_id, "Once upon a time there was a cat.")
    message_id = sent["assistant_message"]["id"]
    assert sent["assistant_message"]["model"] == served[0]
    done = await wait_finished(alice.sock, message_id, timeout=60)
    assert done["type"] == "message_completed", done
    assert events(alice.sock, "message_started", message_id)[0]["model"] == served[0]
    # Back to the default (null).
    reset = await alice.ok("update_conversation", {"conversation_id": conversation_id, "model": None})
    assert reset["conversation"]["model"] is None
    # Without an allow-list only AI_MODEL is offered: here the endpoint does not list it by that name.
    plain = await start_app(aiohttp_client, settings, openai_base_url=llm_server, ai_model="stories260K")
    carol = await sign_in(plain, sockets)
    assert (await carol.ok("list_models"))["models"] == []
    refused = await carol.call("create_conversation", {"model": served[0]})
    assert refused["error"]["code"] == "invalid_payload"


async def test_retrieval_only_offers_only_its_pseudo_model(client, sockets):
    alice = await sign_in(client, sockets)
    listed = await alice.ok("list_models")
    assert listed == {"mode": "retrieval_only", "default": "retrieval-only",
                      "models": [{"id": "retrieval-only", "default": True}]}
    refused = await alice.call("create_conversation", {"model": "gpt-4o-mini"})
    assert refused["error"]["code"] == "invalid_payload" and refused["error"]["field"] == "model"


async def test_the_conversation_model_and_system_prompt_are_sent_upstream(aiohttp_client, settings, sockets):
    model, server = await titled_model([{"text": ["Arr."], "usage": USAGE}])
    try:
        client = await start_app(aiohttp_client, settings, openai_base_url=str(server.make_url("/v1")),
                                 ai_model="scripted", ai_model_allowlist=("scripted", "scripted-large"),
                                 ai_system_prompt_max_chars=60)
        alice = await sign_in(client, sockets)
        created = await alice.ok("create_conversation", {"title": "Pirate", "model": "scripted-large",
                                                         "system_prompt": "  Answer like a pirate.  "})
        conversation_id = created["conversation"]["id"]
        assert created["conversation"]["model"] == "scripted-large"
        assert created["conversation"]["system_prompt"] == "Answer like a pirate."
        message_id = (await alice.send(conversation_id, "hi"))["assistant_message"]["id"]
        await wait_finished(alice.sock, message_id)
        assert events(alice.sock, "message_started", message_id)[0]["model"] == "scripted-large"
        request = model.requests[0]
        assert request["model"] == "scripted-large"
        assert [m["role"] for m in request["messages"]] == ["system", "system", "user"]
        assert request["messages"][0]["content"] == SYSTEM_PROMPT  # the platform's rules come first, unchanged
        assert request["messages"][1]["content"].endswith("Answer like a pirate.")
        shown = await alice.ok("get_conversation", {"conversation_id": conversation_id})
        assert shown["conversation"]["system_prompt"] == "Answer like a pirate."
        assert shown["messages"][1]["model"] == "scripted-large"
        # Over the limit: refused, and nothing of the update is written (not even its title).
        too_long = await client.patch(f"/api/v1/conversations/{conversation_id}", headers=auth(alice),
                                      json={"title": "Renamed", "system_prompt": "x" * 61})
        assert too_long.status == 413 and (await too_long.json())["error"]["field"] == "system_prompt"
        row = await conversation_row(client.app, conversation_id)
        assert row["title"] == "Pirate" and row["system_prompt"] == "Answer like a pirate."
        refused = await alice.call("create_conversation", {"system_prompt": "y" * 61})
        assert refused["error"]["code"] == "payload_too_large"
        assert len((await alice.ok("list_conversations"))["conversations"]) == 1
        empty = await client.patch(f"/api/v1/conversations/{conversation_id}", json={}, headers=auth(alice))
        assert empty.status == 400
        # Cleared prompt and default model: the next request has one system message and AI_MODEL.
        updated = await client.patch(f"/api/v1/conversations/{conversation_id}", headers=auth(alice),
                                     json={"model": None, "system_prompt": ""})
        assert updated.status == 200
        body = (await updated.json())["data"]["conversation"]
        assert body["model"] is None and body["system_prompt"] is None and body["title"] == "Pirate"
        again = (await alice.send(conversation_id, "again"))["assistant_message"]["id"]
        await wait_finished(alice.sock, again)
        request = model.requests[-1]
        assert request["model"] == "scripted" and [m["role"] for m in request["messages"]].count("system") == 1
        # Someone else cannot change it.
        mallory = await sign_in(client, sockets)
        forbidden = await mallory.call("update_conversation", {"conversation_id": conversation_id, "model": None})
        assert forbidden["error"]["code"] == "forbidden"
    finally:
        await server.close()


async def test_the_system_prompt_counts_in_the_context_budget(aiohttp_client, settings, sockets):
    model, server = await titled_model([{"text": ["ok"], "usage": USAGE}])
    try:
        client = await start_app(aiohttp_client, settings, openai_base_url=str(server.make_url("/v1")),
                                 ai_model="scripted", ai_context_tokens=400, ai_max_output_tokens=100)
        alice = await sign_in(client, sockets)
        fits = await alice.conversation(title="Short prompt", system_prompt="Be brief.")
        message_id = (await alice.send(fits, "hi"))["assistant_message"]["id"]
        assert (await wait_finished(alice.sock, message_id))["type"] == "message_completed"
        # ~450 tokens of system prompt leave no room for the question within 400 - 100.
        crowded = await alice.conversation(title="Long prompt", system_prompt="Be precise. " * 150)
        message_id = (await alice.send(crowded, "hi"))["assistant_message"]["id"]
        failed = await wait_finished(alice.sock, message_id)
        assert failed["type"] == "message_failed" and failed["code"] == "context_too_long"
        assert len(model.requests) == 1
    finally:
        await server.close()


# --- titles ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, title", [
    ("Is there weather data for cities?", "Weather data for cities"),
    ("Hi! Can you show me datasets about crypto prices please?", "Datasets about crypto prices"),
    ("Hello there, what is the cheapest weather dataset?", "Cheapest weather dataset"),
    ("What weather data do you have?", "Weather data"),
    ("How many DataPods cost under 5 SUI?", "DataPods cost under 5 SUI"),
    ("Could you please compare the **token prices** and the rain datasets?",
     "Compare the token prices and the rain datasets"),
    ("Good morning! I am looking for a dataset of historical Bitcoin prices with hourly candles and volumes",
     "Dataset of historical Bitcoin prices with hourly"),
    ("Once upon a time there was a dog.", "Once upon a time there was a dog"),
    ("hello?", "Hello"),
    ("   ", "New conversation"),
])
def test_heuristic_titles(text, title):
    assert heuristic_title(text) == title
    assert len(title) <= 50


@pytest.mark.parametrize("text, title", [
    ('"Weather Data Overview."', "Weather Data Overview"),
    ("# Title: **Crypto prices**\nA second line", "Crypto prices"),
    ("'Rain data'", "Rain data"),
    ("Once upon a time, there was a little girl named Lily. She loved to play outside.",
     "Once upon a time, there was a little girl named Lily. She"),
    ("  \n ** ", None),
])
def test_model_titles_are_sanitised(text, title):
    assert sanitise_title(text) == title


async def test_without_a_model_the_title_is_the_heuristic_one(client, sockets):
    alice = await sign_in(client, sockets)
    conversation_id = await alice.conversation()
    sent = await alice.send(conversation_id, "Hi! Is there any weather data for Paris?")
    message_id = sent["assistant_message"]["id"]
    await wait_finished(alice.sock, message_id)
    await wait_until(lambda: events(alice.sock, "conversation_titled"))
    assert events(alice.sock, "conversation_titled") == [
        {"conversation_id": conversation_id, "title": "Weather data for Paris", "auto": True}]
    shown = await alice.ok("get_conversation", {"conversation_id": conversation_id})
    assert shown["conversation"]["title"] == "Weather data for Paris"


async def test_with_a_model_the_model_writes_the_title_once(aiohttp_client, settings, sockets):
    model, server = await titled_model([{"text": ["Sunny ", "data."], "usage": USAGE}],
                                       title='**"Paris Weather Data."**\nThis conversation is about...',
                                       title_delay=0.5)
    try:
        client = await start_app(aiohttp_client, settings, openai_base_url=str(server.make_url("/v1")),
                                 ai_model="scripted", ai_model_allowlist=("scripted-small",))
        alice = await sign_in(client, sockets)
        await alice.ok("subscribe", {"channel": f"user:{alice.id}"})
        conversation_id = await alice.conversation(model="scripted-small")
        sent = await alice.send(conversation_id, "Hello! Any weather data for Paris?")
        message_id = sent["assistant_message"]["id"]
        await wait_finished(alice.sock, message_id)
        # The answer completed without waiting for the title.
        assert client.app[ASSISTANT].title_jobs
        await wait_until(lambda: not client.app[ASSISTANT].title_jobs)
        titled = [e for e in events(alice.sock, "conversation_titled")]
        # Each on the conversation's channel and on the user channel: the heuristic title, then the model's.
        assert [e["title"] for e in titled] == ["Weather data for Paris"] * 2 + ["Paris Weather Data"] * 2
        assert all(e["auto"] is True for e in titled)
        assert (await conversation_row(client.app, conversation_id))["title"] == "Paris Weather Data"
        [request] = model.title_requests
        assert request["model"] == "scripted-small" and request["max_tokens"] <= 32
        assert "Any weather data for Paris?" in request["messages"][-1]["content"]
        assert "Sunny data." in request["messages"][-1]["content"]
        # The title call's tokens count to the quota and to the conversation.
        await wait_until(lambda: len(events(alice.sock, "usage_changed")) == 2)
        usage = await alice.ok("get_usage")
        assert usage["today"]["total_tokens"] == 45 + 37
        assert events(alice.sock, "usage_changed")[-1]["today"]["total_tokens"] == 82
        assert usage["conversations"][0]["total_tokens"] == 82 and usage["conversations"][0]["answers"] == 1
        # Not twice: the next exchange asks for no title.
        again = (await alice.send(conversation_id, "And for Lyon?"))["assistant_message"]["id"]
        await wait_finished(alice.sock, again)
        await asyncio.sleep(0.2)
        assert len(model.title_requests) == 1 and not client.app[ASSISTANT].title_jobs
    finally:
        await server.close()


async def test_a_failed_title_call_keeps_the_heuristic_title(aiohttp_client, settings, sockets):
    model, server = await titled_model([{"text": ["ok"], "usage": USAGE}], title_status=500)
    try:
        client = await start_app(aiohttp_client, settings, openai_base_url=str(server.make_url("/v1")),
                                 ai_model="scripted")
        alice = await sign_in(client, sockets)
        conversation_id = await alice.conversation()
        message_id = (await alice.send(conversation_id, "Please show me rain datasets"))["assistant_message"]["id"]
        await wait_finished(alice.sock, message_id)
        await wait_until(lambda: model.title_requests and not client.app[ASSISTANT].title_jobs)
        assert [e["title"] for e in events(alice.sock, "conversation_titled")] == ["Rain datasets"]
        assert (await conversation_row(client.app, conversation_id))["title"] == "Rain datasets"
        assert len(model.title_requests) == 1  # not retried
        assert (await alice.ok("get_usage"))["today"]["total_tokens"] == 45  # a failed call counts nothing
    finally:
        await server.close()


async def test_the_users_title_is_never_overwritten(aiohttp_client, settings, sockets):
    model, server = await titled_model([{"text": ["ok"], "usage": USAGE}], title="Model Title", title_delay=1.0)
    try:
        client = await start_app(aiohttp_client, settings, openai_base_url=str(server.make_url("/v1")),
                                 ai_model="scripted")
        alice = await sign_in(client, sockets)
        conversation_id = await alice.conversation()
        message_id = (await alice.send(conversation_id, "What about soil data?"))["assistant_message"]["id"]
        await wait_finished(alice.sock, message_id)
        await wait_until(lambda: model.title_requests)  # the model is writing its title...
        renamed = await client.patch(f"/api/v1/conversations/{conversation_id}", json={"title": "My soil notes"},
                                     headers=auth(alice))
        assert renamed.status == 200
        await wait_until(lambda: not client.app[ASSISTANT].title_jobs)
        assert (await conversation_row(client.app, conversation_id))["title"] == "My soil notes"
        assert "Model Title" not in [e["title"] for e in events(alice.sock, "conversation_titled")]
        # A title given at creation is not replaced either, and no title call is made.
        given = await alice.conversation(title="Given")
        message_id = (await alice.send(given, "What about soil data?"))["assistant_message"]["id"]
        await wait_finished(alice.sock, message_id)
        await asyncio.sleep(0.2)
        assert len(model.title_requests) == 1
        assert (await conversation_row(client.app, given))["title"] == "Given"
    finally:
        await server.close()
