"""The assistant's REST routes against the real server: each answers what its /assistant command does.

Retrieval-only mode (no model) for speed; a scripted OpenAI-compatible upstream that streams
slowly covers following a live answer over Server-Sent Events.
"""

from __future__ import annotations

import asyncio
import uuid

import handlers.assistant
from tests.helpers import wait_until
from tests.test_assistant import (
    User,
    delta_text,
    events,
    read_sse_until,
    scripted,
    sign_in,
    start_app,
    wait_finished,
)


def bearer(user: User) -> dict:
    return {"Authorization": f"Bearer {user.account['token']}"}


async def rest(client, method: str, url: str, user: User | None, **kwargs) -> tuple[int, dict]:
    response = await client.request(method, url, headers=bearer(user) if user else {}, **kwargs)
    return response.status, await response.json()


async def stream(client, message_id: str, user: User, query: str = "?from=0", headers=None) -> list[tuple[str, dict]]:
    async with client.get(f"/api/v1/messages/{message_id}/stream{query}",
                          headers={**bearer(user), **(headers or {})}) as response:
        assert response.status == 200 and response.headers["Content-Type"] == "text/event-stream"
        return await read_sse_until(response, ("message_completed", "message_failed", "error"))


def strip_times(data: dict) -> dict:
    """A conversation answer without `updated_at`, which each write moves."""
    return {**data, "conversation": {k: v for k, v in data["conversation"].items() if k != "updated_at"}}


async def test_every_new_route_answers_as_its_socket_command(client, sockets):
    alice = await sign_in(client, sockets)
    conversation_id = await alice.conversation()
    sent = await alice.send(conversation_id, "Any weather data?")
    user_message, first_answer = sent["user_message"], sent["assistant_message"]
    await wait_finished(alice.sock, first_answer["id"])

    status, got = await rest(client, "GET", f"/api/v1/conversations/{conversation_id}", alice)
    assert status == 200 and got["data"] == await alice.ok("get_conversation", {"conversation_id": conversation_id})

    status, renamed = await rest(client, "PATCH", f"/api/v1/conversations/{conversation_id}", alice,
                                 json={"title": "  Rain   data "})
    assert status == 200 and renamed["data"]["conversation"]["title"] == "Rain data"
    # Announced as the socket command announces it.
    await wait_until(lambda: events(alice.sock, "conversation_titled")[-1]["title"] == "Rain data")
    socket_rename = await alice.ok("rename_conversation", {"conversation_id": conversation_id, "title": "Rain data"})
    assert strip_times(socket_rename) == strip_times(renamed["data"])

    # Edit: a sibling of the user's message and a new answer, made current; followed over SSE.
    status, edited = await rest(client, "PATCH", f"/api/v1/messages/{user_message['id']}", alice,
                                json={"content": "Any rain data?", "client_msg_id": "e1"})
    assert status == 200 and edited["data"]["duplicate"] is False
    assert edited["data"]["user_message"]["parent_id"] == user_message["parent_id"]
    edit_answer = edited["data"]["assistant_message"]["id"]
    replay = await stream(client, edit_answer, alice)
    assert replay[0][0] == "message_resumed" and replay[-1][0] == "message_completed"
    current = await alice.ok("get_conversation", {"conversation_id": conversation_id})
    assert current["conversation"]["current_leaf_id"] == edit_answer

    # Switch back to the first branch: as switch_branch answers it.
    status, switched = await rest(client, "POST", f"/api/v1/messages/{user_message['id']}/switch", alice)
    assert status == 200 and switched["data"]["conversation"]["current_leaf_id"] == first_answer["id"]
    assert strip_times(switched["data"]) == strip_times(
        await alice.ok("switch_branch", {"message_id": user_message["id"]}))

    # Regenerate: a sibling answer to the same user message.
    status, regenerated = await rest(client, "POST", f"/api/v1/messages/{first_answer['id']}/regenerate", alice)
    assert status == 200 and regenerated["data"]["assistant_message"]["parent_id"] == user_message["id"]
    final = (await stream(client, regenerated["data"]["assistant_message"]["id"], alice))[-1]
    assert final[0] == "message_completed" and final[1]["status"] == "complete"

    status, deleted = await rest(client, "DELETE", f"/api/v1/conversations/{conversation_id}", alice)
    assert status == 200 and deleted["data"] == {"conversation_id": conversation_id}
    gone = await alice.call("get_conversation", {"conversation_id": conversation_id})
    assert gone["error"]["code"] == "not_found"
    assert (await rest(client, "GET", f"/api/v1/conversations/{conversation_id}", alice))[0] == 404


