"""Accounts (issue 19): password change and reset by mail (a real SMTP server), profile edits, a
user's sessions with revoke, and the administrators' users, registrations, suspension and roster."""

from __future__ import annotations

import asyncio
import datetime as dt
import email
import hashlib
import re
import uuid

import pytest
from aiosmtpd.controller import Controller

from db import accounts as account_queries
from db import users as user_queries
from server.app import create_app
from server.core.settings import Settings
from tests.helpers import free_port, register, server_url, wait_until

PASSWORD = "correct horse battery"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def login(client, login_name: str, password: str = PASSWORD, agent: str = "test-agent") -> tuple[int, dict]:
    response = await client.post("/api/v1/auth/login", json={"login": login_name, "password": password},
                                 headers={"User-Agent": agent})
    return response.status, await response.json()


async def make_admin(db, user: dict) -> None:
    await user_queries.upsert_admin(db, uuid.UUID(user["id"]), username=user["username"], email=user["email"],
                                    password_hash="x")


class Inbox:
    """An aiosmtpd handler that keeps every message it is handed."""

    def __init__(self) -> None:
        self.messages: list[email.message.Message] = []

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd's hook name
        self.messages.append(email.message_from_bytes(envelope.content))
        return "250 OK"


@pytest.fixture
async def smtp():
    """A real SMTP server on a free local port."""
    inbox = Inbox()
    controller = Controller(inbox, hostname="127.0.0.1", port=free_port())
    controller.start()
    yield controller, inbox
    controller.stop()


@pytest.fixture
async def mailing(settings, aiohttp_client, smtp):
    """An app that mails through the local SMTP server, with links to https://hub.example."""
    controller, inbox = smtp
    app = create_app(settings.replace(smtp_url=f"smtp://{controller.hostname}:{controller.port}",
                                      public_url="https://hub.example/", outbox_poll_interval=0.2,
                                      password_resets_per_email=2, password_resets_per_address=5))
    return await aiohttp_client(app), inbox


async def test_password_change_reauthenticates_and_ends_the_other_sessions(client, sockets, db):
    me = await register(client)
    status, other = await login(client, me["user"]["username"])
    assert status == 200
    sock = sockets()
    await sock.connect(server_url(client), "/purchases", token=other["data"]["token"])

    wrong = await client.post("/api/v1/me/password", headers=bearer(me["token"]),
                              json={"current_password": "not the password", "new_password": "a new password"})
    assert wrong.status == 403 and (await wrong.json())["error"]["field"] == "current_password"
    assert (await login(client, me["user"]["username"]))[0] == 200  # nothing changed
    short = await client.post("/api/v1/me/password", headers=bearer(me["token"]),
                              json={"current_password": PASSWORD, "new_password": "short"})
    assert short.status == 400

    changed = await client.post("/api/v1/me/password", headers=bearer(me["token"]),
                                json={"current_password": PASSWORD, "new_password": "a new password"})
    assert changed.status == 200, await changed.text()
    # Both the second device and the check-login above ended; this one stays.
    assert (await changed.json())["data"]["sessions_ended"] == 2
    assert await sock.wait_for("signed_out") == {"reason": "password_changed"}
    assert (await client.get("/api/v1/me", headers=bearer(other["data"]["token"]))).status == 401
    assert (await client.get("/api/v1/me", headers=bearer(me["token"]))).status == 200
    assert (await login(client, me["user"]["username"]))[0] == 401
    assert (await login(client, me["user"]["username"], "a new password"))[0] == 200
    assert await db.fetchval("SELECT count(*) FROM sessions WHERE end_reason = 'password_changed'") == 2


