"""KYC end to end against real PostgreSQL and real sockets: document submissions checked by content
and size and stored encrypted, one pending submission per user, administrators' decisions taken
once and announced live on user:{id}, the verified-only gate on publishing DataPods."""

from __future__ import annotations

import asyncio
import io
import uuid
from pathlib import Path

import aiohttp
import pytest

from server.adapters.blobs import LocalBlobStore
from server.app import create_app
from server.core.crypto import MASTER_KEY, decrypt_dataset, unwrap_key
from server.core.errors import InvalidPayload
from server.edge.rest import FORM_OVERHEAD_BYTES
from server.services import kyc
from server.services.demo import load_if_empty
from tests.helpers import register, server_url
from tests.test_chain import admin_token, bearer, call
from tests.test_marketplace import upload

MARKER = b"PASSPORT-NO-X1234567-JANE-DOE;"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + MARKER * 40
PDF = b"%PDF-1.7\n" + MARKER * 40 + b"\n%%EOF\n"
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + MARKER * 40


def form(data: bytes | None = PNG, document_type: str | None = "passport", filename: str = "scan.png",
         content_type: str = "image/png", **extra: str) -> aiohttp.FormData:
    body = aiohttp.FormData()
    if document_type is not None:
        body.add_field("document_type", document_type)
    for name, value in extra.items():
        body.add_field(name, value)
    if data is not None:
        body.add_field("file", io.BytesIO(data), filename=filename, content_type=content_type)
    return body


async def submit(client, token: str, **kwargs) -> tuple[int, dict]:
    response = await client.post("/api/v1/me/kyc", data=form(**kwargs), headers=bearer(token))
    return response.status, await response.json()


async def submitted(client, token: str, **kwargs) -> dict:
    status, body = await submit(client, token, **kwargs)
    assert status == 201, body
    return body["data"]


def blob_files(data_dir: Path) -> list[Path]:
    root = data_dir / "blobs"
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


async def nothing_stored(db, data_dir: Path) -> bool:
    return (await db.fetchval("SELECT count(*) FROM kyc_submissions") == 0
            and blob_files(data_dir) == [])


async def events_queued(db) -> int:
    """How many events were ever queued (the relay deletes what it publishes, the id sequence stays)."""
    return await db.fetchval("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM event_outbox_id_seq")


# --- submissions ------------------------------------------------------------------------------


@pytest.mark.parametrize("data, media_type", [(PNG, "image/png"), (PDF, "application/pdf"), (JPEG, "image/jpeg")])
async def test_document_is_recognised_by_content_and_stored_encrypted(client, db, settings, data, media_type):
    user, admin = await register(client), await admin_token(client, db)
    # The name and declared type say nothing: the first bytes decide.
    item = await submitted(client, user["token"], data=data, filename="whatever.bin",
                           content_type="application/octet-stream", document_type="id_card")
    assert (item["status"], item["document_type"], item["media_type"], item["size"]) == \
        ("Pending", "id_card", media_type, len(data))
    assert item["user"]["id"] == user["user"]["id"] and item["remarks"] is None

    [blob] = blob_files(settings.data_dir)
    stored = blob.read_bytes()
    assert MARKER not in stored and data[:8] not in stored and len(stored) == len(data) + 16  # GCM tag
    row = await db.fetchrow("SELECT document_path, document_key, document_iv FROM kyc_submissions WHERE kyc_id = $1",
                            item["id"])
    assert row["document_path"] == blob.name and len(row["document_iv"]) == 24
    # The key is stored only wrapped under MASTER_KEY, bound to the submission.
    aad = f"kyc:{item['id']}".encode()
    key = unwrap_key(client.app[MASTER_KEY], row["document_key"], aad)
    assert key.hex() not in row["document_key"]
    assert decrypt_dataset(stored, key, bytes.fromhex(row["document_iv"]), aad) == data

    response = await client.get(f"/api/v1/admin/kyc/{item['id']}/document", headers=bearer(admin))
    assert response.status == 200 and await response.read() == data
    assert response.headers["Content-Type"] == media_type
    assert response.headers["Cache-Control"] == "no-store"
    assert f"kyc-{item['id']}." in response.headers["Content-Disposition"]