async def test_stream_of_a_finished_answer_replays_from_a_position(aiohttp_client, settings, sockets):
    # The retrieval-only answer is emitted word by word at once: with no delta interval it is
    # published in several deltas, a position to replay from.
    client = await start_app(aiohttp_client, settings, ai_delta_interval=0)
    alice = await sign_in(client, sockets)
    answer = (await alice.send(await alice.conversation(), "weather"))["assistant_message"]["id"]
    done = await wait_finished(alice.sock, answer)
    assert done["seq"] > 2
    replay = await stream(client, answer, alice, "?from=2")
    resumed = await alice.ok("resume_stream", {"message_id": answer, "after_seq": 2})
    assert replay[0] == ("message_resumed", resumed)
    assert [type_ for type_, _ in replay] == ["message_resumed", "message_completed"]
    assert replay[-1][1] == {k: v for k, v in done.items() if k != "type"}  # as the job published it
    caught_up = await stream(client, answer, alice, "", headers={"Last-Event-ID": str(done["seq"])})
    assert caught_up[0][1]["reset"] is False and caught_up[0][1]["deltas"] == []


async def test_stream_follows_a_live_answer_after_the_position(aiohttp_client, settings, sockets):
    pieces = [f"w{n} " for n in range(12)]
    model, server = await scripted([{"text": pieces, "delay": 0.05}])
    try:
        client = await start_app(aiohttp_client, settings, openai_base_url=str(server.make_url("/v1")))
        alice = await sign_in(client, sockets)
        answer = (await alice.send(await alice.conversation()))["assistant_message"]["id"]
        await wait_until(lambda: len(delta_text(alice.sock, answer)[0]) >= 3)
        replay = await stream(client, answer, alice, "?from=2")
        assert replay[0][0] == "message_resumed" and replay[0][1]["status"] == "streaming"
        assert replay[0][1]["reset"] is False and replay[0][1]["deltas"][0]["seq"] == 3
        live = [data for type_, data in replay[1:] if type_ == "message_delta"]
        assert live, "the stream ended before following the answer live"
        seqs = [d["seq"] for d in replay[0][1]["deltas"]] + [d["seq"] for d in live]
        assert seqs == list(range(3, seqs[-1] + 1))
        # Pieces that arrive while a delta is out go together in the next: compare text, not counts.
        first_two = "".join(d["text"] for d in events(alice.sock, "message_delta", answer) if d["seq"] <= 2)
        text = "".join(d["text"] for d in replay[0][1]["deltas"] + live)
        assert first_two + text == "".join(pieces)
        assert replay[-1][0] == "message_completed" and replay[-1][1]["seq"] == seqs[-1]
    finally:
        await server.close()


async def test_stream_ends_with_an_error_when_the_conversation_is_deleted(aiohttp_client, settings, sockets,
                                                                          monkeypatch):
    monkeypatch.setattr(handlers.assistant, "SSE_KEEPALIVE_SECONDS", 0.2)  # the deletion is noticed when quiet
    model, server = await scripted([{"text": [f"w{n} " for n in range(40)], "delay": 0.1}])
    try:
        client = await start_app(aiohttp_client, settings, openai_base_url=str(server.make_url("/v1")))
        alice = await sign_in(client, sockets)
        conversation_id = await alice.conversation()
        answer = (await alice.send(conversation_id))["assistant_message"]["id"]
        reading = asyncio.create_task(stream(client, answer, alice))
        await wait_until(lambda: len(delta_text(alice.sock, answer)[0]) >= 2)
        assert (await rest(client, "DELETE", f"/api/v1/conversations/{conversation_id}", alice))[0] == 200
        replay = await asyncio.wait_for(reading, 10)
        assert replay[0][0] == "message_resumed"
        assert replay[-1][0] == "error" and replay[-1][1]["code"] == "not_found"
    finally:
        await server.close()


async def test_stream_ends_when_its_session_signs_out(aiohttp_client, settings, sockets):
    model, server = await scripted([{"text": [f"w{n} " for n in range(40)], "delay": 0.1}])
    try:
        client = await start_app(aiohttp_client, settings, openai_base_url=str(server.make_url("/v1")))
        alice = await sign_in(client, sockets)
        answer = (await alice.send(await alice.conversation()))["assistant_message"]["id"]
        async with client.get(f"/api/v1/messages/{answer}/stream?from=0", headers=bearer(alice)) as response:
            assert response.status == 200
            await wait_until(lambda: len(delta_text(alice.sock, answer)[0]) >= 2)
            assert (await rest(client, "POST", "/api/v1/auth/logout", alice))[0] == 200
            replay = await asyncio.wait_for(
                read_sse_until(response, ("signed_out", "message_completed", "message_failed")), 10)
        # The answer goes on for its other readers, but nothing more reaches the signed-out one.
        assert replay[-1][0] == "signed_out" and replay[-1][1] == {"message_id": answer}
    finally:
        await server.close()


