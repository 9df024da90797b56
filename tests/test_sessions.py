"""Sessions end everywhere at once; refresh rotates; sockets re-authenticate in place; sign-in limits."""

from __future__ import annotations

import asyncio
import uuid

import jwt
import pytest

from db import users as user_queries
from server.app import create_app
from server.realtime.hub import publish
from server.services.auth import AUTH
from tests.helpers import register, server_url, wait_until
from tests.test_realtime import read_sse


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def login(client, username: str, password: str = "correct horse battery") -> dict:
    response = await client.post("/api/v1/auth/login", json={"login": username, "password": password})
    body = await response.json()
    assert response.status == 200, body
    return body["data"]


async def make_admin(db, user: dict) -> None:
    await user_queries.upsert_admin(db, uuid.UUID(user["id"]), username=user["username"], email=user["email"],
                                    password_hash="x")


async def test_refresh_rotates_and_reuse_ends_the_whole_session(client, sockets):
    first = await register(client)
    refreshed = await client.post("/api/v1/auth/refresh", json={"refresh_token": first["refresh_token"]})
    second = (await refreshed.json())["data"]
    assert refreshed.status == 200
    assert second["token"] != first["token"] and second["refresh_token"] != first["refresh_token"]
    assert second["user"]["id"] == first["user"]["id"]
    assert (await client.get("/api/v1/me", headers=bearer(second["token"]))).status == 200

    sock = sockets()
    await sock.connect(server_url(client), "/purchases", token=second["token"])
    # The first refresh token was spent: presenting it again means a copy is loose.
    reused = await client.post("/api/v1/auth/refresh", json={"refresh_token": first["refresh_token"]})
    assert reused.status == 401 and "already used" in (await reused.json())["error"]["message"]
    assert await sock.wait_for("signed_out") == {"reason": "refresh_reuse"}
    await wait_until(lambda: "/purchases" not in sock.sio.namespaces)
    # Every token of the family is dead: the current access token and the current refresh token.
    assert (await client.get("/api/v1/me", headers=bearer(second["token"]))).status == 401
    after = await client.post("/api/v1/auth/refresh", json={"refresh_token": second["refresh_token"]})
    assert after.status == 401


async def test_refresh_refuses_unknown_tokens_and_stores_only_digests(client, db):
    data = await register(client)
    unknown = await client.post("/api/v1/auth/refresh", json={"refresh_token": "x" * 43})
    assert unknown.status == 401 and (await unknown.json())["error"]["code"] == "unauthorized"
    stored = await db.fetch("SELECT token_hash FROM session_refresh_tokens")
    assert len(stored) == 1 and stored[0]["token_hash"] != data["refresh_token"]
    assert data["refresh_token"] not in {row["token_hash"] for row in stored}


async def test_two_refreshes_of_one_token_at_once_have_one_winner(client):
    data = await register(client)
    replies = await asyncio.gather(*(client.post("/api/v1/auth/refresh", json={"refresh_token": data["refresh_token"]})
                                     for _ in range(5)))
    assert sorted(reply.status for reply in replies) == [200, 401, 401, 401, 401]


async def test_admin_revocation_closes_every_device_of_that_user_only(client, sockets, db):
    admin = await register(client, "root_admin")
    await make_admin(db, admin["user"])
    victim = await register(client, "victim")
    second_device = await login(client, "victim")
    bystander = await register(client, "bystander")
    socks = [sockets() for _ in range(3)]
    await socks[0].connect(server_url(client), "/purchases", token=victim["token"])
    await socks[1].connect(server_url(client), "/assistant", token=second_device["token"])
    await socks[2].connect(server_url(client), "/purchases", token=bystander["token"])

    reply = await client.post(f"/api/v1/admin/users/{victim['user']['id']}/sessions/revoke",
                              headers=bearer(admin["token"]))
    assert reply.status == 200 and (await reply.json())["data"]["sessions_revoked"] == 2
    for sock, namespace in ((socks[0], "/purchases"), (socks[1], "/assistant")):
        assert await sock.wait_for("signed_out") == {"reason": "revoked"}
        await wait_until(lambda s=sock, n=namespace: n not in s.sio.namespaces)
    assert (await client.get("/api/v1/me", headers=bearer(second_device["token"]))).status == 401
    assert (await socks[2].call("/purchases", "whoami"))["data"]["user_id"] == bystander["user"]["id"]
    assert await db.fetchval("SELECT count(*) FROM sessions WHERE end_reason = 'revoked'") == 2

    refused = await client.post(f"/api/v1/admin/users/{bystander['user']['id']}/sessions/revoke",
                                headers=bearer(bystander["token"]))
    assert refused.status == 403
    unknown = await client.post(f"/api/v1/admin/users/{uuid.uuid4()}/sessions/revoke", headers=bearer(admin["token"]))
    assert unknown.status == 404