@pytest.mark.parametrize("kwargs, field", [
    ({"data": b"GIF89a" + MARKER, "filename": "scan.png", "content_type": "image/png"}, "file"),  # lies about itself
    ({"data": b"plain text, not a document", "filename": "scan.pdf", "content_type": "application/pdf"}, "file"),
    ({"data": b""}, "file"),
    ({"data": None}, "file"),
    ({"document_type": "selfie"}, "document_type"),
    ({"document_type": "PASSPORT "}, "document_type"),
    ({"document_type": None}, "document_type"),
    ({"nationality": "xx"}, "nationality"),
])
async def test_bad_submission_names_the_field_and_stores_nothing(client, db, settings, kwargs, field):
    user = await register(client)
    status, body = await submit(client, user["token"], **kwargs)
    assert (status, body["error"]["code"], body["error"]["field"]) == (400, "invalid_payload", field), body
    assert await nothing_stored(db, settings.data_dir)
    assert (await db.fetchval("SELECT kyc_status FROM users WHERE id = $1", uuid.UUID(user["user"]["id"]))) == "Pending"


async def test_submission_needs_a_multipart_body_and_a_signed_in_user(client, db, settings):
    user = await register(client)
    response = await client.post("/api/v1/me/kyc", json={"document_type": "passport"}, headers=bearer(user["token"]))
    assert response.status == 400 and (await response.json())["error"]["field"] == "file"
    response = await client.post("/api/v1/me/kyc", data=form())
    assert response.status == 401
    assert await nothing_stored(db, settings.data_dir)


@pytest.mark.parametrize("extra", [1, FORM_OVERHEAD_BYTES + 10])  # caught while reading / by Content-Length
async def test_oversize_document_is_refused_and_nothing_is_stored(aiohttp_client, settings, db, extra):
    limit = 4096
    client = await aiohttp_client(create_app(settings.replace(kyc_max_bytes=limit)))
    user = await register(client)
    big = PNG[:8] + b"\x00" * (limit - 8 + extra)
    status, body = await submit(client, user["token"], data=big)
    assert (status, body["error"]["code"], body["error"]["field"]) == (413, "payload_too_large", "file")
    assert await nothing_stored(db, settings.data_dir)
    exact = PNG[:8] + b"\x00" * (limit - 8)  # the limit itself is allowed
    assert (await submitted(client, user["token"], data=exact))["size"] == limit


async def test_one_pending_submission_at_a_time(client, db, settings):
    user, admin = await register(client), await admin_token(client, db)
    first = await submitted(client, user["token"])
    status, body = await submit(client, user["token"], data=PDF, document_type="license")
    assert (status, body["error"]["code"], body["error"]["kyc_id"]) == (409, "conflict", first["id"])
    assert await db.fetchval("SELECT count(*) FROM kyc_submissions") == 1 and len(blob_files(settings.data_dir)) == 1

    # Once rejected, the user may try again; once approved, there is nothing more to submit.
    status, _ = await call(client, "POST", f"/api/v1/admin/kyc/{first['id']}/reject", admin,
                           json={"reason": "the scan is blurred"})
    assert status == 200
    second = await submitted(client, user["token"], data=PDF, document_type="license")
    status, mine = await call(client, "GET", "/api/v1/me/kyc", user["token"])
    assert status == 200 and mine["data"]["kyc_status"] == "Pending" and mine["data"]["verified"] is False
    assert [(s["id"], s["status"], s["remarks"]) for s in mine["data"]["submissions"]] == \
        [(second["id"], "Pending", None), (first["id"], "Rejected", "the scan is blurred")]
    status, _ = await call(client, "POST", f"/api/v1/admin/kyc/{second['id']}/approve", admin, json={})
    assert status == 200
    status, body = await submit(client, user["token"], data=JPEG)
    assert (status, body["error"]["field"]) == (409, "kyc_status")
    assert await db.fetchval("SELECT count(*) FROM kyc_submissions") == 2