async def test_password_reset_mails_a_single_use_link_through_smtp(mailing, sockets, db):
    client, inbox = mailing
    me = await register(client)
    sock = sockets()
    await sock.connect(server_url(client), "/purchases", token=me["token"])
    address = me["user"]["email"]

    for asked in (address.upper(), "nobody-here@example.org"):
        reply = await client.post("/api/v1/auth/password-reset", json={"email": asked})
        assert reply.status == 202 and (await reply.json())["data"] == {"requested": True}
    await wait_until(lambda: len(inbox.messages) == 1, timeout=10)
    mail = inbox.messages[0]
    assert mail["To"] == address and "Reset" in mail["Subject"]
    link = re.search(r"https://\S+", mail.get_payload(decode=True).decode()).group(0)
    assert link.startswith("https://hub.example/reset-password.html#token=")
    token = link.split("#token=", 1)[1]
    # Only the digest is stored; the queued body was sealed, and is scrubbed once sent.
    digest = hashlib.sha256(token.encode()).hexdigest()
    assert await db.fetchval("SELECT token_hash FROM password_reset_tokens") == digest
    await wait_until(lambda: db.fetchval("SELECT sent_at IS NOT NULL AND body_sealed IS NULL FROM mail_outbox"))
    assert (await client.get("/reset-password.html")).status == 200  # the page the link opens

    confirmed = await client.post("/api/v1/auth/password-reset/confirm",
                                  json={"token": token, "new_password": "reset password"})
    assert confirmed.status == 200, await confirmed.text()
    assert await sock.wait_for("signed_out") == {"reason": "password_reset"}
    assert (await client.get("/api/v1/me", headers=bearer(me["token"]))).status == 401
    assert (await login(client, me["user"]["username"], "reset password"))[0] == 200
    again = await client.post("/api/v1/auth/password-reset/confirm",
                              json={"token": token, "new_password": "another password"})
    assert again.status == 400 and "already used" in (await again.json())["error"]["message"]
    unknown = await client.post("/api/v1/auth/password-reset/confirm",
                                json={"token": "x" * 43, "new_password": "another password"})
    assert unknown.status == 400


async def test_reset_tokens_expire_and_requests_are_limited(mailing, db):
    client, inbox = mailing
    me = await register(client)
    user_id = uuid.UUID(me["user"]["id"])
    token = "expired-token-" + uuid.uuid4().hex
    await account_queries.add_reset_token(db, hashlib.sha256(token.encode()).hexdigest(), user_id,
                                          dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=30), None)
    await db.execute("UPDATE password_reset_tokens SET created_at = now() - interval '1 hour', "
                     "expires_at = now() - interval '1 second'")
    expired = await client.post("/api/v1/auth/password-reset/confirm",
                                json={"token": token, "new_password": "too late now"})
    assert expired.status == 400 and "expired" in (await expired.json())["error"]["message"]
    assert (await login(client, me["user"]["username"]))[0] == 200

    # Per email: 2 mails an hour, then still 202 but nothing more is queued. Per address: 5 requests
    # and confirmations together (the one above counted), then 429.
    statuses = [(await client.post("/api/v1/auth/password-reset", json={"email": me["user"]["email"]})).status
                for _ in range(4)]
    assert statuses == [202, 202, 202, 202]
    assert await db.fetchval("SELECT count(*) FROM mail_outbox") == 2
    refused = await client.post("/api/v1/auth/password-reset", json={"email": "other@example.org"})
    assert refused.status == 429 and (await refused.json())["error"]["code"] == "rate_limited"
    await wait_until(lambda: len(inbox.messages) == 2, timeout=10)


async def test_a_reset_token_confirmed_twice_at_once_works_once(client, db):
    me = await register(client)
    token = "live-token-" + uuid.uuid4().hex
    await account_queries.add_reset_token(db, hashlib.sha256(token.encode()).hexdigest(), uuid.UUID(me["user"]["id"]),
                                          dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=30), None)
    replies = await asyncio.gather(*(client.post("/api/v1/auth/password-reset/confirm",
                                                 json={"token": token, "new_password": f"new password {index}"})
                                     for index in range(3)))
    assert sorted(reply.status for reply in replies) == [200, 400, 400]


async def test_profile_edit_keeps_usernames_unique_and_valid(client):
    me = await register(client)
    other = await register(client)
    headers = bearer(me["token"])
    taken = await client.patch("/api/v1/me", headers=headers, json={"username": other["user"]["username"]})
    assert taken.status == 409 and (await taken.json())["error"]["field"] == "username"
    for bad in ({"username": "no spaces"}, {"username": "ab"}, {"avatar_url": "http://img.example/a.png"},
                {"avatar_url": "javascript:alert(1)"}, {"bio": "x" * 1001}, {}, {"email": "a@b.example"}):
        reply = await client.patch("/api/v1/me", headers=headers, json=bad)
        assert reply.status == 400, bad
    new_name = f"renamed{uuid.uuid4().hex[:8]}"
    changed = await client.patch("/api/v1/me", headers=headers, json={
        "username": new_name, "name": "Ada", "avatar_url": "https://img.example/ada.png",
        "bio": "I sell weather data."})
    assert changed.status == 200, await changed.text()
    data = (await changed.json())["data"]
    assert (data["username"], data["name"], data["avatar_url"], data["bio"]) == (
        new_name, "Ada", "https://img.example/ada.png", "I sell weather data.")
    assert (await (await client.get("/api/v1/me", headers=headers)).json())["data"]["bio"] == "I sell weather data."
    assert (await login(client, new_name))[0] == 200
    cleared = await client.patch("/api/v1/me", headers=headers, json={"avatar_url": None, "bio": None})
    assert (await cleared.json())["data"]["avatar_url"] is None
    assert (await client.patch("/api/v1/me", json={"bio": "anonymous"})).status == 401


