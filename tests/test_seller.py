"""The Seller API on the real server and database: figures checked against the rows they summarise,
charts, payouts, editing, new versions served to earlier buyers, deletion, and authorisation."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import uuid
from decimal import Decimal

import aiohttp
import pytest

from server.adapters.blobs import BLOBS
from server.app import create_app
from server.core.crypto import MASTER_KEY
from server.services import delivery
from tests.helpers import register, server_url
from tests.test_purchases import DATASET, auth, buy, keypair, make_pod, people, settle, wallet_of

pytestmark = pytest.mark.usefixtures("chain_verified")

FEE_RATE = Decimal("0.05")
NEW_DATASET = b"city,temp_c,humidity\nBerlin,8.0,71\nLagos,30.2,80\nLima,19.4,77\n"


@pytest.fixture
async def hub(fast, aiohttp_client):
    """The real app (worker included) taking a platform fee, so fees and nets differ."""
    return await aiohttp_client(create_app(fast.replace(platform_fee_rate=str(FEE_RATE))))


async def get(hub, path: str, user: dict | None = None) -> tuple[int, dict]:
    response = await hub.get(path, headers=auth(user) if user else {})
    return response.status, await response.json()


def version_form(data: bytes, filename: str = "weather.csv", content_type: str = "text/csv") -> aiohttp.FormData:
    body = aiohttp.FormData()
    body.add_field("file", io.BytesIO(data), filename=filename, content_type=content_type)
    return body


async def expected_figures(db, pod_ids: list[uuid.UUID]) -> dict:
    """The figures recomputed here from the rows, independently of db/seller.py."""
    purchases = await db.fetch(
        """SELECT p.id, p.status, p.amount_sui, e.amount_sui AS escrow_amount, e.status AS escrow_status,
                  e.fee_amount, e.settled_at
             FROM purchases p LEFT JOIN escrow_transactions e ON e.purchase_id = p.id
            WHERE p.datapod_id = ANY($1::uuid[])""", pod_ids)
    completed = [p for p in purchases if p["status"] == "completed"]
    downloads = await db.fetch("SELECT buyer_id FROM download_logs WHERE datapod_id = ANY($1::uuid[])", pod_ids)
    views = await db.fetchval("SELECT coalesce(sum(views), 0) FROM datapod_views WHERE datapod_id = ANY($1::uuid[])",
                              pod_ids)
    ratings = [r["rating"] for r in await db.fetch("SELECT rating FROM reviews WHERE datapod_id = ANY($1::uuid[])",
                                                   pod_ids)]
    escrows = [p for p in purchases if p["escrow_status"] is not None]

    def total(rows, key):
        return sum((r[key] for r in rows), Decimal(0))

    held = [e for e in escrows if e["escrow_status"] in ("holding", "disputed")]
    released = [e for e in escrows if e["escrow_status"] == "released"]
    refunded = [e for e in escrows if e["escrow_status"] == "refunded"]
    paid = [e for e in released if e["settled_at"] is not None]
    gross, fee = total(completed, "escrow_amount"), total(completed, "fee_amount")
    return {
        "sales": len(completed), "revenue_gross": str(gross), "platform_fee": str(fee), "revenue_net": str(gross - fee),
        "escrow_held_count": len(held), "escrow_held": str(total(held, "escrow_amount")),
        "escrow_released_count": len(released), "escrow_released": str(total(released, "escrow_amount")),
        "escrow_released_unsettled": str(total([e for e in released if e["settled_at"] is None], "escrow_amount")),
        "escrow_refunded_count": len(refunded), "escrow_refunded": str(total(refunded, "escrow_amount")),
        "payouts_count": len(paid),
        "payouts_net": str(sum((e["escrow_amount"] - e["fee_amount"] for e in paid), Decimal(0))),
        "downloads": len(downloads), "unique_downloaders": len({d["buyer_id"] for d in downloads}),
        "views": int(views), "reviews": len(ratings),
        "average_rating": (str((Decimal(sum(ratings)) / len(ratings)).quantize(Decimal("0.01")))
                           if ratings else None),
        "conversion": (str((Decimal(len(completed)) / views).quantize(Decimal("0.0001"))) if views else None),
    }


def as_text(figures: dict) -> dict:
    """Figures with every amount as a Decimal (the JSON carries NUMERIC as strings; scales may differ)."""
    return {key: (Decimal(value) if isinstance(value, str) else value) for key, value in figures.items()}


# --- figures ------------------------------------------------------------------------------------------

async def test_figures_match_the_rows_they_summarise(hub, db):
    seller, buyer1, seller_id, buyer1_id, pod1 = await people(hub, db)
    pod2 = await make_pod(db, hub.app[BLOBS], hub.app[MASTER_KEY], seller_id, title="Second")
    buyer2, buyer3 = await register(hub), await register(hub)
    buyer2_id, buyer3_id = uuid.UUID(buyer2["user"]["id"]), uuid.UUID(buyer3["user"]["id"])

    # Views: anyone's page fetch counts, the seller's own does not.
    for user in (None, buyer1, buyer2, seller):
        assert (await get(hub, f"/api/v1/datapods/{pod1}", user))[0] == 200
    assert (await get(hub, f"/api/v1/datapods/{pod2}", buyer3))[0] == 200
    assert await db.fetchval("SELECT sum(views) FROM datapod_views WHERE datapod_id = $1", pod1) == 3

    p1 = await buy(hub, db, buyer1, buyer1_id, seller_id, pod1)
    p2 = await buy(hub, db, buyer2, buyer2_id, seller_id, pod1)
    p3 = await buy(hub, db, buyer3, buyer3_id, seller_id, pod2)
    for purchase, user in ((p1, buyer1), (p1, buyer1), (p2, buyer2)):
        response = await hub.get(f"/api/v1/purchases/{purchase}/download", headers=auth(user))
        assert response.status == 200 and await response.read() == DATASET
    review = await hub.post(f"/api/v1/purchases/{p1}/review", json={"rating": 4, "comment": "good"},
                            headers=auth(buyer1))
    assert review.status in (200, 201)
    review = await hub.post(f"/api/v1/purchases/{p3}/review", json={"rating": 5}, headers=auth(buyer3))
    assert review.status in (200, 201)
    # One escrow released and paid out (with its fee), one released but not yet paid, one still holding.
    assert (await hub.post(f"/api/v1/purchases/{p1}/confirm", headers=auth(buyer1))).status == 200
    await wallet_of(db, seller_id)  # the payout's destination
    await settle(hub, db)
    assert (await hub.post(f"/api/v1/purchases/{p3}/confirm", headers=auth(buyer3))).status == 200

    status, body = await get(hub, "/api/v1/me/sales", seller)
    assert status == 200
    totals = body["data"]
    expected = await expected_figures(db, [pod1, pod2])
    assert as_text(totals) == as_text(expected)
    # The scenario as the rows say it, so the comparison above is not vacuous.
    fee = (Decimal("1.5") * FEE_RATE).quantize(Decimal("0.00000001"))
    assert totals["sales"] == 3 and Decimal(totals["revenue_gross"]) == Decimal("4.5")
    # The fee is fixed at release: both released escrows carry it, paid out or not.
    assert Decimal(totals["platform_fee"]) == 2 * fee and Decimal(totals["revenue_net"]) == Decimal("4.5") - 2 * fee
    assert totals["escrow_held_count"] == 1 and Decimal(totals["escrow_held"]) == Decimal("1.5")
    assert totals["escrow_released_count"] == 2 and Decimal(totals["escrow_released_unsettled"]) == Decimal("1.5")
    assert totals["payouts_count"] == 1 and Decimal(totals["payouts_net"]) == Decimal("1.5") - fee
    assert (totals["downloads"], totals["unique_downloaders"], totals["views"]) == (3, 2, 4)
    assert totals["conversion"] == "0.7500" and totals["average_rating"] == "4.50"
    assert await db.fetchval("SELECT total_sales FROM users WHERE id = $1", seller_id) == totals["sales"]

    # Per DataPod: each matches its own rows.
    status, body = await get(hub, "/api/v1/me/sales/datapods?limit=1", seller)
    assert status == 200 and len(body["data"]["items"]) == 1 and body["data"]["next_cursor"]
    status, rest = await get(hub, f"/api/v1/me/sales/datapods?cursor={body['data']['next_cursor']}", seller)
    pods = {item["datapod_id"]: item for item in body["data"]["items"] + rest["data"]["items"]}
    assert set(pods) == {str(pod1), str(pod2)} and rest["data"]["next_cursor"] is None
    for pod in (pod1, pod2):
        one = (await get(hub, f"/api/v1/me/sales/datapods/{pod}", seller))[1]["data"]
        assert one == pods[str(pod)] and one["version"] == 1
        figures = {key: one[key] for key in expected}
        assert as_text(figures) == as_text(await expected_figures(db, [pod]))

    # Charts: today's day and week buckets hold everything; every bucket's sum is the total.
    today = dt.datetime.now(dt.timezone.utc).date()
    for bucket in ("day", "week"):
        status, body = await get(hub, f"/api/v1/me/sales/series?bucket={bucket}&from={today - dt.timedelta(days=20)}"
                                      f"&to={today}", seller)
        assert status == 200, body
        items = body["data"]["items"]
        assert len(items) == (21 if bucket == "day" else len({(today - dt.timedelta(days=n)).isocalendar()[:2]
                                                                for n in range(21)}))
        for key in ("sales", "downloads", "views", "reviews"):
            assert sum(item[key] for item in items) == totals[key], key
        for key in ("revenue_gross", "platform_fee", "revenue_net"):
            assert sum(Decimal(item[key]) for item in items) == Decimal(totals[key]), key
        assert sum(Decimal(item["escrow_released"]) for item in items) == Decimal(totals["escrow_released"])
        last = items[-1]
        assert last["cumulative_rating"] == "4.50" and last["average_rating"] == "4.50"
        assert last["unique_downloaders"] == 2 and last["conversion"] == "0.7500"
        assert all(item["sales"] == 0 and item["cumulative_rating"] is None for item in items[:-1])
    one_pod = (await get(hub, f"/api/v1/me/sales/series?datapod_id={pod2}", seller))[1]["data"]
    assert len(one_pod["items"]) == 30 and sum(item["sales"] for item in one_pod["items"]) == 1
    assert (await get(hub, "/api/v1/me/sales/series?from=2020-01-01&to=2026-01-01", seller))[0] == 400
    assert (await get(hub, "/api/v1/me/sales/series?bucket=month", seller))[0] == 400
    assert (await get(hub, f"/api/v1/me/sales/series?from={today}&to={today - dt.timedelta(days=1)}",
                      seller))[0] == 400

    # Payouts: the settled one, with the settlement transfer's hash.
    body = (await get(hub, "/api/v1/me/sales/payouts", seller))[1]["data"]
    row = await db.fetchrow("SELECT * FROM escrow_transactions WHERE purchase_id = $1", uuid.UUID(p1))
    assert [(p["purchase_id"], p["settlement_tx_hash"], Decimal(p["net"])) for p in body["items"]] == [
        (p1, row["settlement_tx_hash"], row["amount_sui"] - row["fee_amount"])]
    assert row["settlement_tx_hash"] and Decimal(body["items"][0]["fee"]) == fee

    # Someone else: their own (empty) figures, never the seller's.
    assert (await get(hub, f"/api/v1/me/sales/datapods/{pod1}", buyer1))[0] == 403
    assert (await get(hub, f"/api/v1/me/sales/series?datapod_id={pod1}", buyer1))[0] == 403
    assert (await get(hub, f"/api/v1/me/sales/datapods/{uuid.uuid4()}", buyer1))[0] == 404
    theirs = (await get(hub, "/api/v1/me/sales", buyer1))[1]["data"]
    assert theirs["sales"] == 0 and theirs["views"] == 0 and theirs["conversion"] is None
    assert (await get(hub, "/api/v1/me/sales/payouts", buyer1))[1]["data"]["items"] == []
    assert (await hub.get("/api/v1/me/sales")).status == 401


# --- editing ---------------------------------------------------------------------------------------------

async def test_seller_edits_category_and_tags_and_nobody_else_can(hub, db):
    seller, buyer, seller_id, buyer_id, pod = await people(hub, db)
    response = await hub.patch(f"/api/v1/datapods/{pod}", json={"category": "Finance", "tags": ["fx", "daily"],
                                                                 "price_sui": "3.25"}, headers=auth(seller))
    body = await response.json()
    assert response.status == 200, body
    assert (body["data"]["category"], body["data"]["tags"], body["data"]["price_sui"]) == (
        "finance", ["fx", "daily"], "3.250000000")
    row = await db.fetchrow("SELECT category, schema -> 'tags' AS tags FROM datapods WHERE id = $1", pod)
    assert row["category"] == "finance" and row["tags"] == ["fx", "daily"]
    for bad in ({"category": "no spaces"}, {"tags": ["a,b"]}, {"tags": ["x"] * 21}, {"category": ""}):
        assert (await hub.patch(f"/api/v1/datapods/{pod}", json=bad, headers=auth(seller))).status == 400, bad
    other = await hub.patch(f"/api/v1/datapods/{pod}", json={"title": "mine now"}, headers=auth(buyer))
    assert other.status == 403
    assert (await hub.delete(f"/api/v1/datapods/{pod}", headers=auth(buyer))).status == 403
    assert (await hub.post(f"/api/v1/datapods/{pod}/versions", data=version_form(NEW_DATASET),
                           headers=auth(buyer))).status == 403
    assert await db.fetchval("SELECT title FROM datapods WHERE id = $1", pod) != "mine now"


# --- versions --------------------------------------------------------------------------------------------

async def test_new_version_reaches_earlier_buyers_byte_for_byte(hub, db, sockets):
    seller, buyer, seller_id, buyer_id, pod = await people(hub, db)
    enveloped = await register(hub)  # a buyer whose key is sealed to their X25519 key
    enveloped_id = uuid.UUID(enveloped["user"]["id"])
    private, public = keypair()
    assert (await hub.put("/api/v1/me/x25519-key", json={"public_key": delivery.b64(public)},
                          headers=auth(enveloped))).status == 200
    purchase = await buy(hub, db, buyer, buyer_id, seller_id, pod)
    enveloped_purchase = await buy(hub, db, enveloped, enveloped_id, seller_id, pod)
    old = await db.fetchrow("SELECT walrus_blob_id, encryption_key_hash FROM datapods WHERE id = $1", pod)
    sock = sockets()
    await sock.connect(server_url(hub), "/purchases", buyer["token"])
    assert (await sock.call("/purchases", "subscribe", {"channel": f"user:{buyer_id}"}))["ok"]

    response = await hub.post(f"/api/v1/datapods/{pod}/versions", data=version_form(NEW_DATASET),
                              headers=auth(seller))
    body = await response.json()
    assert response.status == 201, body
    version = body["data"]
    assert version["version"] == 2 and version["buyers_notified"] == 2
    assert version["data_hash"] == hashlib.sha256(NEW_DATASET).hexdigest()
    assert version["file_size"] == len(NEW_DATASET)
    row = await db.fetchrow("SELECT walrus_blob_id, encryption_key_hash, file_size, schema FROM datapods WHERE id = $1",
                            pod)
    assert row["walrus_blob_id"] == version["walrus_blob_id"] != old["walrus_blob_id"]
    assert row["encryption_key_hash"] != old["encryption_key_hash"] and row["file_size"] == len(NEW_DATASET)
    assert [c["name"] for c in row["schema"]["columns"]] == ["city", "temp_c", "humidity"]

    notice = await sock.wait_for("datapod_version_published")
    assert notice["data"] == {"purchase_id": purchase, "datapod_id": str(pod),
                              "datapod_title": "Weather, Berlin & Lagos", "version": 2,
                              "data_hash": version["data_hash"], "file_size": len(NEW_DATASET), "file_type": "text/csv"}
    # The earlier buyer downloads the new version, byte for byte.
    download = await hub.get(f"/api/v1/purchases/{purchase}/download", headers=auth(buyer))
    assert download.status == 200 and await download.read() == NEW_DATASET
    # The envelope sealed to the other buyer's key now carries the new dataset key and names the new blob.
    envelope = (await (await hub.get(f"/api/v1/purchases/{enveloped_purchase}/key",
                                     headers=auth(enveloped))).json())["data"]
    key = delivery.open_envelope(envelope, private)
    assert hashlib.sha256(key).hexdigest() == row["encryption_key_hash"]
    assert envelope["dataset"]["blob_id"] == row["walrus_blob_id"]
    assert envelope["dataset"]["data_hash_sha256"] == version["data_hash"]
    stored = await db.fetchval("SELECT decryption_key FROM purchases WHERE id = $1", uuid.UUID(enveloped_purchase))
    assert delivery.is_envelope(stored)

    # The history: both versions, newest first, matching their rows; readable by anyone while on the market.
    history = (await get(hub, f"/api/v1/datapods/{pod}/versions"))[1]["data"]
    assert [(v["version"], v["walrus_blob_id"], v["encryption_key_hash"]) for v in history["items"]] == [
        (2, row["walrus_blob_id"], row["encryption_key_hash"]), (1, old["walrus_blob_id"], old["encryption_key_hash"])]
    paged = (await get(hub, f"/api/v1/datapods/{pod}/versions?limit=1"))[1]["data"]
    assert [v["version"] for v in paged["items"]] == [2] and paged["next_before"] == 2
    older = (await get(hub, f"/api/v1/datapods/{pod}/versions?before=2"))[1]["data"]
    assert [v["version"] for v in older["items"]] == [1]
    assert (await get(hub, "/api/v1/me/sales/datapods/" + str(pod), seller))[1]["data"]["version"] == 2

    # Refused: no file, a file that is not a dataset, someone else's pod.
    empty = aiohttp.FormData()
    empty.add_field("note", "x")
    assert (await hub.post(f"/api/v1/datapods/{pod}/versions", data=empty, headers=auth(seller))).status == 400
    assert (await hub.post(f"/api/v1/datapods/{pod}/versions", data=version_form(b"\x00\x01", "x.bin",
                                                                                  "application/octet-stream"),
                           headers=auth(seller))).status == 400
    assert (await hub.post(f"/api/v1/datapods/{uuid.uuid4()}/versions", data=version_form(NEW_DATASET),
                           headers=auth(seller))).status == 404
    assert await db.fetchval("SELECT count(*) FROM datapod_versions WHERE datapod_id = $1", pod) == 2


# --- deletion ---------------------------------------------------------------------------------------------

async def test_delete_is_refused_while_money_moves_and_buyers_keep_access(hub, db):
    seller, buyer, seller_id, buyer_id, pod = await people(hub, db)
    purchase = await buy(hub, db, buyer, buyer_id, seller_id, pod)
    refused = await hub.delete(f"/api/v1/datapods/{pod}", headers=auth(seller))
    assert refused.status == 409 and (await refused.json())["error"]["code"] == "conflict"  # holding
    assert (await hub.post(f"/api/v1/purchases/{purchase}/confirm", headers=auth(buyer))).status == 200
    assert (await hub.delete(f"/api/v1/datapods/{pod}", headers=auth(seller))).status == 409  # released, not paid
    await wallet_of(db, seller_id)
    await settle(hub, db)

    response = await hub.delete(f"/api/v1/datapods/{pod}", headers=auth(seller))
    body = await response.json()
    assert response.status == 200, body
    assert body["data"]["deleted"] is True
    row = await db.fetchrow("SELECT published, deleted_at FROM datapods WHERE id = $1", pod)
    assert row["published"] is False and row["deleted_at"] is not None
    # Gone from the market, the seller's list and every change; the buyer keeps the download.
    assert (await get(hub, f"/api/v1/datapods/{pod}", seller))[0] == 404
    assert (await get(hub, f"/api/v1/datapods/{pod}", buyer))[0] == 404
    assert (await get(hub, "/api/v1/datapods"))[1]["data"]["items"] == []
    assert (await get(hub, "/api/v1/seller/datapods", seller))[1]["data"]["items"] == []
    assert (await hub.post(f"/api/v1/datapods/{pod}/publish", headers=auth(seller))).status == 404
    assert (await hub.patch(f"/api/v1/datapods/{pod}", json={"title": "back"}, headers=auth(seller))).status == 404
    assert (await hub.delete(f"/api/v1/datapods/{pod}", headers=auth(seller))).status == 404
    download = await hub.get(f"/api/v1/purchases/{purchase}/download", headers=auth(buyer))
    assert download.status == 200 and await download.read() == DATASET
    # Its money stays in the seller's figures, marked deleted in the per-pod list.
    assert (await get(hub, "/api/v1/me/sales", seller))[1]["data"]["sales"] == 1
    listed = (await get(hub, "/api/v1/me/sales/datapods", seller))[1]["data"]["items"]
    assert [(p["datapod_id"], p["deleted_at"] is not None) for p in listed] == [(str(pod), True)]
    assert (await get(hub, f"/api/v1/datapods/{pod}/versions", buyer))[0] == 200  # a buyer still sees its history


async def test_delete_a_draft_that_never_sold(hub, db):
    seller, buyer, seller_id, buyer_id, pod = await people(hub, db)
    await db.execute("UPDATE datapods SET published = false WHERE id = $1", pod)
    assert (await hub.delete(f"/api/v1/datapods/{pod}", headers=auth(buyer))).status == 404  # a draft stays unseen
    assert (await hub.delete(f"/api/v1/datapods/{pod}", headers=auth(seller))).status == 200
    assert await db.fetchval("SELECT deleted_at IS NOT NULL FROM datapods WHERE id = $1", pod)
