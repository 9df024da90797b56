"""The buyer's side, on the real server and database: signed download links (Range resume, expiry,
wrong user, one log row per link), the purchase history's fields and filters, review edit and delete."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import time
import uuid
from decimal import Decimal

import pytest

from server.adapters.blobs import BLOBS
from server.app import create_app
from server.core.crypto import MASTER_KEY
from tests.helpers import register, server_url, wait_until
from tests.test_purchases import DATASET, auth, buy, make_admin, make_pod, people, received, settle, wallet_of

pytestmark = pytest.mark.usefixtures("chain_verified")

SIZE = len(DATASET)
ETAG = f'"{hashlib.sha256(DATASET).hexdigest()}"'


@pytest.fixture
async def hub(fast, aiohttp_client):
    """The real app (worker included) on this test's database (`fast` first: it outlives the app)."""
    return await aiohttp_client(create_app(fast))


async def link_for(hub, user: dict, purchase_id: str) -> str:
    response = await hub.post(f"/api/v1/purchases/{purchase_id}/download-link", headers=auth(user))
    body = await response.json()
    assert response.status == 201, body
    return body["data"]["url"]


async def logs(db, purchase_id: str) -> int:
    return await db.fetchval("SELECT count(*) FROM download_logs WHERE purchase_id = $1", uuid.UUID(purchase_id))


async def test_a_link_serves_the_file_resumably_and_is_logged_once(hub, db):
    seller, buyer, seller_id, buyer_id, pod = await people(hub, db)
    purchase_id = await buy(hub, db, buyer, buyer_id, seller_id, pod)
    before = time.time()
    response = await hub.post(f"/api/v1/purchases/{purchase_id}/download-link", headers=auth(buyer))
    body = (await response.json())["data"]
    assert response.status == 201 and body["purchase_id"] == purchase_id
    assert body["url"].startswith("/api/v1/downloads/")
    expires = dt.datetime.fromisoformat(body["expires_at"]).timestamp()
    assert before + 3600 - 2 <= expires <= time.time() + 3600
    url = body["url"]

    # The whole file, with no Authorization header.
    whole = await hub.get(url)
    assert whole.status == 200 and await whole.read() == DATASET
    assert whole.headers["Accept-Ranges"] == "bytes" and whole.headers["ETag"] == ETAG
    assert int(whole.headers["Content-Length"]) == SIZE and "Content-Range" not in whole.headers
    assert whole.headers["Content-Disposition"] == 'attachment; filename="Weather-Berlin-Lagos.csv"'
    assert whole.headers["Referrer-Policy"] == "no-referrer"

    # Resume from N, a middle slice, the last bytes; each a 206 with its Content-Range.
    start, middle = SIZE - 70_001, (123_457, 200_000)
    for header, first, last in ((f"bytes={start}-", start, SIZE - 1),
                                (f"bytes={middle[0]}-{middle[1]}", *middle),
                                ("bytes=-100", SIZE - 100, SIZE - 1),
                                (f"bytes=5-{SIZE * 2}", 5, SIZE - 1)):
        part = await hub.get(url, headers={"Range": header})
        assert part.status == 206, header
        assert part.headers["Content-Range"] == f"bytes {first}-{last}/{SIZE}"
        assert int(part.headers["Content-Length"]) == last - first + 1
        assert await part.read() == DATASET[first:last + 1]
    # If-Range: the same version resumes; another version gets the whole file again.
    same = await hub.get(url, headers={"Range": "bytes=10-19", "If-Range": ETAG})
    assert same.status == 206 and await same.read() == DATASET[10:20]
    other = await hub.get(url, headers={"Range": "bytes=10-19", "If-Range": '"something-else"'})
    assert other.status == 200 and await other.read() == DATASET
    # Several ranges, or a malformed header: the whole file (documented). Past the end: 416.
    for header in ("bytes=0-1,5-6", "bytes=9-3", "items=0-5"):
        full = await hub.get(url, headers={"Range": header})
        assert full.status == 200 and len(await full.read()) == SIZE, header
    for header in (f"bytes={SIZE}-", "bytes=-0"):
        refused = await hub.get(url, headers={"Range": header})
        assert refused.status == 416 and refused.headers["Content-Range"] == f"bytes */{SIZE}"
        assert (await refused.json())["error"]["code"] == "invalid_payload"
    head = await hub.head(url)
    assert head.status == 200 and int(head.headers["Content-Length"]) == SIZE

    # One row for this link, however often it was used from byte 0 or resumed.
    assert await logs(db, purchase_id) == 1
    second = await link_for(hub, buyer, purchase_id)
    assert (await hub.get(second, headers={"Range": "bytes=100-"})).status == 206
    assert await logs(db, purchase_id) == 1  # a resume alone is not a new download
    assert (await (await hub.get(second)).read()) == DATASET
    assert await logs(db, purchase_id) == 2


