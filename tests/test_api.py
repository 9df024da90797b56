"""The REST edge: validation before any handler logic, one error envelope, limits, request ids."""

from __future__ import annotations

import pytest

from tests.helpers import register, server_url


@pytest.mark.parametrize("body, field", [
    ({"username": "eve", "email": "eve@example.org"}, "password"),
    ({"username": "e", "email": "eve@example.org", "password": "long enough"}, "username"),
    ({"username": "eve!", "email": "eve@example.org", "password": "long enough"}, "username"),
    ({"username": "eve", "email": "not-an-email", "password": "long enough"}, "email"),
    ({"username": "eve", "email": "eve@example.org", "password": "short"}, "password"),
    ({"username": "eve", "email": "eve@example.org", "password": 12345678}, "password"),
    ({"username": "eve", "email": "eve@example.org", "password": "long enough", "role": "admin"}, "role"),
])
async def test_bad_register_payload_names_the_field_and_writes_nothing(client, db, body, field):
    response = await client.post("/api/v1/auth/register", json=body)
    payload = await response.json()
    assert response.status == 400
    assert payload == {"ok": False, "error": {"code": "invalid_payload", "field": field,
                                              "message": payload["error"]["message"]}}
    assert await db.fetchval("SELECT count(*) FROM users WHERE account_kind = 'person'") == 0


async def test_malformed_json_and_non_object_bodies(client, db):
    response = await client.post("/api/v1/auth/login", data=b"{not json",
                                 headers={"Content-Type": "application/json"})
    assert response.status == 400 and (await response.json())["error"]["code"] == "invalid_payload"
    response = await client.post("/api/v1/auth/login", json=["login", "password"])
    assert response.status == 400 and (await response.json())["error"]["code"] == "invalid_payload"


async def test_nul_characters_are_refused_not_a_server_error(client, db, sockets):
    # PostgreSQL text cannot hold NUL: a schema-checked body names the field, anything else
    # (a query string) still gets invalid_payload instead of an internal error.
    account = await register(client)
    headers = {"Authorization": f"Bearer {account['token']}"}
    response = await client.post("/api/v1/conversations", json={"title": "a\x00b"}, headers=headers)
    assert response.status == 400
    assert (await response.json())["error"] == {"code": "invalid_payload", "field": "title",
                                                "message": "text must not contain NUL characters"}
    response = await client.get("/api/v1/datapods", params={"q": "a\x00b"})
    assert response.status == 400 and (await response.json())["error"]["code"] == "invalid_payload"
    sock = sockets()
    await sock.connect(server_url(client), "/assistant", token=account["token"])
    reply = await sock.call("/assistant", "create_conversation", {"title": "x", "extra\x00": 1})
    assert reply["ok"] is False and reply["error"]["code"] == "invalid_payload"
    assert await db.fetchval("SELECT count(*) FROM ai_conversations") == 0


@pytest.mark.parametrize("path", ["/api/v1/proposals/{id}", "/api/v1/games/{id}", "/api/v1/nfts/{id}",
                                  "/api/v1/blocks/{id}", "/api/v1/game-sessions/{id}",
                                  "/api/v1/nft-listings/{id}/cancel"])
@pytest.mark.parametrize("raw_id", ["9" * 5000, "\u00b2", "2147483648"])
async def test_an_unusable_path_id_is_not_found(client, path, raw_id):
    # int() refuses 4,300+ digits and "²".isdigit() is true: neither may become a server error.
    account = await register(client)
    method = "POST" if path.endswith("/cancel") else "GET"
    response = await client.request(method, path.format(id=raw_id),
                                    headers={"Authorization": f"Bearer {account['token']}"})
    assert response.status == 404 and (await response.json())["error"]["code"] == "not_found"


async def test_unknown_route_and_method_get_the_envelope(client):
    response = await client.get("/api/v1/no-such-thing")
    body = await response.json()
    assert response.status == 404 and body["error"]["code"] == "not_found"
    response = await client.delete("/api/v1/auth/login")
    assert response.status in (404, 405) and (await response.json())["error"]["code"] == "not_found"


async def test_oversized_body_is_refused(aiohttp_client, settings, db):
    from server.app import create_app

    client = await aiohttp_client(create_app(settings.replace(max_payload_bytes=2048)))
    response = await client.post("/api/v1/auth/register", json={
        "username": "big", "email": "big@example.org", "password": "x" * 5000})
    assert response.status == 413
    assert (await response.json())["error"]["code"] == "payload_too_large"
    assert await db.fetchval("SELECT count(*) FROM users WHERE account_kind = 'person'") == 0


async def test_request_id_is_echoed_or_generated(client):
    response = await client.get("/healthz", headers={"X-Request-ID": "trace-123"})
    assert response.headers["X-Request-ID"] == "trace-123"
    generated = (await client.get("/healthz")).headers["X-Request-ID"]
    assert len(generated) == 32


async def test_money_is_serialised_as_exact_strings(client, db):
    data = await register(client, "frank")
    await db.execute("UPDATE users SET total_balance = 12.34567891 WHERE username = 'frank'")
    response = await client.get("/api/v1/me", headers={"Authorization": f"Bearer {data['token']}"})
    assert (await response.json())["data"]["total_balance"] == "12.34567891"


async def test_static_index_is_served(client):
    response = await client.get("/")
    assert response.status == 200 and "SourceNet Hub" in await response.text()


async def test_static_files_stay_inside_the_static_folder(client):
    assert (await client.get("/index.html")).status == 200
    for path in ("/../pyproject.toml", "/%2e%2e/pyproject.toml", "/no-such-file.js"):
        response = await client.get(path)
        assert response.status == 404 and (await response.json())["error"]["code"] == "not_found"
