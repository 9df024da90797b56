"""The assistant's history over the real app: search, export, share links and feedback (issue 20).

Answers come from retrieval-only mode (no model): fast, and their text repeats the question.
"""

from __future__ import annotations

import hashlib
import json
import uuid

from db import users as user_queries
from db.assistant_history import HEADLINE_OPTIONS, SEARCH_SQL
from server.services import assistant_history
from tests.helpers import register
from tests.test_assistant import User, sign_in, start_app, wait_finished
from tests.test_assistant_rest import bearer, rest


async def answered(user: User, conversation_id: str, content: str) -> dict:
    """Send a message and wait for its (retrieval-only) answer; the send's ack."""
    sent = await user.send(conversation_id, content)
    await wait_finished(user.sock, sent["assistant_message"]["id"])
    return sent


async def make_admin(db, account: dict) -> None:
    user = account["user"]
    await user_queries.upsert_admin(db, uuid.UUID(user["id"]), username=user["username"], email=user["email"],
                                    password_hash="x")


# --- search -----------------------------------------------------------------------------------------

async def test_search_finds_titles_and_messages_of_the_callers_conversations_only(client, sockets):
    alice, bob = await sign_in(client, sockets), await sign_in(client, sockets)
    titled = await alice.conversation(title="Rainfall archive")
    talked = await alice.conversation()
    await answered(alice, talked, "Any glacier measurements where 5 < 7 & <b>so</b> on?")
    sent = await answered(alice, talked, "More about the glacier, please")
    other = await bob.conversation(title="glacier too")
    await answered(bob, other, "glacier glacier")

    found = await alice.ok("search_conversations", {"q": "GLACIER"})
    assert [r["conversation"]["id"] for r in found["results"]] == [talked]
    hit = found["results"][0]
    assert hit["matched"] == "message" and "<mark>glacier</mark>" in hit["snippet"].lower()
    messages = (await alice.ok("get_conversation", {"conversation_id": talked}))["messages"]
    newest = [m["id"] for m in messages if "glacier" in m["content"].lower()][-1]
    assert hit["message_id"] == newest and newest in {sent["user_message"]["id"], sent["assistant_message"]["id"]}
    assert "<b>" not in hit["snippet"] and found["next_cursor"] is None

    by_title = await alice.ok("search_conversations", {"q": "rainfall"})
    assert by_title["results"] == [{"conversation": by_title["results"][0]["conversation"], "message_id": None,
                                    "matched": "title", "snippet": "<mark>Rainfall</mark> archive"}]
    assert by_title["results"][0]["conversation"]["id"] == titled
    # The markup of a message is escaped in the excerpt, never passed through.
    escaped = await alice.ok("search_conversations", {"q": "measurements"})
    snippet = escaped["results"][0]["snippet"]
    assert "<mark>measurements</mark> where 5 &lt; 7 &amp;" in snippet and "<b>" not in snippet
    # Web search syntax: a phrase, and a word excluded.
    assert (await alice.ok("search_conversations", {"q": '"rainfall archive" -glacier'}))["results"][0][
        "conversation"]["id"] == titled
    assert (await alice.ok("search_conversations", {"q": "rainfall -archive"}))["results"] == []

    status, over_rest = await rest(client, "GET", "/api/v1/conversations/search?q=glacier", alice)
    assert status == 200 and over_rest["data"] == found
    assert (await bob.ok("search_conversations", {"q": "rainfall"}))["results"] == []

    for bad in ({"q": ""}, {"q": "x" * 201}, {"q": "   "}, {"q": "glacier", "cursor": "nonsense"}):
        refused = await alice.call("search_conversations", bad)
        assert refused["error"]["code"] == "invalid_payload", bad
    assert (await rest(client, "GET", "/api/v1/conversations/search?q=" + "y" * 201, alice))[0] == 400
    assert (await rest(client, "GET", "/api/v1/conversations/search?q=glacier", None))[0] == 401

    await alice.ok("delete_conversation", {"conversation_id": talked})
    assert (await alice.ok("search_conversations", {"q": "glacier"}))["results"] == []


