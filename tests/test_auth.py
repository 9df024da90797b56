"""Auth flows over the real app: register, login, logout, tokens, Google ID tokens, admins."""

from __future__ import annotations

import asyncio
import base64
import time

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

from server.services.admin import create_admin
from tests.helpers import register


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


async def test_register_then_me(client, db):
    data = await register(client, "alice")
    response = await client.get("/api/v1/me", headers=bearer(data["token"]))
    body = await response.json()
    assert response.status == 200
    assert body["data"]["username"] == "alice"
    assert "password_hash" not in body["data"]
    stored = await db.fetchval("SELECT password_hash FROM users WHERE username = 'alice'")
    assert stored.startswith("$argon2id$")
    assert await db.fetchval("SELECT count(*) FROM user_registrations") == 1


async def test_session_row_stores_a_digest_not_the_token(client, db):
    data = await register(client)
    row = await db.fetchrow("SELECT token, logout_time, expires_at FROM sessions")
    assert row["token"] not in data["token"] and len(row["token"]) == 64
    assert row["logout_time"] is None and row["expires_at"] is not None


async def test_duplicate_username_and_email_conflict(client, db):
    await register(client, "bob")
    response = await client.post("/api/v1/auth/register", json={
        "username": "bob", "email": "other@example.org", "password": "long enough pw"})
    body = await response.json()
    assert response.status == 409 and body["error"]["code"] == "conflict"
    assert body["error"]["field"] == "username"
    response = await client.post("/api/v1/auth/register", json={
        "username": "bobby", "email": "BOB@example.org", "password": "long enough pw"})
    body = await response.json()
    assert response.status == 409 and body["error"]["field"] == "email"
    assert await db.fetchval("SELECT count(*) FROM users WHERE account_kind = 'person'") == 1


@pytest.mark.parametrize("login", ["carol", "carol@example.org", "CAROL@EXAMPLE.ORG"])
async def test_login_by_username_or_email(client, login):
    await register(client, "carol", password="a good password")
    response = await client.post("/api/v1/auth/login", json={"login": login, "password": "a good password"})
    body = await response.json()
    assert response.status == 200, body
    me = await client.get("/api/v1/me", headers=bearer(body["data"]["token"]))
    assert (await me.json())["data"]["username"] == "carol"


async def test_wrong_password_and_unknown_user_look_the_same(client):
    await register(client, "dave", password="a good password")
    wrong = await client.post("/api/v1/auth/login", json={"login": "dave", "password": "not it at all"})
    unknown = await client.post("/api/v1/auth/login", json={"login": "nobody", "password": "whatever1"})
    assert wrong.status == unknown.status == 401
    assert (await wrong.json())["error"]["message"] == (await unknown.json())["error"]["message"]


async def test_logout_revokes_the_token_at_once(client, db):
    token = (await register(client))["token"]
    assert (await client.get("/api/v1/me", headers=bearer(token))).status == 200
    response = await client.post("/api/v1/auth/logout", headers=bearer(token))
    assert response.status == 200
    after = await client.get("/api/v1/me", headers=bearer(token))
    assert after.status == 401
    assert (await after.json())["error"]["code"] == "unauthorized"
    assert await db.fetchval("SELECT logout_time IS NOT NULL FROM sessions")


async def test_revoked_on_another_node_is_refused_after_the_cache_ttl(aiohttp_client, settings, db):
    from server.app import create_app

    client = await aiohttp_client(create_app(settings.replace(session_cache_ttl=0.2)))
    token = (await register(client))["token"]
    assert (await client.get("/api/v1/me", headers=bearer(token))).status == 200
    # Another server process logged this session out: only the database knows.
    await db.execute("UPDATE sessions SET logout_time = now()")
    await asyncio.sleep(0.3)
    assert (await client.get("/api/v1/me", headers=bearer(token))).status == 401


async def test_expired_and_forged_tokens_are_refused(client, settings):
    data = await register(client)
    claims = jwt.decode(data["token"], options={"verify_signature": False})
    secret = base64.urlsafe_b64decode(settings.jwt_secret)
    expired = jwt.encode({**claims, "exp": int(time.time()) - 10}, secret, algorithm="HS256")
    forged = jwt.encode(claims, b"x" * 32, algorithm="HS256")
    for token, message in ((expired, "expired"), (forged, "invalid"), ("not-a-jwt", "invalid")):
        response = await client.get("/api/v1/me", headers=bearer(token))
        body = await response.json()
        assert response.status == 401 and message in body["error"]["message"]
    assert (await client.get("/api/v1/me")).status == 401


async def test_a_token_is_verified_once_and_refused_once_it_expires(client, settings, monkeypatch):
    data = await register(client)
    claims = jwt.decode(data["token"], options={"verify_signature": False})
    secret = base64.urlsafe_b64decode(settings.jwt_secret)
    expires = int(time.time()) + 2
    short = jwt.encode({**claims, "exp": expires}, secret, algorithm="HS256")
    decodes = []
    real_decode = jwt.decode
    monkeypatch.setattr(jwt, "decode", lambda *args, **kwargs: decodes.append(1) or real_decode(*args, **kwargs))
    for _ in range(3):
        assert (await client.get("/api/v1/me", headers=bearer(short))).status == 200
    assert len(decodes) == 1
    # A forgery of the same claims is not the same token: its signature is checked, and fails.
    forged = jwt.encode({**claims, "exp": expires}, b"x" * 32, algorithm="HS256")
    assert (await client.get("/api/v1/me", headers=bearer(forged))).status == 401
    await asyncio.sleep(max(0.0, expires - time.time()) + 0.1)
    response = await client.get("/api/v1/me", headers=bearer(short))
    assert response.status == 401 and "expired" in (await response.json())["error"]["message"]