async def test_logout_on_one_node_closes_the_sockets_on_another(aiohttp_client, settings, redis_url, sockets):
    shared = settings.replace(redis_url=redis_url, redis_prefix=f"t{uuid.uuid4().hex[:12]}:")
    node_a = await aiohttp_client(create_app(shared))
    node_b = await aiohttp_client(create_app(shared))
    data = await register(node_a)
    sock = sockets()
    await sock.connect(server_url(node_b), "/purchases", token=data["token"])
    # Node B checks the session once so its cache holds it: the end must purge it there too.
    assert (await node_b.get("/api/v1/me", headers=bearer(data["token"]))).status == 200
    await node_a.post("/api/v1/auth/logout", headers=bearer(data["token"]))
    assert await sock.wait_for("signed_out") == {"reason": "logged_out"}
    await wait_until(lambda: "/purchases" not in sock.sio.namespaces)
    assert (await node_b.get("/api/v1/me", headers=bearer(data["token"]))).status == 401


@pytest.fixture
async def short_tokens(aiohttp_client, settings):
    """An app whose access tokens last 3 s, with the expiry notice 2 s before."""
    return await aiohttp_client(create_app(settings.replace(access_token_ttl=3, token_expiry_notice=2.0)))


async def test_a_socket_refreshes_in_place_and_one_that_does_not_is_ended(short_tokens, sockets):
    data = await register(short_tokens)
    keeps, lapses = sockets(), sockets()
    await keeps.connect(server_url(short_tokens), "/purchases", token=data["token"])
    await lapses.connect(server_url(short_tokens), "/assistant", token=data["token"])
    notice = await keeps.wait_for("token_expiring", timeout=3)
    assert 0 < notice["expires_in"] <= 2.5 and notice["expires_at"]

    refreshed = await short_tokens.post("/api/v1/auth/refresh", json={"refresh_token": data["refresh_token"]})
    new_token = (await refreshed.json())["data"]["token"]
    ack = await keeps.call("/purchases", "refresh_token", {"token": new_token})
    assert ack["ok"] and ack["data"]["expires_at"]

    assert await lapses.wait_for("signed_out", timeout=4) == {"reason": "expired"}
    await wait_until(lambda: "/assistant" not in lapses.sio.namespaces)
    # Past the first token's end, the refreshed socket is still connected and signed in.
    assert (await keeps.call("/purchases", "whoami"))["data"]["user_id"] == data["user"]["id"]
    assert "/purchases" in keeps.sio.namespaces


async def test_refresh_token_command_refuses_another_users_token(client, sockets):
    alice, mallory = await register(client), await register(client)
    sock = sockets()
    await sock.connect(server_url(client), "/purchases", token=alice["token"])
    reply = await sock.call("/purchases", "refresh_token", {"token": mallory["token"]})
    assert reply["error"]["code"] == "forbidden"
    assert (await sock.call("/purchases", "whoami"))["data"]["user_id"] == alice["user"]["id"]
    anonymous = sockets()
    await anonymous.connect(server_url(client), "/games")
    assert (await anonymous.call("/games", "refresh_token", {"token": alice["token"]}))["error"]["code"] \
        == "unauthorized"


@pytest.fixture
async def strict(aiohttp_client, settings):
    """An app with small sign-in limits."""
    return await aiohttp_client(create_app(settings.replace(
        signin_attempts_per_address=6, signin_address_window=60, login_failures_per_account=3,
        login_failure_window=60)))


async def test_wrong_passwords_lock_the_account_before_argon2_runs(strict):
    await register(strict, "target")
    for _ in range(3):
        wrong = await strict.post("/api/v1/auth/login", json={"login": "target", "password": "not it at all"})
        assert wrong.status == 401
    # Even the right password is refused now, with when to come back.
    locked = await strict.post("/api/v1/auth/login", json={"login": "TARGET", "password": "correct horse battery"})
    body = await locked.json()
    assert locked.status == 429 and body["error"]["code"] == "rate_limited"
    assert 0 < body["error"]["retry_after"] <= 60 and int(locked.headers["Retry-After"]) >= 1


async def test_a_correct_password_clears_the_failures(strict):
    await register(strict, "forgetful")
    statuses = []
    for password in ("not it", "not it", "correct horse battery", "not it", "not it"):
        reply = await strict.post("/api/v1/auth/login", json={"login": "forgetful", "password": password})
        statuses.append(reply.status)
    # Four failures in all, but never three in a row: without the reset the last would be 429.
    assert statuses == [401, 401, 200, 401, 401]