async def test_sessions_are_listed_and_one_can_be_revoked(client, sockets):
    me = await register(client)
    status, laptop = await login(client, me["user"]["username"], agent="Laptop/1.0")
    assert status == 200
    stranger = await register(client)
    sock = sockets()
    await sock.connect(server_url(client), "/purchases", token=laptop["data"]["token"])

    listed = (await (await client.get("/api/v1/me/sessions", headers=bearer(me["token"]))).json())["data"]["sessions"]
    assert len(listed) == 2 and sum(session["current"] for session in listed) == 1
    laptop_session = next(session for session in listed if session["user_agent"] == "Laptop/1.0")
    assert not laptop_session["current"] and laptop_session["ip_address"] == "127.0.0.1"
    assert {"id", "created_at", "last_seen_at", "expires_at"} <= set(laptop_session)

    foreign = await client.delete(f"/api/v1/me/sessions/{laptop_session['id']}", headers=bearer(stranger["token"]))
    assert foreign.status == 404
    revoked = await client.delete(f"/api/v1/me/sessions/{laptop_session['id']}", headers=bearer(me["token"]))
    assert revoked.status == 200
    assert await sock.wait_for("signed_out") == {"reason": "revoked"}
    assert (await client.get("/api/v1/me", headers=bearer(laptop["data"]["token"]))).status == 401
    listed = (await (await client.get("/api/v1/me/sessions", headers=bearer(me["token"]))).json())["data"]["sessions"]
    assert [session["current"] for session in listed] == [True]
    again = await client.delete(f"/api/v1/me/sessions/{laptop_session['id']}", headers=bearer(me["token"]))
    assert again.status == 404


async def test_admins_list_and_search_users_and_registrations(client, db):
    admin = await register(client, f"root{uuid.uuid4().hex[:6]}")
    await make_admin(db, admin["user"])
    people = [await register(client, f"zed_{index}_{uuid.uuid4().hex[:4]}") for index in range(3)]
    assert (await client.get("/api/v1/admin/users", headers=bearer(people[0]["token"]))).status == 403

    found = await client.get("/api/v1/admin/users", params={"q": "ZED_", "limit": "2"}, headers=bearer(admin["token"]))
    page = (await found.json())["data"]
    assert found.status == 200 and len(page["users"]) == 2 and page["next_cursor"]
    rest = await client.get("/api/v1/admin/users", params={"q": "zed_", "cursor": page["next_cursor"]},
                            headers=bearer(admin["token"]))
    names = [user["username"] for user in page["users"] + (await rest.json())["data"]["users"]]
    assert sorted(names) == sorted(person["user"]["username"] for person in people)
    by_email = await client.get("/api/v1/admin/users", params={"q": people[1]["user"]["email"][:12]},
                                headers=bearer(admin["token"]))
    assert [user["id"] for user in (await by_email.json())["data"]["users"]] == [people[1]["user"]["id"]]
    # A LIKE wildcard in q is a literal character.
    assert (await (await client.get("/api/v1/admin/users", params={"q": "%"}, headers=bearer(admin["token"])))
            .json())["data"]["users"] == []
    assert (await client.get("/api/v1/admin/users", params={"cursor": "junk"},
                             headers=bearer(admin["token"]))).status == 400

    first = await client.get("/api/v1/admin/registrations", params={"limit": "3"}, headers=bearer(admin["token"]))
    data = (await first.json())["data"]
    assert [row["username"] for row in data["registrations"]] == [p["user"]["username"] for p in people[::-1]]
    older = await client.get("/api/v1/admin/registrations", params={"before": str(data["next_before"])},
                             headers=bearer(admin["token"]))
    assert [row["username"] for row in (await older.json())["data"]["registrations"]] == [admin["user"]["username"]]