async def test_concurrent_submissions_leave_one_pending(client, db):
    user = await register(client)
    results = await asyncio.gather(*(submit(client, user["token"]) for _ in range(4)))
    assert sorted(status for status, _ in results) == [201, 409, 409, 409]
    assert await db.fetchval("SELECT count(*) FROM kyc_submissions WHERE status = 'Pending'") == 1


# --- administrators' decisions ----------------------------------------------------------------


async def test_approval_updates_the_user_and_tells_them_live(client, db, sockets):
    user, admin = await register(client), await admin_token(client, db)
    user_id = user["user"]["id"]
    item = await submitted(client, user["token"])
    sock = sockets()
    await sock.connect(server_url(client), "/purchases", user["token"])
    assert (await sock.call("/purchases", "subscribe", {"channel": f"user:{user_id}"}))["ok"]

    status, queue = await call(client, "GET", "/api/v1/admin/kyc?status=Pending", admin)
    assert status == 200 and [s["id"] for s in queue["data"]["submissions"]] == [item["id"]]
    assert queue["data"]["submissions"][0]["user"]["username"] == user["user"]["username"]

    status, body = await call(client, "POST", f"/api/v1/admin/kyc/{item['id']}/approve", admin,
                              json={"reason": "matches the account"})
    assert status == 200, body
    admin_id = await db.fetchval("SELECT admin_id FROM admin")
    assert (body["data"]["status"], body["data"]["reviewed_by"], body["data"]["remarks"]) == \
        ("Approved", admin_id, "matches the account")

    event = await sock.wait_for(kyc.STATUS_CHANGED)
    assert event["channel"] == f"user:{user_id}"
    assert (event["data"]["kyc_status"], event["data"]["kyc_id"], event["data"]["remarks"]) == \
        ("Approved", item["id"], "matches the account")
    assert event["data"]["decided_at"] == body["data"]["decided_at"]

    status, mine = await call(client, "GET", "/api/v1/me/kyc", user["token"])
    assert (mine["data"]["kyc_status"], mine["data"]["verified"]) == ("Approved", True)
    status, me = await call(client, "GET", "/api/v1/me", user["token"])
    assert status == 200 and me["data"]["kyc_status"] == "Approved"
    row = await db.fetchrow("SELECT admin_id, user_id, status FROM kyc_approvals WHERE kyc_id = $1", item["id"])
    assert (row["admin_id"], str(row["user_id"]), row["status"]) == (admin_id, user_id, "Approved")
    status, queue = await call(client, "GET", "/api/v1/admin/kyc", admin)
    assert queue["data"]["submissions"] == []
    status, queue = await call(client, "GET", "/api/v1/admin/kyc?status=Approved", admin)
    assert [s["id"] for s in queue["data"]["submissions"]] == [item["id"]]


async def test_rejection_tells_the_user_why(client, db, sockets):
    user, admin = await register(client), await admin_token(client, db)
    item = await submitted(client, user["token"])
    sock = sockets()
    await sock.connect(server_url(client), "/purchases", user["token"])
    assert (await sock.call("/purchases", "subscribe", {"channel": f"user:{user['user']['id']}"}))["ok"]
    url = f"/api/v1/admin/kyc/{item['id']}/reject"
    for body in ({}, {"reason": "   "}, {"reason": "x" * 1001}):
        status, answer = await call(client, "POST", url, admin, json=body)
        assert (status, answer["error"]["field"]) == (400, "reason"), answer
    status, answer = await call(client, "POST", url, admin, json={"reason": "the document has expired"})
    assert status == 200 and answer["data"]["status"] == "Rejected"
    event = await sock.wait_for(kyc.STATUS_CHANGED)
    assert (event["data"]["kyc_status"], event["data"]["remarks"]) == ("Rejected", "the document has expired")
    assert await db.fetchval("SELECT kyc_status FROM users WHERE id = $1", uuid.UUID(user["user"]["id"])) == "Rejected"