async def test_search_pages_with_the_cursor_newest_first(client, sockets):
    alice = await sign_in(client, sockets)
    ids = [await alice.conversation(title=f"Harvest notes {n}") for n in range(5)]
    await alice.conversation(title="Unrelated")
    first = await alice.ok("search_conversations", {"q": "harvest", "limit": 2})
    assert [r["conversation"]["id"] for r in first["results"]] == ids[::-1][:2] and first["next_cursor"]
    second = await alice.ok("search_conversations", {"q": "harvest", "limit": 2, "cursor": first["next_cursor"]})
    assert [r["conversation"]["id"] for r in second["results"]] == ids[::-1][2:4]
    status, third = await rest(client, "GET", "/api/v1/conversations/search", alice,
                               params={"q": "harvest", "limit": "2", "cursor": second["next_cursor"]})
    assert status == 200 and [r["conversation"]["id"] for r in third["data"]["results"]] == ids[:1]
    assert third["data"]["next_cursor"] is None
    # Activity moves a conversation to the front.
    await alice.ok("rename_conversation", {"conversation_id": ids[0], "title": "Harvest notes, revised"})
    again = await alice.ok("search_conversations", {"q": "harvest", "limit": 1})
    assert again["results"][0]["conversation"]["id"] == ids[0]


async def test_search_uses_the_full_text_indexes(client, db):
    alice, bob = await register(client), await register(client)
    indexes = {row["indexname"]: row["indexdef"] for row in await db.fetch(
        "SELECT indexname, indexdef FROM pg_indexes WHERE indexname LIKE 'idx_ai_%_fts'")}
    assert "gin" in indexes["idx_ai_conversations_title_fts"].lower()
    assert "to_tsvector('simple'::regconfig" in indexes["idx_ai_messages_content_fts"]
    # Enough rows that reading them all would cost more than the index: 4,000 conversations of two
    # users, 20,000 messages, one rare word in one title and one message.
    for owner in (alice, bob):
        await db.execute(
            """INSERT INTO ai_conversations (user_id, title)
               SELECT $1, 'Conversation about weather number ' || g FROM generate_series(1, 2000) g""",
            uuid.UUID(owner["user"]["id"]))
    await db.execute(
        """INSERT INTO ai_messages (conversation_id, role, content)
           SELECT c.id, 'user', 'ordinary question about rain and sun, variant ' || g
             FROM ai_conversations c CROSS JOIN generate_series(1, 5) g""")
    alice_id = uuid.UUID(alice["user"]["id"])
    in_message = await db.fetchval(
        """UPDATE ai_messages SET content = content || ' zyzzyva'
            WHERE id = (SELECT m.id FROM ai_messages m JOIN ai_conversations c ON c.id = m.conversation_id
                         WHERE c.user_id = $1 ORDER BY m.id LIMIT 1)
        RETURNING conversation_id""", alice_id)
    in_title = await db.fetchval(
        """UPDATE ai_conversations SET title = 'zyzzyva facts'
            WHERE id = (SELECT id FROM ai_conversations WHERE user_id = $1 AND id <> $2 ORDER BY id LIMIT 1)
        RETURNING id""", alice_id, in_message)
    await db.execute("ANALYZE ai_conversations")
    await db.execute("ANALYZE ai_messages")
    args = (alice_id, "zyzzyva", None, None, 20, HEADLINE_OPTIONS)
    plan = "\n".join(row[0] for row in await db.fetch("EXPLAIN " + SEARCH_SQL, *args))
    assert "idx_ai_conversations_title_fts" in plan and "idx_ai_messages_content_fts" in plan, plan
    assert "Seq Scan on ai_messages" not in plan, plan
    # And the query the service runs finds exactly those two.
    assert {row["id"] for row in await db.fetch(SEARCH_SQL, *args)} == {in_message, in_title}


# --- export -----------------------------------------------------------------------------------------