async def test_a_suspended_user_is_signed_out_everywhere_and_kept_out(aiohttp_client, settings, redis_url, sockets,
                                                                      db):
    shared = settings.replace(redis_url=redis_url, redis_prefix=f"t{uuid.uuid4().hex[:12]}:")
    node_a = await aiohttp_client(create_app(shared))
    node_b = await aiohttp_client(create_app(shared))
    admin = await register(node_a)
    await make_admin(db, admin["user"])
    victim = await register(node_a)
    sock = sockets()
    await sock.connect(server_url(node_b), "/purchases", token=victim["token"])
    assert (await node_b.get("/api/v1/me", headers=bearer(victim["token"]))).status == 200

    suspended = await node_a.post(f"/api/v1/admin/users/{victim['user']['id']}/suspend",
                                  json={"reason": "fraudulent listings"}, headers=bearer(admin["token"]))
    body = (await suspended.json())["data"]
    assert suspended.status == 200 and body["user"]["suspended"] and body["sessions_ended"] == 1
    assert await sock.wait_for("signed_out") == {"reason": "suspended"}
    await wait_until(lambda: "/purchases" not in sock.sio.namespaces)
    assert (await node_b.get("/api/v1/me", headers=bearer(victim["token"]))).status == 401
    refreshed = await node_a.post("/api/v1/auth/refresh", json={"refresh_token": victim["refresh_token"]})
    assert refreshed.status == 401
    status, refused = await login(node_a, victim["user"]["username"])
    assert status == 403 and "suspended" in refused["error"]["message"]
    assert (await login(node_a, victim["user"]["username"], "wrong password"))[0] == 401  # says nothing more
    reset = await node_a.post("/api/v1/auth/password-reset", json={"email": victim["user"]["email"]})
    assert reset.status == 202 and await db.fetchval("SELECT count(*) FROM mail_outbox") == 0

    lifted = await node_a.post(f"/api/v1/admin/users/{victim['user']['id']}/unsuspend", headers=bearer(admin["token"]))
    assert lifted.status == 200 and not (await lifted.json())["data"]["user"]["suspended"]
    assert (await login(node_a, victim["user"]["username"]))[0] == 200
    actions = await db.fetch("SELECT admin_user_id, action, reason FROM admin_actions ORDER BY action_id")
    assert [(str(row["admin_user_id"]), row["action"], row["reason"]) for row in actions] == [
        (admin["user"]["id"], "suspend", "fraudulent listings"), (admin["user"]["id"], "unsuspend", None)]


async def test_the_last_administrator_stays(client, db):
    first = await register(client)
    await make_admin(db, first["user"])
    second = await register(client)
    headers = bearer(first["token"])
    me_url = f"/api/v1/admin/users/{first['user']['id']}"
    alone = await client.delete(f"{me_url}/admin", headers=headers)
    assert alone.status == 409 and "last administrator" in (await alone.json())["error"]["message"]
    self_suspend = await client.post(f"{me_url}/suspend", json={"reason": "oops"}, headers=headers)
    assert self_suspend.status == 409 and "last administrator" in (await self_suspend.json())["error"]["message"]
    assert (await client.post(f"/api/v1/admin/users/{uuid.uuid4()}/admin", headers=headers)).status == 404

    granted = await client.post(f"/api/v1/admin/users/{second['user']['id']}/admin", headers=headers)
    assert granted.status == 200 and (await granted.json())["data"]["user"]["is_admin"]
    # The second administrator's session sees the role once its cached check lapses (or at once after
    # a fresh sign-in).
    status, second_login = await login(client, second["user"]["username"])
    assert (await client.delete(f"{me_url}/admin", headers=bearer(second_login["data"]["token"]))).status == 200
    second_url = f"/api/v1/admin/users/{second['user']['id']}/admin"
    last = await client.delete(second_url, headers=bearer(second_login["data"]["token"]))
    assert last.status == 409
    assert await db.fetchval("SELECT count(*) FROM admin") == 1


async def test_without_smtp_mail_is_a_log_line(client, db, capsys):
    me = await register(client)
    reply = await client.post("/api/v1/auth/password-reset", json={"email": me["user"]["email"]})
    assert reply.status == 202
    await wait_until(lambda: db.fetchval("SELECT sent_at IS NOT NULL FROM mail_outbox"))
    logged = capsys.readouterr().out
    assert "mail_sent_dev" in logged and me["user"]["email"] in logged and "/reset-password.html#token=" in logged


@pytest.mark.parametrize("env, name", [
    ({"SMTP_URL": "http://mail.example"}, "SMTP_URL"), ({"PUBLIC_URL": "ftp://hub.example"}, "PUBLIC_URL"),
    ({"PASSWORD_RESET_TTL": "5"}, "PASSWORD_RESET_TTL"),
    ({"PASSWORD_RESETS_PER_EMAIL": "x"}, "PASSWORD_RESETS_PER_EMAIL"),
])
def test_mail_settings_are_checked_at_start(env, name):
    with pytest.raises(ValueError, match=name):
        Settings.from_env(env)