async def test_links_are_bound_to_their_buyer_purchase_and_kind(hub, db):
    seller, buyer, seller_id, buyer_id, pod = await people(hub, db)
    purchase_id = await buy(hub, db, buyer, buyer_id, seller_id, pod)
    stranger = await register(hub)
    # Nobody else may make a link for it (its existence is not revealed); nor for an unknown purchase.
    for user in (stranger, seller):
        response = await hub.post(f"/api/v1/purchases/{purchase_id}/download-link", headers=auth(user))
        assert response.status == 404 and (await response.json())["error"]["code"] == "not_found"
    assert (await hub.post(f"/api/v1/purchases/{uuid.uuid4()}/download-link", headers=auth(buyer))).status == 404
    assert (await hub.post(f"/api/v1/purchases/{purchase_id}/download-link")).status == 401
    admin = await make_admin(hub, db)
    assert (await hub.post(f"/api/v1/purchases/{purchase_id}/download-link", headers=auth(admin))).status == 403

    url = await link_for(hub, buyer, purchase_id)
    token = url.rsplit("/", 1)[1]
    # A bearer link: someone else holding it (with their own token) gets exactly that purchase's file.
    shared = await hub.get(url, headers=auth(stranger))
    assert shared.status == 200 and await shared.read() == DATASET
    # Wrong or tampered tokens, and an access token used as a link, are refused with the envelope.
    header, payload, signature = token.split(".")
    forged = f"{header}.{payload}.{signature[:-2]}{'AA' if signature[-2:] != 'AA' else 'BB'}"
    for bad in ("nonsense-token-nonsense", forged, buyer["token"], "x" * 1500):
        refused = await hub.get(f"/api/v1/downloads/{bad}")
        body = await refused.json()
        assert refused.status == 401 and body["error"]["code"] == "unauthorized", bad[:30]
        assert "Content-Disposition" not in refused.headers
    # ...and a link is not an access token.
    assert (await hub.get("/api/v1/purchases", headers={"Authorization": f"Bearer {token}"})).status == 401

    # Re-checked at use: a refunded purchase's link stops working.
    refund = await hub.post(f"/api/v1/admin/purchases/{purchase_id}/refund", json={}, headers=auth(admin))
    assert refund.status == 200
    stopped = await hub.get(url)
    assert stopped.status == 409 and (await stopped.json())["error"]["code"] == "conflict"
    await settle(hub, db)


async def test_a_link_ends_with_its_session(hub, db):
    seller, buyer, seller_id, buyer_id, pod = await people(hub, db)
    purchase_id = await buy(hub, db, buyer, buyer_id, seller_id, pod)
    url = await link_for(hub, buyer, purchase_id)
    assert (await hub.post("/api/v1/auth/logout", headers=auth(buyer))).status == 200
    ended = await hub.get(url)
    assert ended.status == 401 and "session" in (await ended.json())["error"]["message"]


async def test_an_expired_link_is_refused(fast, aiohttp_client, db):
    hub = await aiohttp_client(create_app(fast.replace(download_link_ttl=1)))
    seller, buyer, seller_id, buyer_id, pod = await people(hub, db)
    purchase_id = await buy(hub, db, buyer, buyer_id, seller_id, pod)
    url = await link_for(hub, buyer, purchase_id)
    await asyncio.sleep(2.1)
    expired = await hub.get(url)
    body = await expired.json()
    assert expired.status == 401 and "expired" in body["error"]["message"]
    assert await logs(db, purchase_id) == 0


async def test_purchase_history_fields_filters_and_paging(hub, db):
    seller, buyer, seller_id, buyer_id, pod = await people(hub, db)
    second_pod = await make_pod(db, hub.app[BLOBS], hub.app[MASTER_KEY], seller_id, title="Tides")
    await db.execute("UPDATE datapods SET category = 'ocean' WHERE id = $1", second_pod)
    await db.execute("UPDATE users SET name = 'Ada Seller' WHERE id = $1", seller_id)
    first = await buy(hub, db, buyer, buyer_id, seller_id, pod)
    second = await buy(hub, db, buyer, buyer_id, seller_id, second_pod)
    await hub.post(f"/api/v1/purchases/{first}/review", json={"rating": 4, "comment": "tidy"}, headers=auth(buyer))
    digest = await db.fetchval("SELECT payment_tx_digest FROM purchases WHERE id = $1", uuid.UUID(first))

    body = await (await hub.get("/api/v1/purchases", headers=auth(buyer))).json()
    items = {p["id"]: p for p in body["data"]["items"]}
    assert list(items) == [second, first]  # newest first
    one = items[first]
    assert one["category"] == "climate" and one["seller_name"] == "Ada Seller"
    assert one["datapod_rating"] == "4.00" and one["review"]["rating"] == 4 and one["review"]["comment"] == "tidy"
    assert one["price_paid"] == "1.500000000" and one["payment_tx_digest"] == digest
    assert one["escrow_status"] == "holding" and one["escrow_settled"] is False and one["reviewed"] is True
    assert items[second]["review"] is None and items[second]["category"] == "ocean"

    async def ids(query: str, user: dict = buyer) -> list[str]:
        response = await hub.get(f"/api/v1/purchases?{query}", headers=auth(user))
        assert response.status == 200, await response.text()
        return [p["id"] for p in (await response.json())["data"]["items"]]

    assert await ids("category=ocean") == [second]
    assert await ids("status=completed&category=climate") == [first]
    assert await ids(f"datapod_id={pod}") == [first]
    created = await db.fetchval("SELECT created_at FROM purchases WHERE id = $1", uuid.UUID(second))
    at = created.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert await ids(f"from={at}") == [second] and await ids(f"to={at}") == [first]
    assert await ids("from=2000-01-01&to=2000-01-02") == []
    assert (await hub.get("/api/v1/purchases?from=yesterday", headers=auth(buyer))).status == 400
    # Keyset paging walks both, once each.
    page = (await (await hub.get("/api/v1/purchases?limit=1", headers=auth(buyer))).json())["data"]
    rest = await ids(f"limit=1&cursor={page['next_cursor']}")
    assert [page["items"][0]["id"], *rest] == [second, first]
    # Only the caller's purchases.
    assert await ids("", await register(hub)) == []
    # Settled once the buyer confirms and the payout to the seller's wallet is sealed.
    await wallet_of(db, seller_id)
    assert (await hub.post(f"/api/v1/purchases/{first}/confirm", headers=auth(buyer))).status == 200
    await settle(hub, db)
    settled = (await (await hub.get(f"/api/v1/purchases/{first}", headers=auth(buyer))).json())["data"]
    assert settled["escrow_status"] == "released" and settled["escrow_settled"] is True