async def test_non_admins_are_refused_and_nothing_changes(client, db):
    user, other = await register(client), await register(client)
    item = await submitted(client, user["token"])
    base = f"/api/v1/admin/kyc/{item['id']}"
    for method, path, body in (("POST", f"{base}/approve", {}), ("POST", f"{base}/reject", {"reason": "no"}),
                               ("GET", f"{base}/document", None), ("GET", "/api/v1/admin/kyc", None)):
        for token in (user["token"], other["token"]):   # the owner may not approve themselves either
            status, answer = await call(client, method, path, token, json=body)
            assert (status, answer["error"]["code"]) == (403, "forbidden"), (path, answer)
        status, _ = await call(client, method, path, json=body)
        assert status == 401
    assert await db.fetchval("SELECT count(*) FROM kyc_approvals") == 0
    assert await db.fetchval("SELECT status FROM kyc_submissions") == "Pending"
    assert await db.fetchval("SELECT kyc_status FROM users WHERE id = $1", uuid.UUID(user["user"]["id"])) == "Pending"


async def test_a_submission_is_decided_once(client, db):
    user = await register(client)
    first_admin, second_admin = await admin_token(client, db), await admin_token(client, db)
    item = await submitted(client, user["token"])
    queued_before = await events_queued(db)
    base = f"/api/v1/admin/kyc/{item['id']}"
    # Two administrators at once: the row lock lets one decide, the other finds it decided.
    results = await asyncio.gather(call(client, "POST", f"{base}/approve", first_admin, json={}),
                                   call(client, "POST", f"{base}/reject", second_admin, json={"reason": "fake"}))
    assert sorted(status for status, _ in results) == [200, 409]
    decided = next(answer for status, answer in results if status == 200)["data"]["status"]
    for path, body in ((f"{base}/approve", {}), (f"{base}/reject", {"reason": "changed my mind"})):
        status, answer = await call(client, "POST", path, first_admin, json=body)
        assert (status, answer["error"]["code"], answer["error"]["status"]) == (409, "conflict", decided)
    assert await db.fetchval("SELECT count(*) FROM kyc_approvals") == 1
    assert await db.fetchval("SELECT kyc_status FROM users WHERE id = $1", uuid.UUID(user["user"]["id"])) == decided
    assert await events_queued(db) == queued_before + 1
    for path in ("/api/v1/admin/kyc/999999/approve", "/api/v1/admin/kyc/abc/approve"):
        status, answer = await call(client, "POST", path, first_admin, json={})
        assert (status, answer["error"]["code"]) == (404, "not_found")


async def test_an_admin_does_not_decide_their_own_submission(client, db):
    admin = await admin_token(client, db)
    item = await submitted(client, admin)
    status, answer = await call(client, "POST", f"/api/v1/admin/kyc/{item['id']}/approve", admin, json={})
    assert (status, answer["error"]["code"]) == (403, "forbidden")
    assert await db.fetchval("SELECT status FROM kyc_submissions") == "Pending"


async def test_a_tampered_document_is_not_served(client, db, settings):
    user, admin = await register(client), await admin_token(client, db)
    item = await submitted(client, user["token"])
    [blob] = blob_files(settings.data_dir)
    stored = bytearray(blob.read_bytes())
    stored[20] ^= 1
    blob.write_bytes(bytes(stored))
    status, answer = await call(client, "GET", f"/api/v1/admin/kyc/{item['id']}/document", admin)
    assert (status, answer["error"]["code"]) == (500, "internal_error")
    assert MARKER.decode() not in str(answer)


# --- privacy ----------------------------------------------------------------------------------