async def test_export_the_current_branch_as_markdown_and_json(client, sockets):
    alice, bob = await sign_in(client, sockets), await sign_in(client, sockets)
    conversation_id = await alice.conversation(title="Crop yields / 2026")
    sent = await answered(alice, conversation_id, "Any data on wheat?")
    edited = await alice.ok("edit_message", {"message_id": sent["user_message"]["id"],
                                             "content": "Any data on barley?"})
    await wait_finished(alice.sock, edited["assistant_message"]["id"])

    response = await client.get(f"/api/v1/conversations/{conversation_id}/export?format=md", headers=bearer(alice))
    assert response.status == 200 and response.content_type == "text/markdown" and response.charset == "utf-8"
    filename = f"crop-yields-2026-{uuid.UUID(conversation_id).hex[:8]}.md"
    assert response.headers["Content-Disposition"] == f'attachment; filename="{filename}"'
    markdown = await response.text()
    assert markdown.startswith("# Crop yields / 2026\n")
    assert markdown.count("## You") == 1 and markdown.count("## Assistant") == 1
    assert "Any data on barley?" in markdown and "wheat" not in markdown  # only the current branch
    answer_text = (await alice.ok("get_conversation", {"conversation_id": conversation_id}))["messages"][1]["content"]
    assert answer_text.strip() and answer_text.rstrip() in markdown

    response = await client.get(f"/api/v1/conversations/{conversation_id}/export?format=json",
                                headers=bearer(alice))
    assert response.status == 200 and response.content_type == "application/json"
    assert response.headers["Content-Disposition"].endswith('.json"')
    document = json.loads(await response.text())
    current = await alice.ok("get_conversation", {"conversation_id": conversation_id})
    assert document["conversation"] == current["conversation"]
    assert [m["id"] for m in document["messages"]] == [m["id"] for m in current["messages"]]
    assert [m["content"] for m in document["messages"]] == [m["content"] for m in current["messages"]]

    over_socket = await alice.ok("export_conversation", {"conversation_id": conversation_id, "format": "json"})
    assert over_socket["filename"].endswith(".json") and over_socket["content_type"] == "application/json"
    assert json.loads(over_socket["content"])["messages"] == document["messages"]

    refused = await bob.call("export_conversation", {"conversation_id": conversation_id, "format": "md"})
    assert refused["error"]["code"] == "forbidden"
    status, body = await rest(client, "GET", f"/api/v1/conversations/{conversation_id}/export?format=md", bob)
    assert status == 403 and body["error"]["code"] == "forbidden"
    assert (await rest(client, "GET", f"/api/v1/conversations/{conversation_id}/export?format=pdf", alice))[0] == 400
    assert (await rest(client, "GET", f"/api/v1/conversations/{uuid.uuid4()}/export?format=md", alice))[0] == 404


# --- share links ------------------------------------------------------------------------------------

async def test_share_read_anonymously_then_revoke(client, sockets, db):
    alice, bob = await sign_in(client, sockets), await sign_in(client, sockets)
    conversation_id = await alice.conversation(title="Soil samples")
    sent = await answered(alice, conversation_id, "First branch about loam")
    edited = await alice.ok("edit_message", {"message_id": sent["user_message"]["id"],
                                             "content": "Second branch about clay"})
    await wait_finished(alice.sock, edited["assistant_message"]["id"])

    status, created = await rest(client, "POST", f"/api/v1/conversations/{conversation_id}/share", alice)
    assert status == 201 and created["data"]["created"] is True
    token = created["data"]["share"]["token"]
    assert len(token) >= 43 and created["data"]["share"]["path"] == f"/api/v1/shared/{token}"
    # Only the token's hash is stored.
    stored = await db.fetchrow("SELECT * FROM ai_conversation_shares WHERE conversation_id = $1",
                               uuid.UUID(conversation_id))
    assert bytes(stored["token_hash"]) == hashlib.sha256(token.encode()).digest()
    assert token not in repr(dict(stored))
    # Sharing again keeps the link, and cannot show it again.
    status, again = await rest(client, "POST", f"/api/v1/conversations/{conversation_id}/share", alice)
    assert status == 200 and again["data"]["created"] is False and again["data"]["share"]["token"] is None
    assert (await alice.ok("share_conversation", {"conversation_id": conversation_id}))["created"] is False

    response = await client.get(f"/api/v1/shared/{token}")  # no sign-in
    raw = await response.text()
    assert response.status == 200, raw
    shared = json.loads(raw)["data"]
    assert shared["conversation"]["title"] == "Soil samples"
    assert [(m["role"], m["content"]) for m in shared["messages"]][0] == ("user", "Second branch about clay")
    assert [m["role"] for m in shared["messages"]] == ["user", "assistant"]
    assert set(shared["messages"][1]) == {"role", "content", "status", "created_at"}
    for secret in ("loam", alice.id, alice.account["user"]["email"], alice.account["user"]["username"],
                   "tool_calls", "search_datapods", conversation_id):
        assert secret not in raw, secret
    # The branch shown is whichever is current now.
    await alice.ok("switch_branch", {"message_id": sent["user_message"]["id"]})
    again_raw = await (await client.get(f"/api/v1/shared/{token}")).text()
    assert "loam" in again_raw and "clay" not in again_raw

    # Someone else can neither share nor revoke it.
    status, body = await rest(client, "POST", f"/api/v1/conversations/{conversation_id}/share", bob)
    assert status == 403 and body["error"]["code"] == "forbidden"
    refused = await bob.call("unshare_conversation", {"conversation_id": conversation_id})
    assert refused["error"]["code"] == "forbidden"
    assert (await client.get(f"/api/v1/shared/{token}")).status == 200

    status, revoked = await rest(client, "DELETE", f"/api/v1/conversations/{conversation_id}/share", alice)
    assert status == 200 and revoked["data"] == {"conversation_id": conversation_id, "revoked": True}
    gone = await client.get(f"/api/v1/shared/{token}")
    assert gone.status == 404 and (await gone.json())["error"]["code"] == "not_found"
    assert (await alice.ok("unshare_conversation", {"conversation_id": conversation_id}))["revoked"] is False

    # A new share is a new link; deleting the conversation ends it.
    renewed = await alice.ok("share_conversation", {"conversation_id": conversation_id})
    assert renewed["created"] is True and renewed["share"]["token"] != token
    assert (await client.get(renewed["share"]["path"])).status == 200
    assert (await client.get(f"/api/v1/shared/{token}")).status == 404
    await alice.ok("delete_conversation", {"conversation_id": conversation_id})
    assert (await client.get(renewed["share"]["path"])).status == 404
    assert await db.fetchval("SELECT count(*) FROM ai_conversation_shares") == 0
    assert (await client.get("/api/v1/shared/not%20a%20token")).status == 404