async def test_one_address_is_limited_across_accounts_and_sign_in_kinds(strict):
    await register(strict, "someone")  # 1
    statuses = []
    for index in range(6):  # 2..7
        reply = await strict.post("/api/v1/auth/login", json={"login": f"nobody{index}", "password": "whatever1"})
        statuses.append(reply.status)
    assert statuses == [401] * 5 + [429]
    refused = await strict.post("/api/v1/auth/register", json={"username": "late", "email": "late@example.org",
                                                                "password": "correct horse battery"})
    assert refused.status == 429


async def test_the_limits_are_shared_by_every_node(aiohttp_client, settings, redis_url):
    shared = settings.replace(redis_url=redis_url, redis_prefix=f"t{uuid.uuid4().hex[:12]}:",
                              login_failures_per_account=2, login_failure_window=60)
    node_a = await aiohttp_client(create_app(shared))
    node_b = await aiohttp_client(create_app(shared))
    await register(node_a, "shared_target")
    for node in (node_a, node_b):
        wrong = await node.post("/api/v1/auth/login", json={"login": "shared_target", "password": "wrong one"})
        assert wrong.status == 401
    locked = await node_a.post("/api/v1/auth/login", json={"login": "shared_target",
                                                            "password": "correct horse battery"})
    assert locked.status == 429


async def test_logout_ends_a_private_event_stream_before_its_next_event(client):
    data = await register(client)
    channel = f"user:{data['user']['id']}"
    async with client.get("/api/v1/events/stream", params={"channel": channel},
                          headers=bearer(data["token"])) as stream:
        await publish(client.app, channel, "kyc_status_changed", {"status": "Pending"})
        assert (await read_sse(stream, 1))[0]["event"] == "kyc_status_changed"
        await client.post("/api/v1/auth/logout", headers=bearer(data["token"]))
        await publish(client.app, channel, "kyc_status_changed", {"status": "Approved"})
        ended = (await read_sse(stream, 1))[0]
        assert ended["event"] == "signed_out"
        assert await asyncio.wait_for(stream.content.read(), 5) == b""  # the stream is closed


@pytest.mark.parametrize("trusted, expected", [((), [201, 429]), (("127.0.0.0/8",), [201, 201])],
                         ids=["header-ignored", "proxy-trusted"])
async def test_behind_a_trusted_proxy_each_forwarded_client_has_its_own_limit(aiohttp_client, settings,
                                                                             trusted, expected):
    node = await aiohttp_client(create_app(settings.replace(signin_attempts_per_address=1,
                                                            trusted_proxies=trusted)))
    statuses = []
    for index, client_address in enumerate(("203.0.113.7", "198.51.100.9")):
        # The left entry is the client's own claim, which proves nothing; the proxy appended the right one.
        reply = await node.post("/api/v1/auth/register", headers={"X-Forwarded-For": f"10.9.9.9, {client_address}"},
                                json={"username": f"proxied{index}", "email": f"proxied{index}@example.org",
                                      "password": "correct horse battery"})
        statuses.append(reply.status)
    assert statuses == expected


async def test_sockets_of_one_session_reconnecting_at_once_check_it_with_one_read(client, sockets):
    # A restarted node has no cached session checks, and every tab of a session reconnects at once.
    data = await register(client)
    auth = client.app[AUTH]
    auth.sessions.forget(jwt.decode(data["token"], options={"verify_signature": False})["sid"])
    before = auth._session_reads.batches
    clients = [sockets() for _ in range(8)]
    await asyncio.gather(*(sock.connect(server_url(client), "/purchases", token=data["token"]) for sock in clients))
    assert auth._session_reads.batches - before == 1


async def test_sockets_of_many_sessions_reconnecting_at_once_are_checked_together_and_each_rightly(
        client, sockets, db):
    # Five accounts reconnect together after a restart; one of them signed out meanwhile elsewhere.
    users = [await register(client) for _ in range(5)]
    auth = client.app[AUTH]
    session_ids = [jwt.decode(user["token"], options={"verify_signature": False})["sid"] for user in users]
    for session_id in session_ids:
        auth.sessions.forget(session_id)
    await db.execute("UPDATE sessions SET logout_time = now() WHERE session_id = $1", session_ids[2])
    before = auth._session_reads.batches
    clients = [sockets() for _ in users]
    outcomes = await asyncio.gather(*(sock.connect(server_url(client), "/purchases", token=user["token"])
                                      for sock, user in zip(clients, users)), return_exceptions=True)
    assert auth._session_reads.batches - before == 1
    assert [outcome is None for outcome in outcomes] == [True, True, False, True, True]
    assert clients[2].connect_errors[-1]["data"]["code"] == "unauthorized"
    for sock in clients[:2] + clients[3:]:
        assert (await sock.call("/purchases", "list_purchases", {}))["ok"] is True