async def test_users_see_only_their_own_submissions(client, db):
    alice, bob = await register(client), await register(client)
    mine = await submitted(client, alice["token"])
    status, theirs = await call(client, "GET", "/api/v1/me/kyc", bob["token"])
    assert status == 200 and theirs["data"] == {"kyc_status": "Pending", "verified": False, "submissions": []}
    status, own = await call(client, "GET", "/api/v1/me/kyc", alice["token"])
    assert [s["id"] for s in own["data"]["submissions"]] == [mine["id"]]
    status, _ = await call(client, "GET", f"/api/v1/admin/kyc/{mine['id']}/document", bob["token"])
    assert status == 403
    status, _ = await call(client, "GET", "/api/v1/me/kyc")
    assert status == 401
    # Nor does anyone else hear about it: bob may not watch alice's channel.
    answer = await call(client, "GET", f"/api/v1/events?channel=user:{alice['user']['id']}", bob["token"])
    assert answer[0] == 403


# --- the verified-only gate -------------------------------------------------------------------


async def test_publishing_a_datapod_needs_an_approved_kyc(client, db):
    seller, admin = await register(client), await admin_token(client, db)
    pod = await upload(client, seller)   # a draft is private: no KYC needed
    publish = f"/api/v1/datapods/{pod['id']}/publish"
    status, answer = await call(client, "POST", publish, seller["token"])
    assert (status, answer["error"]["code"], answer["error"]["kyc_status"]) == (403, "kyc_required", "Pending")
    assert await db.fetchval("SELECT published FROM datapods") is False
    assert await db.fetchval("SELECT count(*) FROM event_outbox WHERE type = 'datapod_published'") == 0

    item = await submitted(client, seller["token"])
    status, answer = await call(client, "POST", publish, seller["token"])
    assert (status, answer["error"]["code"]) == (403, "kyc_required")      # pending is not verified
    assert (await call(client, "POST", f"/api/v1/admin/kyc/{item['id']}/approve", admin, json={}))[0] == 200
    status, answer = await call(client, "POST", publish, seller["token"])
    assert status == 200 and answer["data"]["published"] is True


async def test_demo_sellers_are_verified(client, db, settings):
    assert await load_if_empty(db, settings, client.app[MASTER_KEY]) is True
    rows = await db.fetch("SELECT username, kyc_status FROM users WHERE account_kind = 'person' ORDER BY username")
    assert {r["username"]: r["kyc_status"] for r in rows} == \
        {"alice": "Approved", "bob": "Approved", "carol": "Pending"}


# --- the automatic check in the database ------------------------------------------------------


async def test_accepted_types_pass_the_automatic_check_and_its_rejection_is_announced(db, tmp_path):
    blobs, master_key = LocalBlobStore(tmp_path / "blobs"), b"k" * 32
    for document_type in kyc.DOCUMENT_TYPES:
        user_id = await db.fetchval(
            "INSERT INTO users (username, email, password_hash) VALUES ($1, $2, 'h') RETURNING id",
            document_type, f"{document_type}@example.org")
        item = await kyc.submit(db, blobs, master_key, user_id, document_type=document_type, document=PNG)
        assert item.status == "Pending", document_type
    # A type the API would refuse still meets the database's own check, and the user hears of it.
    other = await db.fetchval("INSERT INTO users (username, email, password_hash) "
                              "VALUES ('other', 'other@example.org', 'h') RETURNING id")
    item = await kyc.submit(db, blobs, master_key, other, document_type="selfie", document=PDF)
    assert item.status == "Rejected" and "'selfie' is not accepted" in item.remarks
    assert await db.fetchval("SELECT kyc_status FROM users WHERE id = $1", other) == "Rejected"
    event = await db.fetchrow("SELECT channel, data FROM event_outbox WHERE type = 'kyc_status_changed'")
    assert event["channel"] == f"user:{other}"
    assert (event["data"]["kyc_status"], event["data"]["kyc_id"]) == ("Rejected", item.id)


def test_media_type_is_read_from_the_first_bytes():
    assert [kyc.media_type_of(d) for d in (PNG, PDF, JPEG)] == ["image/png", "application/pdf", "image/jpeg"]
    for data in (b"", b"%PD", b"\x89PNG", b"GIF89a", b"<html>"):
        with pytest.raises(InvalidPayload, match="PDF, PNG or JPEG"):
            kyc.media_type_of(data)