async def test_review_edit_and_delete_move_the_averages(hub, db, sockets):
    seller, buyer, seller_id, buyer_id, pod = await people(hub, db)
    buyer2 = await register(hub)
    watcher = sockets()
    await watcher.connect(server_url(hub), "/marketplace")
    await watcher.call("/marketplace", "subscribe", {"channel": f"datapod:{pod}"})
    first = await buy(hub, db, buyer, buyer_id, seller_id, pod)
    second = await buy(hub, db, buyer2, uuid.UUID(buyer2["user"]["id"]), seller_id, pod)
    url, url2 = f"/api/v1/purchases/{first}/review", f"/api/v1/purchases/{second}/review"
    assert (await hub.patch(url, json={"rating": 3}, headers=auth(buyer))).status == 404  # nothing to edit yet
    await hub.post(url, json={"rating": 4, "comment": "good"}, headers=auth(buyer))
    await hub.post(url2, json={"rating": 2}, headers=auth(buyer2))

    async def averages() -> tuple[Decimal, Decimal]:
        return (await db.fetchval("SELECT average_rating FROM datapods WHERE id = $1", pod),
                await db.fetchval("SELECT average_rating FROM users WHERE id = $1", seller_id))
    assert await averages() == (Decimal("3.00"), Decimal("3.00"))

    for bad in ({}, {"rating": 0}, {"rating": 6}, {"comment": "x" * 2001}, {"other": 1}):
        assert (await hub.patch(url, json=bad, headers=auth(buyer))).status == 400, bad
    # Only its own author edits or deletes a review.
    assert (await hub.patch(url, json={"rating": 1}, headers=auth(buyer2))).status == 404
    assert (await hub.delete(url, headers=auth(seller))).status == 404
    edited = await hub.patch(url, json={"rating": 5}, headers=auth(buyer))
    body = (await edited.json())["data"]
    assert edited.status == 200 and body["rating"] == 5 and body["comment"] == "good"
    assert body["average_rating"] == "3.50" and await averages() == (Decimal("3.50"), Decimal("3.50"))
    cleared = (await (await hub.patch(url, json={"comment": None}, headers=auth(buyer))).json())["data"]
    assert cleared["rating"] == 5 and cleared["comment"] is None

    removed = await hub.delete(url2, headers=auth(buyer2))
    assert removed.status == 200
    assert (await removed.json())["data"] == {"purchase_id": second, "datapod_id": str(pod), "deleted": True,
                                              "average_rating": "5.00", "review_count": 1}
    assert await averages() == (Decimal("5.00"), Decimal("5.00"))
    assert (await hub.delete(url2, headers=auth(buyer2))).status == 404
    assert (await hub.delete(url, headers=auth(buyer))).status == 200
    assert await averages() == (Decimal("0.00"), Decimal("0.00"))
    # Deleted, it may be written again.
    assert (await hub.post(url, json={"rating": 2}, headers=auth(buyer))).status == 201
    history = (await (await hub.get(f"/api/v1/purchases/{first}", headers=auth(buyer))).json())["data"]
    assert history["review"]["rating"] == 2 and history["datapod_rating"] == "2.00"

    async def announced():
        return len(received(watcher, "review_removed")) == 2 and len(received(watcher, "review_updated")) == 2
    await wait_until(announced)
    updated = [e["data"] for e in received(watcher, "review_updated")]
    assert updated[0] == {"datapod_id": str(pod), "rating": 5, "previous_rating": 4, "average_rating": "3.50",
                          "review_count": 2}
    gone = [e["data"] for e in received(watcher, "review_removed")]
    assert gone[0] == {"datapod_id": str(pod), "rating": 2, "average_rating": "5.00", "review_count": 1}
    assert gone[1]["average_rating"] == "0.00" and gone[1]["review_count"] == 0