async def test_another_users_conversation_is_refused_like_the_socket_does(client, sockets):
    alice, bob = await sign_in(client, sockets), await sign_in(client, sockets)
    conversation_id = await alice.conversation()
    sent = await alice.send(conversation_id, "weather")
    user_message, answer = sent["user_message"]["id"], sent["assistant_message"]["id"]
    await wait_finished(alice.sock, answer)
    cases = [
        ("GET", f"/api/v1/conversations/{conversation_id}", None, "get_conversation",
         {"conversation_id": conversation_id}),
        ("PATCH", f"/api/v1/conversations/{conversation_id}", {"title": "mine"}, "rename_conversation",
         {"conversation_id": conversation_id, "title": "mine"}),
        ("DELETE", f"/api/v1/conversations/{conversation_id}", None, "delete_conversation",
         {"conversation_id": conversation_id}),
        ("PATCH", f"/api/v1/messages/{user_message}", {"content": "x"}, "edit_message",
         {"message_id": user_message, "content": "x"}),
        ("POST", f"/api/v1/messages/{answer}/regenerate", None, "regenerate", {"message_id": answer}),
        ("POST", f"/api/v1/messages/{user_message}/switch", None, "switch_branch", {"message_id": user_message}),
        ("GET", f"/api/v1/messages/{answer}/stream?from=0", None, "resume_stream",
         {"message_id": answer, "after_seq": 0}),
    ]
    for method, url, body, command, payload in cases:
        socket_error = (await bob.call(command, payload))["error"]
        status, reply = await rest(client, method, url, bob, json=body)
        assert (status, reply["error"]["code"]) == (403, socket_error["code"]) == (403, "forbidden"), url
        assert (await rest(client, method, url, None, json=body))[0] == 401
    missing = str(uuid.uuid4())
    assert (await rest(client, "GET", f"/api/v1/messages/{missing}/stream", alice))[0] == 404
    assert (await rest(client, "DELETE", f"/api/v1/conversations/{missing}", alice))[0] == 404
    # Nothing of alice's changed.
    still = await alice.ok("get_conversation", {"conversation_id": conversation_id})
    assert still["conversation"]["title"] != "mine" and len(still["messages"]) == 2


async def test_bad_payloads_answer_400(client, sockets):
    alice = await sign_in(client, sockets)
    conversation_id = await alice.conversation()
    sent = await alice.send(conversation_id, "weather")
    user_message, answer = sent["user_message"]["id"], sent["assistant_message"]["id"]
    await wait_finished(alice.sock, answer)
    conversation = f"/api/v1/conversations/{conversation_id}"
    for method, url, body in [
        ("PATCH", conversation, {}),
        ("PATCH", conversation, {"title": ""}),
        ("PATCH", conversation, {"title": "ok", "conversation_id": conversation_id}),
        ("PATCH", conversation, {"title": 5}),
        ("PATCH", f"/api/v1/messages/{user_message}", {"content": 5}),
        ("PATCH", f"/api/v1/messages/{user_message}", {"client_msg_id": "x"}),
        ("PATCH", f"/api/v1/messages/{answer}", {"content": "an answer cannot be edited"}),
        ("GET", "/api/v1/conversations/nope", None),
        ("POST", "/api/v1/messages/nope/regenerate", None),
        ("POST", f"/api/v1/messages/{user_message}/regenerate", None),  # not an answer
        ("GET", f"/api/v1/messages/{answer}/stream?from=-1", None),
        ("GET", f"/api/v1/messages/{answer}/stream?from=abc", None),
        ("GET", f"/api/v1/messages/{user_message}/stream", None),  # a user message has no stream
    ]:
        status, reply = await rest(client, method, url, alice, json=body)
        assert (status, reply["error"]["code"]) == (400, "invalid_payload"), (method, url, body, reply)
    bad_header = await client.get(f"/api/v1/messages/{answer}/stream",
                                  headers={**bearer(alice), "Last-Event-ID": "x"})
    assert bad_header.status == 400