async def test_admin_routes_need_the_admin_role(client, db):
    user = await register(client)
    forbidden = await client.get("/api/v1/admin/stats", headers=bearer(user["token"]))
    assert forbidden.status == 403 and (await forbidden.json())["error"]["code"] == "forbidden"
    message = await create_admin(db, username="root", email="root@example.org", password="admin password")
    assert "created administrator root" in message
    login = await client.post("/api/v1/auth/login", json={"login": "root", "password": "admin password"})
    token = (await login.json())["data"]["token"]
    stats = await client.get("/api/v1/admin/stats", headers=bearer(token))
    body = await stats.json()
    assert stats.status == 200 and body["data"]["users"] == 2
    assert await db.fetchval("SELECT role FROM admin") == "admin"


# --- Google ID tokens, verified against a JWKS served by a local server ------------------------

AUDIENCE = "hub-test.apps.googleusercontent.com"


@pytest.fixture
def google_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
async def jwks_url(aiohttp_server, google_key):
    jwk = jwt.algorithms.RSAAlgorithm.to_jwk(google_key.public_key(), as_dict=True)
    jwk.update({"kid": "test-key", "use": "sig", "alg": "RS256"})

    async def certs(request):
        return web.json_response({"keys": [jwk]})

    app = web.Application()
    app.router.add_get("/certs", certs)
    server = await aiohttp_server(app)
    return str(server.make_url("/certs"))


@pytest.fixture
async def google_client(aiohttp_client, settings, jwks_url):
    from server.app import create_app

    return await aiohttp_client(create_app(settings.replace(
        google_client_id=AUDIENCE, google_jwks_url=jwks_url)))


def google_token(key, **overrides) -> str:
    now = int(time.time())
    claims = {"iss": "https://accounts.google.com", "aud": AUDIENCE, "sub": "1098765432",
              "email": "gina@example.org", "email_verified": True, "name": "Gina",
              "iat": now, "exp": now + 600, **overrides}
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": "test-key"})


async def test_google_sign_in_creates_then_finds_the_user(google_client, google_key, db):
    first = await google_client.post("/api/v1/auth/google", json={"id_token": google_token(google_key)})
    body = await first.json()
    assert first.status == 200, body
    user = body["data"]["user"]
    assert user["email"] == "gina@example.org"
    assert user["sui_address"].startswith("0x") and len(user["sui_address"]) == 66
    salt = await db.fetchval("SELECT salt FROM users WHERE google_id = '1098765432'")
    assert 0 < int(salt) < 2**128
    second = await google_client.post("/api/v1/auth/google", json={"id_token": google_token(google_key)})
    assert (await second.json())["data"]["user"]["id"] == user["id"]
    assert await db.fetchval("SELECT count(*) FROM users WHERE account_kind = 'person'") == 1


async def test_google_links_an_existing_account_only_by_a_verified_email(google_client, google_key, db):
    owner = await register(google_client, "gina")  # gina@example.org, with a password
    linked = await google_client.post("/api/v1/auth/google", json={"id_token": google_token(google_key)})
    assert (await linked.json())["data"]["user"]["id"] == owner["user"]["id"]
    assert await db.fetchval("SELECT google_id FROM users WHERE username = 'gina'") == "1098765432"


@pytest.mark.parametrize("verified", [{"email_verified": False}, {"email_verified": "false"}, {}],
                         ids=["false", "text-false", "absent"])
async def test_google_never_claims_an_account_by_an_unverified_email(google_client, google_key, db, verified):
    owner = await register(google_client, "gina")
    claims = {"sub": "555", "email": "gina@example.org", "email_verified": None, **verified}
    claims = {key: value for key, value in claims.items() if value is not None}
    token = jwt.encode({"iss": "https://accounts.google.com", "aud": AUDIENCE, "iat": int(time.time()),
                        "exp": int(time.time()) + 600, **claims}, google_key, algorithm="RS256",
                       headers={"kid": "test-key"})
    reply = await google_client.post("/api/v1/auth/google", json={"id_token": token})
    user = (await reply.json())["data"]["user"]
    assert reply.status == 200 and user["id"] != owner["user"]["id"]
    assert user["email"] == "555@google.invalid"
    assert await db.fetchval("SELECT google_id FROM users WHERE username = 'gina'") is None


@pytest.mark.parametrize("overrides, message", [
    ({"aud": "someone-else.apps.googleusercontent.com"}, "another application"),
    ({"iss": "https://evil.example.org"}, "wrong issuer"),
    ({"exp": int(time.time()) - 60}, "expired"),
])
async def test_google_token_with_wrong_claims_is_refused(google_client, google_key, db, overrides, message):
    response = await google_client.post("/api/v1/auth/google",
                                        json={"id_token": google_token(google_key, **overrides)})
    body = await response.json()
    assert response.status == 401 and message in body["error"]["message"]
    assert await db.fetchval("SELECT count(*) FROM users WHERE account_kind = 'person'") == 0


async def test_google_token_with_wrong_signature_is_refused(google_client, db):
    impostor = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    response = await google_client.post("/api/v1/auth/google", json={"id_token": google_token(impostor)})
    assert response.status == 401
    assert await db.fetchval("SELECT count(*) FROM users WHERE account_kind = 'person'") == 0


async def test_google_token_with_hs256_is_refused(google_client):
    token = jwt.encode({"sub": "1", "aud": AUDIENCE, "iss": "accounts.google.com",
                        "exp": int(time.time()) + 60}, "secret-secret-secret-secret-1234",
                       algorithm="HS256", headers={"kid": "test-key"})
    response = await google_client.post("/api/v1/auth/google", json={"id_token": token})
    assert response.status == 401