async def test_the_shared_view_is_rate_limited_per_address(aiohttp_client, settings, sockets, monkeypatch):
    monkeypatch.setattr(assistant_history, "SHARED_VIEWS_PER_ADDRESS", 3)
    client = await start_app(aiohttp_client, settings)
    alice = await sign_in(client, sockets)
    shared = await alice.ok("share_conversation", {"conversation_id": await alice.conversation(title="Hi")})
    path = shared["share"]["path"]
    assert [(await client.get(p)).status for p in (path, path, "/api/v1/shared/" + "A" * 43)] == [200, 200, 404]
    limited = await client.get(path)
    assert limited.status == 429 and int(limited.headers["Retry-After"]) >= 1
    assert (await limited.json())["error"]["code"] == "rate_limited"


# --- feedback ---------------------------------------------------------------------------------------

async def test_feedback_upsert_withdraw_and_only_on_own_answers(client, sockets, db):
    alice, bob = await sign_in(client, sockets), await sign_in(client, sockets)
    conversation_id = await alice.conversation()
    sent = await answered(alice, conversation_id, "Any ocean temperature data?")
    answer, question = sent["assistant_message"]["id"], sent["user_message"]["id"]
    url = f"/api/v1/messages/{answer}/feedback"

    status, body = await rest(client, "PUT", url, alice, json={"rating": "up"})
    assert status == 200 and body["data"]["feedback"]["rating"] == "up" and body["data"]["feedback"]["comment"] is None
    status, body = await rest(client, "PUT", url, alice, json={"rating": "down", "comment": " Missing units. "})
    assert status == 200 and body["data"]["feedback"] == {**body["data"]["feedback"], "rating": "down",
                                                          "comment": "Missing units.", "message_id": answer}
    rows = await db.fetch("SELECT rating, comment FROM ai_message_feedback WHERE message_id = $1", uuid.UUID(answer))
    assert [tuple(r) for r in rows] == [("down", "Missing units.")]  # one per user per answer
    via_socket = await alice.ok("give_feedback", {"message_id": answer, "rating": "up", "comment": None})
    assert via_socket["feedback"]["rating"] == "up" and via_socket["feedback"]["comment"] is None
    assert await db.fetchval("SELECT count(*) FROM ai_message_feedback") == 1

    too_long = await rest(client, "PUT", url, alice, json={"rating": "up", "comment": "x" * 1001})
    assert too_long[0] == 400 and too_long[1]["error"]["field"] == "comment"
    assert (await rest(client, "PUT", url, alice, json={"rating": "meh"}))[0] == 400
    on_question = await alice.call("give_feedback", {"message_id": question, "rating": "up"})
    assert on_question["error"]["code"] == "invalid_payload"
    status, body = await rest(client, "PUT", url, bob, json={"rating": "down"})
    assert status == 403 and body["error"]["code"] == "forbidden"
    assert (await bob.call("withdraw_feedback", {"message_id": answer}))["error"]["code"] == "forbidden"
    assert (await rest(client, "PUT", f"/api/v1/messages/{uuid.uuid4()}/feedback", alice,
                       json={"rating": "up"}))[0] == 404

    status, body = await rest(client, "DELETE", url, alice)
    assert status == 200 and body["data"] == {"message_id": answer, "withdrawn": True}
    assert (await alice.ok("withdraw_feedback", {"message_id": answer}))["withdrawn"] is False
    assert await db.fetchval("SELECT count(*) FROM ai_message_feedback") == 0

    # Feedback goes with its conversation.
    await alice.ok("give_feedback", {"message_id": answer, "rating": "down"})
    await alice.ok("delete_conversation", {"conversation_id": conversation_id})
    assert await db.fetchval("SELECT count(*) FROM ai_message_feedback") == 0


async def test_the_branch_read_carries_the_callers_own_ratings(client, sockets):
    alice = await sign_in(client, sockets)
    conversation_id = await alice.conversation()
    first = (await answered(alice, conversation_id, "Any ocean temperature data?"))["assistant_message"]["id"]
    second = (await answered(alice, conversation_id, "Any rain data?"))["assistant_message"]["id"]
    assert (await alice.ok("get_conversation", {"conversation_id": conversation_id}))["feedback"] == []
    await alice.ok("give_feedback", {"message_id": second, "rating": "down", "comment": "No units."})

    read = await alice.ok("get_conversation", {"conversation_id": conversation_id})
    assert [(f["message_id"], f["rating"], f["comment"]) for f in read["feedback"]] == [(second, "down", "No units.")]
    status, body = await rest(client, "GET", f"/api/v1/conversations/{conversation_id}", alice)
    assert status == 200 and body["data"]["feedback"] == read["feedback"]
    switched = await alice.ok("switch_branch", {"message_id": first})
    assert [f["message_id"] for f in switched["feedback"]] == [second]  # the branch through the first holds both


async def test_admins_list_feedback_newest_first(client, sockets, db):
    admin = await register(client)
    await make_admin(db, admin)
    alice = await sign_in(client, sockets)
    conversation_id = await alice.conversation()
    answers = []
    for n in range(3):
        answers.append((await answered(alice, conversation_id, f"Question {n} about forests"))["assistant_message"])
    await alice.ok("give_feedback", {"message_id": answers[0]["id"], "rating": "down", "comment": "wrong"})
    await alice.ok("give_feedback", {"message_id": answers[1]["id"], "rating": "up"})
    await alice.ok("give_feedback", {"message_id": answers[2]["id"], "rating": "down"})

    admin_headers = {"Authorization": f"Bearer {admin['token']}"}
    response = await client.get("/api/v1/admin/assistant/feedback", params={"rating": "down", "limit": "1"},
                                headers=admin_headers)
    page = (await response.json())["data"]
    assert response.status == 200 and [f["message_id"] for f in page["feedback"]] == [answers[2]["id"]]
    entry = page["feedback"][0]
    assert entry["conversation_id"] == conversation_id and entry["rating"] == "down"
    content = await db.fetchval("SELECT content FROM ai_messages WHERE id = $1", uuid.UUID(answers[2]["id"]))
    assert content and entry["excerpt"] == content[:300]
    response = await client.get("/api/v1/admin/assistant/feedback",
                                params={"rating": "down", "cursor": page["next_cursor"]}, headers=admin_headers)
    rest_page = (await response.json())["data"]
    assert [(f["message_id"], f["comment"]) for f in rest_page["feedback"]] == [(answers[0]["id"], "wrong")]
    assert rest_page["next_cursor"] is None
    everything = await (await client.get("/api/v1/admin/assistant/feedback", headers=admin_headers)).json()
    assert [f["rating"] for f in everything["data"]["feedback"]] == ["down", "up", "down"]

    status, body = await rest(client, "GET", "/api/v1/admin/assistant/feedback", alice)
    assert status == 403 and body["error"]["code"] == "forbidden"
    assert (await client.get("/api/v1/admin/assistant/feedback")).status == 401
    bad = await client.get("/api/v1/admin/assistant/feedback", params={"rating": "sideways"}, headers=admin_headers)
    assert bad.status == 400


async def test_deleting_the_account_removes_its_shares_and_feedback(client, sockets, db):
    alice = await sign_in(client, sockets)
    conversation_id = await alice.conversation(title="Private notes")
    answer = (await answered(alice, conversation_id, "Any census data?"))["assistant_message"]["id"]
    await alice.ok("give_feedback", {"message_id": answer, "rating": "up", "comment": "great"})
    shared = await alice.ok("share_conversation", {"conversation_id": conversation_id})
    status, body = await rest(client, "DELETE", "/api/v1/me", alice, json={"password": "correct horse battery"})
    assert status == 200, body
    assert await db.fetchval("SELECT count(*) FROM ai_message_feedback") == 0
    assert await db.fetchval("SELECT count(*) FROM ai_conversation_shares") == 0
    assert (await client.get(shared["share"]["path"])).status == 404
