"""DataPods end to end: upload (streamed, profiled, encrypted), publish and live events, search with
keyset pages over 10k pods, seller analytics, reviews, the /marketplace commands and the Walrus store."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import random
import uuid
from decimal import Decimal
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from db import marketplace as datapod_queries
from server.adapters.blobs import BLOB_ID, BLOBS, LocalBlobStore, WalrusBlobStore, blob_id_for
from server.app import create_app
from server.core.crypto import MASTER_KEY, decrypt_dataset, unwrap_key
from server.core.errors import Unavailable
from tests.helpers import SocketClient, register, register_seller, server_url, wait_until

CSV_BYTES = (b"date,city,temp_c,rainy,note\n"
             + b"".join(f"2026-10-{d:02d},{c},{d * 1.5:.1f},{'true' if d % 2 else 'false'},\"a, b\"\n".encode()
                        for d in range(1, 13) for c in ("Lima", "Oslo"))
             + b"2026-10-13,Lima,,false,\n")
JSONL_BYTES = b"".join(json.dumps(r).encode() + b"\n" for r in (
    [{"id": i, "score": i / 2, "label": f"l{i}", "tags": ["x"]} for i in range(12)] + [{"id": 12, "extra": None}]))


def form(data: bytes = CSV_BYTES, filename: str = "weather.csv", content_type: str = "text/csv",
         **fields: str) -> aiohttp.FormData:
    metadata = {"title": "City weather", "description": "Daily weather for two cities",
                "category": "climate", "price_sui": "1.5", **fields}
    body = aiohttp.FormData()
    for name, value in metadata.items():
        if value is not None:
            body.add_field(name, value)
    if data is not None:
        body.add_field("file", io.BytesIO(data), filename=filename, content_type=content_type)
    return body


def auth(user: dict) -> dict:
    return {"Authorization": f"Bearer {user['token']}"}


async def upload(client, user: dict, **kwargs) -> dict:
    response = await client.post("/api/v1/datapods", data=form(**kwargs), headers=auth(user))
    body = await response.json()
    assert response.status == 201, body
    return body["data"]


def blob_files(data_dir: Path) -> list[Path]:
    return [p for p in (data_dir / "blobs").rglob("*") if p.is_file()] if (data_dir / "blobs").exists() else []


def spooled(data_dir: Path) -> list[Path]:
    root = data_dir / "tmp" / "uploads"
    return list(root.iterdir()) if root.exists() else []


async def decrypt_stored(client, db, datapod_id: str) -> bytes:
    row = await db.fetchrow("SELECT walrus_blob_id, wrapped_key, encryption_iv, encryption_key_hash "
                            "FROM datapods WHERE id = $1", uuid.UUID(datapod_id))
    ciphertext = await client.app[BLOBS].get(row["walrus_blob_id"])
    key = unwrap_key(client.app[MASTER_KEY], row["wrapped_key"], datapod_id.encode())
    assert hashlib.sha256(key).hexdigest() == row["encryption_key_hash"]
    return decrypt_dataset(ciphertext, key, bytes.fromhex(row["encryption_iv"]), datapod_id.encode())


def received(sock: SocketClient, event_type: str) -> list[dict]:
    return [data for _, name, data in sock.events if name == event_type]


# --- upload -----------------------------------------------------------------------------------


async def test_csv_upload_is_profiled_hashed_and_stored_encrypted(client, db, settings):
    seller = await register(client)
    pod = await upload(client, seller, tags="weather, cities,weather")
    assert pod["published"] is False and pod["seller"]["id"] == seller["user"]["id"]
    assert pod["tags"] == ["weather", "cities"] and pod["category"] == "climate" and pod["price_sui"] == "1.500000000"
    assert pod["data_hash"] == hashlib.sha256(CSV_BYTES).hexdigest()
    assert pod["file_size"] == len(CSV_BYTES) and pod["file_type"] == "text/csv"
    assert pod["walrus_storage_size"] == len(CSV_BYTES) + 16  # GCM adds its tag only
    assert pod["schema"] == {
        "format": "csv", "row_count": 25, "column_count": 5,
        "columns": [{"name": "date", "type": "string", "null_count": 0},
                    {"name": "city", "type": "string", "null_count": 0},
                    {"name": "temp_c", "type": "number", "null_count": 1},
                    {"name": "rainy", "type": "boolean", "null_count": 0},
                    {"name": "note", "type": "string", "null_count": 1}]}
    assert len(pod["sample_data"]) == 10
    assert pod["sample_data"][0] == {"date": "2026-10-01", "city": "Lima", "temp_c": 1.5, "rainy": True, "note": "a, b"}
    assert "wrapped_key" not in pod and "encryption_iv" not in pod and pod["review_count"] == 0

    ciphertext = await client.app[BLOBS].get(pod["walrus_blob_id"])
    assert ciphertext != CSV_BYTES and b"Lima" not in ciphertext and b"date,city" not in ciphertext
    assert await decrypt_stored(client, db, pod["id"]) == CSV_BYTES
    row = await db.fetchrow("SELECT wrapped_key, published FROM datapods WHERE id = $1", uuid.UUID(pod["id"]))
    assert row["published"] is False and len(row["wrapped_key"]) > 40
    assert spooled(settings.data_dir) == []


async def test_jsonl_upload_infers_the_union_of_keys(client, db):
    seller = await register(client)
    pod = await upload(client, seller, data=JSONL_BYTES, filename="scores.jsonl",
                       content_type="application/octet-stream")
    assert pod["file_type"] == "application/x-ndjson"
    assert pod["schema"] == {
        "format": "jsonl", "row_count": 13, "column_count": 5,
        "columns": [{"name": "id", "type": "integer", "null_count": 0},
                    {"name": "score", "type": "number", "null_count": 1},
                    {"name": "label", "type": "string", "null_count": 1},
                    {"name": "tags", "type": "array", "null_count": 1},
                    {"name": "extra", "type": "null", "null_count": 13}]}
    assert pod["sample_data"][:2] == [{"id": 0, "score": 0.0, "label": "l0", "tags": ["x"]},
                                      {"id": 1, "score": 0.5, "label": "l1", "tags": ["x"]}]
    assert pod["data_hash"] == hashlib.sha256(JSONL_BYTES).hexdigest()
    assert await decrypt_stored(client, db, pod["id"]) == JSONL_BYTES


async def test_upload_larger_than_max_payload_bytes_streams_through(aiohttp_client, settings, db):
    client = await aiohttp_client(create_app(settings.replace(max_payload_bytes=64 * 1024)))
    seller = await register(client)
    rng = random.Random(5)
    big = b"id,value,word\n" + b"".join(f"{i},{rng.random():.6f},w{i % 97}\n".encode() for i in range(120_000))
    assert len(big) > 2_000_000
    pod = await upload(client, seller, data=big, filename="big.csv")
    assert pod["schema"]["row_count"] == 120_000 and pod["file_size"] == len(big)
    assert [c["type"] for c in pod["schema"]["columns"]] == ["integer", "number", "string"]
    assert await decrypt_stored(client, db, pod["id"]) == big


@pytest.mark.parametrize("size", [12_000, 400_000])  # caught while streaming / by Content-Length
async def test_oversize_upload_is_refused_and_nothing_is_written(aiohttp_client, settings, db, size):
    client = await aiohttp_client(create_app(settings.replace(max_upload_bytes=10_000)))
    seller = await register(client)
    data = b"n\n" + b"1\n" * (size // 2)
    response = await client.post("/api/v1/datapods", data=form(data=data), headers=auth(seller))
    body = await response.json()
    assert response.status == 413 and body["error"]["code"] == "payload_too_large"
    assert await db.fetchval("SELECT count(*) FROM datapods") == 0
    assert blob_files(settings.data_dir) == [] and spooled(settings.data_dir) == []
    await upload(client, seller, data=b"n\n1\n")  # the limit is per file, the next upload works


@pytest.mark.parametrize("kwargs, field", [
    ({"title": None}, "title"),
    ({"title": "x" * 300}, "title"),
    ({"price_sui": "cheap"}, "price_sui"),
    ({"price_sui": "-1"}, "price_sui"),
    ({"price_sui": "1.0123456789"}, "price_sui"),
    ({"category": "has space"}, "category"),
    ({"category": None}, "category"),
    ({"licence": "mine"}, "licence"),
    ({"data": None}, "file"),
    ({"filename": "notes.txt", "content_type": "text/plain"}, "file"),
    ({"data": b"a,b\n1,2,3\n"}, "file"),
    ({"data": b"a,b\n"}, "file"),
    ({"data": b"\xff\xfe,\n1,2\n"}, "file"),
    ({"data": b'{"a": 1}\n[1, 2]\n', "filename": "x.jsonl"}, "file"),
    ({"data": b'{"a": 1}\n{"a": NaN}\n', "filename": "x.jsonl"}, "file"),
])
async def test_bad_upload_names_the_field_and_writes_nothing(client, db, settings, kwargs, field):
    seller = await register(client)
    response = await client.post("/api/v1/datapods", data=form(**kwargs), headers=auth(seller))
    body = await response.json()
    assert response.status == 400, body
    assert body["error"]["code"] == "invalid_payload" and body["error"]["field"] == field
    assert await db.fetchval("SELECT count(*) FROM datapods") == 0
    assert blob_files(settings.data_dir) == [] and spooled(settings.data_dir) == []


async def test_upload_needs_a_signed_in_user_and_a_multipart_body(client):
    response = await client.post("/api/v1/datapods", data=form())
    assert response.status == 401
    seller = await register(client)
    response = await client.post("/api/v1/datapods", json={"title": "x"}, headers=auth(seller))
    assert response.status == 400 and (await response.json())["error"]["field"] == "file"


# --- publishing, updates, ownership and live events --------------------------------------------


async def test_only_the_seller_may_publish_update_or_unpublish(client):
    seller, other = await register_seller(client), await register(client)
    pod = await upload(client, seller)
    path = f"/api/v1/datapods/{pod['id']}"
    # A draft is invisible to others: it does not exist for them.
    assert (await client.get(path, headers=auth(other))).status == 404
    assert (await client.get(path)).status == 404
    assert (await client.get(path, headers=auth(seller))).status == 200
    assert (await client.post(f"{path}/publish", headers=auth(other))).status == 404
    assert (await client.post(f"{path}/publish")).status == 401

    published = await client.post(f"{path}/publish", headers=auth(seller))
    assert published.status == 200 and (await published.json())["data"]["published"] is True
    assert (await client.get(path)).status == 200
    for method, suffix, kwargs in (("PATCH", "", {"json": {"price_sui": "9"}}), ("POST", "/unpublish", {}),
                                   ("POST", "/publish", {})):
        response = await client.request(method, path + suffix, headers=auth(other), **kwargs)
        assert response.status == 403 and (await response.json())["error"]["code"] == "forbidden"
    assert (await (await client.get(path)).json())["data"]["price_sui"] == "1.500000000"
    bad = await client.patch(path, json={}, headers=auth(seller))
    assert bad.status == 400
    bad = await client.patch(path, json={"price_sui": "1.2.3"}, headers=auth(seller))
    assert bad.status == 400 and (await bad.json())["error"]["field"] == "price_sui"
    assert (await client.get(f"/api/v1/datapods/{uuid.uuid4()}")).status == 404
    assert (await client.get("/api/v1/datapods/not-a-uuid")).status == 404


async def test_subscribers_see_published_updated_and_unpublished_live(client, sockets):
    seller = await register_seller(client)
    pod = await upload(client, seller)
    market, category, watcher = sockets(), sockets(), sockets()
    for sock, channel in ((market, "market"), (category, "market:category:climate"), (watcher, f"datapod:{pod['id']}")):
        await sock.connect(server_url(client), "/marketplace")
        assert (await sock.call("/marketplace", "subscribe", {"channel": channel}))["ok"] is True

    # Draft edits are private: nothing is announced.
    await client.patch(f"/api/v1/datapods/{pod['id']}", json={"description": "draft edit"}, headers=auth(seller))
    await client.post(f"/api/v1/datapods/{pod['id']}/publish", headers=auth(seller))
    await wait_until(lambda: received(market, "datapod_published") and received(watcher, "datapod_published"))
    event = received(market, "datapod_published")[0]
    assert event["channel"] == "market" and event["data"]["id"] == pod["id"]
    assert event["data"]["title"] == "City weather" and event["data"]["description"] == "draft edit"
    assert event["data"]["price_sui"] == "1.500000000" and event["data"]["published"] is True
    await wait_until(lambda: received(category, "datapod_published"))

    response = await client.patch(f"/api/v1/datapods/{pod['id']}", json={"price_sui": 2.25}, headers=auth(seller))
    assert (await response.json())["data"]["price_sui"] == "2.250000000"
    await wait_until(lambda: received(watcher, "datapod_updated"))
    update = received(watcher, "datapod_updated")[0]
    assert update["channel"] == f"datapod:{pod['id']}"
    assert update["data"]["datapod_id"] == pod["id"] and update["data"]["changes"] == {"price_sui": "2.250000000"}

    await client.post(f"/api/v1/datapods/{pod['id']}/unpublish", headers=auth(seller))
    await wait_until(lambda: received(market, "datapod_unpublished") and received(category, "datapod_unpublished"))
    assert received(market, "datapod_unpublished")[0]["data"] == {"datapod_id": pod["id"], "category": "climate"}
    # A repeated publish/unpublish changes nothing and announces nothing.
    await client.post(f"/api/v1/datapods/{pod['id']}/unpublish", headers=auth(seller))
    await asyncio.sleep(0.3)
    assert len(received(market, "datapod_unpublished")) == 1
    assert len(received(market, "datapod_updated")) == 1 and len(received(market, "datapod_published")) == 1


# --- search, keyset pages, analytics, reviews -------------------------------------------------

COPY_COLUMNS = ("id", "seller_id", "title", "description", "category", "price_sui", "walrus_blob_id",
                "walrus_storage_size", "encryption_key_hash", "encryption_iv", "wrapped_key", "file_type",
                "file_size", "data_hash", "published", "purchase_count", "average_rating", "created_at")
WORDS = ("weather", "traffic", "prices", "yields", "sensor", "survey", "census", "energy", "health", "retail")


async def insert_pods(db, seller_id: uuid.UUID, count: int, seed: int = 1, **overrides) -> list[tuple]:
    """Bulk-insert pods with COPY (fake blobs: these tests never read them)."""
    import datetime as dt

    rng = random.Random(seed)
    base = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    records = []
    for i in range(count):
        pod_id = uuid.UUID(int=rng.getrandbits(128), version=4)
        word = WORDS[i % len(WORDS)]
        record = {
            "id": pod_id, "seller_id": seller_id, "title": f"{word} dataset {i}",
            "description": f"Rows about {word} number {i}" + (" zeppelin" if i % 1000 == 7 else ""),
            "category": ("climate", "finance", "transport", "agriculture")[i % 4],
            "price_sui": Decimal(rng.randint(0, 40)) / 4, "walrus_blob_id": blob_id_for(pod_id.bytes),
            "walrus_storage_size": 100, "encryption_key_hash": "0" * 64, "encryption_iv": "0" * 24,
            "wrapped_key": "x", "file_type": "text/csv", "file_size": 84, "data_hash": "0" * 64,
            "published": i % 10 != 9, "purchase_count": rng.randint(0, 5),
            "average_rating": Decimal(rng.randint(0, 10)) / 2,
            # Many equal timestamps, so the id tie-breaker is exercised.
            "created_at": base + dt.timedelta(minutes=i // 3),
            **overrides}
        records.append(tuple(record[c] for c in COPY_COLUMNS))
    await db.copy_records_to_table("datapods", records=records, columns=COPY_COLUMNS)
    return records


async def page_through(client, query: dict, headers: dict | None = None, path: str = "/api/v1/datapods") -> list[dict]:
    items, cursor = [], None
    for _ in range(1000):
        params = {**query, **({"cursor": cursor} if cursor else {})}
        response = await client.get(path, params=params, headers=headers or {})
        body = await response.json()
        assert response.status == 200, body
        items.extend(body["data"]["items"])
        cursor = body["data"]["next_cursor"]
        if cursor is None:
            return items
    raise AssertionError("pagination did not end")


async def test_search_filters_sorts_and_pages(client, db):
    seller = await register(client)
    await insert_pods(db, uuid.UUID(seller["user"]["id"]), 200)
    everything = await page_through(client, {"limit": "7"})
    assert len(everything) == 180 and len({p["id"] for p in everything}) == 180  # drafts excluded
    stamps = [p["created_at"] for p in everything]
    assert stamps == sorted(stamps, reverse=True)

    cheap = await page_through(client, {"category": "finance", "min_price": "2", "max_price": "5.5",
                                        "sort": "price", "limit": "10"})
    prices = [Decimal(p["price_sui"]) for p in cheap]
    assert cheap and prices == sorted(prices) and all(Decimal(2) <= p <= Decimal("5.5") for p in prices)
    assert {p["category"] for p in cheap} == {"finance"}
    shouted = await page_through(client, {"category": "FINANCE", "min_price": "2", "max_price": "5.5",
                                          "sort": "price", "limit": "100"})
    assert shouted == cheap
    expected = await db.fetchval("SELECT count(*) FROM datapods WHERE published AND category = 'finance' "
                                 "AND price_sui BETWEEN 2 AND 5.5")
    assert len(cheap) == expected

    dear = await page_through(client, {"sort": "price", "order": "desc", "limit": "50"})
    assert [Decimal(p["price_sui"]) for p in dear] == sorted((Decimal(p["price_sui"]) for p in dear), reverse=True)
    for sort, field in (("rating", "average_rating"), ("sales", "purchase_count")):
        found = await page_through(client, {"sort": sort, "limit": "30"})
        values = [Decimal(str(p[field])) for p in found]
        assert len(found) == 180 and values == sorted(values, reverse=True)

    text = await page_through(client, {"q": "traffic", "limit": "5"})
    assert text and all("traffic" in p["title"] for p in text)
    assert len(text) == await db.fetchval(
        "SELECT count(*) FROM datapods WHERE published AND title LIKE 'traffic%'")

    for params, field in (({"limit": "101"}, "limit"), ({"limit": "x"}, "limit"), ({"sort": "random"}, "sort"),
                          ({"cursor": "garbage!"}, "cursor"), ({"min_price": "-3"}, "min_price"),
                          ({"min_price": "5", "max_price": "1"}, "min_price"), ({"colour": "red"}, "colour")):
        response = await client.get("/api/v1/datapods", params=params)
        body = await response.json()
        assert response.status == 400 and body["error"]["field"] == field, (params, body)
    first = await (await client.get("/api/v1/datapods", params={"sort": "price", "limit": "2"})).json()
    other_order = await client.get("/api/v1/datapods", params={"sort": "rating",
                                                                 "cursor": first["data"]["next_cursor"]})
    assert (await other_order.json())["error"]["field"] == "cursor"


async def test_ten_thousand_pods_use_the_fts_index_and_keyset_pages_are_exact(client, db):
    seller = await register(client)
    await insert_pods(db, uuid.UUID(seller["user"]["id"]), 10_000, seed=7, price_sui=Decimal("1.5"))
    await db.execute("ANALYZE datapods")

    sql, params = datapod_queries.search_sql(datapod_queries.SearchFilter(q="zeppelin", limit=21))
    plan = "\n".join(r[0] for r in await db.fetch("EXPLAIN " + sql, *params))
    assert "idx_datapods_search" in plan, plan
    found = await page_through(client, {"q": "zeppelin", "limit": "3"})
    assert len(found) == 10 and all(p["description"].endswith("zeppelin") for p in found)  # i % 1000 == 7

    # Every price is equal: order and pages rest on the id tie-breaker alone.
    pages = []
    cursor = None
    while True:
        params = {"category": "transport", "sort": "price", "limit": "100", **({"cursor": cursor} if cursor else {})}
        body = await (await client.get("/api/v1/datapods", params=params)).json()
        pages.append([p["id"] for p in body["data"]["items"]])
        cursor = body["data"]["next_cursor"]
        if cursor is None:
            break
    ids = [i for page in pages for i in page]
    assert len(ids) == len(set(ids))  # disjoint
    expected = [str(r["id"]) for r in await db.fetch(
        "SELECT id FROM datapods WHERE published AND category = 'transport' ORDER BY price_sui, id")]
    assert ids == expected and len(ids) == 2500  # complete and in order


async def test_seller_views_stats_and_reviews(client, db):
    seller, buyer, other = await register(client), await register(client), await register(client)
    seller_id, buyer_id = uuid.UUID(seller["user"]["id"]), uuid.UUID(buyer["user"]["id"])
    records = await insert_pods(db, seller_id, 4, seed=3, purchase_count=0, average_rating=Decimal(0))
    draft = await upload(client, seller)
    rated_id = records[0][0]
    for i, (pod_id, rating) in enumerate(((records[0][0], 4), (records[1][0], 2))):
        purchase_id = await db.fetchval(
            """INSERT INTO purchases (buyer_id, datapod_id, payment_tx_digest, amount_sui, status)
               VALUES ($1, $2, $3, $4, 'completed') RETURNING id""", buyer_id, pod_id, f"digest{i}", Decimal("2.5"))
        await db.execute("INSERT INTO reviews (purchase_id, buyer_id, datapod_id, rating, comment) "
                         "VALUES ($1, $2, $3, $4, 'useful')", purchase_id, buyer_id, pod_id, rating)

    mine = await page_through(client, {"limit": "2"}, headers=auth(seller), path="/api/v1/seller/datapods")
    assert len(mine) == 5 and draft["id"] in {p["id"] for p in mine}
    theirs = await page_through(client, {}, headers=auth(other), path="/api/v1/seller/datapods")
    assert theirs == []
    assert (await client.get("/api/v1/seller/datapods")).status == 401

    stats = (await (await client.get("/api/v1/seller/stats", headers=auth(seller))).json())["data"]
    published = sum(1 for r in records if r[COPY_COLUMNS.index("published")])
    assert stats == {"total_datapods": 5, "published_datapods": published, "total_sales": 2,
                     "total_revenue": "5.000000000", "average_rating": "3.00"}
    empty = (await (await client.get("/api/v1/seller/stats", headers=auth(other))).json())["data"]
    assert empty == {"total_datapods": 0, "published_datapods": 0, "total_sales": 0,
                     "total_revenue": "0", "average_rating": "0"}

    reviews = (await (await client.get(f"/api/v1/datapods/{rated_id}/reviews")).json())["data"]
    assert [(r["rating"], r["comment"], r["buyer"]["id"]) for r in reviews["items"]] == [(4, "useful", str(buyer_id))]
    assert reviews["next_cursor"] is None
    pod = (await (await client.get(f"/api/v1/datapods/{rated_id}")).json())["data"]
    assert pod["average_rating"] == "4.00" and pod["purchase_count"] == 1 and pod["review_count"] == 1
    assert (await client.get(f"/api/v1/datapods/{draft['id']}/reviews")).status == 404


async def test_marketplace_socket_commands_mirror_rest(client, db, sockets):
    seller = await register(client)
    await insert_pods(db, uuid.UUID(seller["user"]["id"]), 30)
    draft = await upload(client, seller)
    sock = sockets()
    await sock.connect(server_url(client), "/marketplace")
    ack = await sock.call("/marketplace", "search_datapods", {"category": "climate", "limit": 3, "sort": "price"})
    rest = await (await client.get("/api/v1/datapods", params={"category": "climate", "limit": "3",
                                                               "sort": "price"})).json()
    assert ack["ok"] is True and ack["data"] == rest["data"]
    nxt = await sock.call("/marketplace", "search_datapods", {"category": "climate", "limit": 3, "sort": "price",
                                                             "cursor": ack["data"]["next_cursor"]})
    assert not {p["id"] for p in nxt["data"]["items"]} & {p["id"] for p in ack["data"]["items"]}
    bad = await sock.call("/marketplace", "search_datapods", {"limit": 500})
    assert bad["error"]["code"] == "invalid_payload" and bad["error"]["field"] == "limit"

    one = await sock.call("/marketplace", "get_datapod", {"datapod_id": ack["data"]["items"][0]["id"]})
    assert one["ok"] is True and one["data"]["id"] == ack["data"]["items"][0]["id"]
    hidden = await sock.call("/marketplace", "get_datapod", {"datapod_id": draft["id"]})
    assert hidden["error"]["code"] == "not_found"
    owner = sockets()
    await owner.connect(server_url(client), "/marketplace", token=seller["token"])
    own = await owner.call("/marketplace", "get_datapod", {"datapod_id": draft["id"]})
    assert own["ok"] is True and own["data"]["schema"]["row_count"] == 25
    bad = await sock.call("/marketplace", "get_datapod", {"datapod_id": "nope"})
    assert bad["error"]["field"] == "datapod_id"


# --- blob stores ------------------------------------------------------------------------------


class FakeWalrus:
    """A local server speaking the Walrus publisher and aggregator HTTP API."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.epochs: list[str] = []
        self.fail_with: int | None = None
        self.garbage = False
        self.reading = 0  # reads that have arrived and not been answered
        self.hold: asyncio.Event | None = None  # set: reads wait for it before answering
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_put("/v1/blobs", self.store)
        app.router.add_get("/v1/blobs/{blob_id}", self.read)
        self.app = app

    async def store(self, request: web.Request) -> web.Response:
        if self.fail_with:
            return web.json_response({"error": {"code": self.fail_with, "message": "storage nodes unavailable"}},
                                     status=self.fail_with)
        if self.garbage:
            return web.Response(text="<html>proxy error</html>")
        self.epochs.append(request.query.get("epochs", ""))
        data = await request.read()
        blob_id = blob_id_for(b"walrus:" + data)  # not our content hash: ids come from the publisher
        if blob_id in self.blobs:
            return web.json_response({"alreadyCertified": {
                "blobId": blob_id, "event": {"txDigest": "4XQHFa9S324wTzYHF3vsBSwpUZuLpmwTHYMFv9nsttSs",
                                             "eventSeq": "0"}, "endEpoch": 35}})
        self.blobs[blob_id] = data
        return web.json_response({"newlyCreated": {
            "blobObject": {"id": "0x" + "e9" * 32, "registeredEpoch": 34, "blobId": blob_id, "size": len(data),
                           "encodingType": "RS2", "certifiedEpoch": 34,
                           "storage": {"id": "0x" + "47" * 32, "startEpoch": 34, "endEpoch": 35,
                                       "storageSize": 66034000}, "deletable": False},
            "resourceOperation": {"registerFromScratch": {"encodedLength": 66034000, "epochsAhead": 1}},
            "cost": 132300}})

    async def read(self, request: web.Request) -> web.Response:
        self.reading += 1
        try:
            if self.hold is not None:
                await self.hold.wait()
        finally:
            self.reading -= 1
        blob = self.blobs.get(request.match_info["blob_id"])
        if blob is None:
            return web.Response(status=404, text="blob not found")
        return web.Response(body=blob, content_type="application/octet-stream")


@pytest.fixture
async def walrus(aiohttp_server):
    """A fake Walrus publisher/aggregator and its base URL."""
    fake = FakeWalrus()
    server = await aiohttp_server(fake.app)
    fake.url = str(server.make_url("")).rstrip("/")
    return fake


async def test_walrus_store_speaks_both_publisher_answers_and_reports_errors(walrus, tmp_path):
    store = WalrusBlobStore(walrus.url, walrus.url + "/", epochs=7)
    try:
        first = await store.put(b"ciphertext bytes")
        assert BLOB_ID.match(first) and walrus.epochs == ["7"]
        assert await store.put(b"ciphertext bytes") == first  # alreadyCertified
        assert await store.get(first) == b"ciphertext bytes"
        path = tmp_path / "big.bin"
        path.write_bytes(bytes(range(256)) * 8192)
        from_file = await store.put_file(path)
        assert await store.get(from_file) == path.read_bytes() and path.exists()
        chunks = [c async for c in store.stream(from_file, chunk_bytes=65536)]
        assert b"".join(chunks) == path.read_bytes()
        with pytest.raises(KeyError):
            await store.get(blob_id_for(b"never stored"))
        with pytest.raises(KeyError):
            await store.get("../../etc/passwd")
        walrus.fail_with = 503
        with pytest.raises(Unavailable):
            await store.put(b"more")
        walrus.fail_with, walrus.garbage = None, True
        with pytest.raises(Unavailable):
            await store.put(b"more")
    finally:
        await store.close()
    unreachable = WalrusBlobStore("http://127.0.0.1:9", "http://127.0.0.1:9")
    try:
        with pytest.raises(Unavailable):
            await unreachable.put(b"x")
        with pytest.raises(Unavailable):
            await unreachable.get(blob_id_for(b"x"))
    finally:
        await unreachable.close()
    for body in ({}, {"newlyCreated": {}}, {"alreadyCertified": {"blobId": "short"}}, []):
        with pytest.raises(Unavailable):
            WalrusBlobStore.blob_id_from_response(body)


async def test_walrus_transfers_beyond_aiohttps_pool_run_at_once_and_past_the_limit_fail_clearly(walrus):
    store = WalrusBlobStore(walrus.url, walrus.url, max_transfers=130, transfer_wait=0.3)
    busy = WalrusBlobStore(walrus.url, walrus.url, max_transfers=2, transfer_wait=0.3)
    try:
        blob_id = await store.put(b"ciphertext")
        walrus.hold = asyncio.Event()
        reads = [asyncio.create_task(store.get(blob_id)) for _ in range(130)]
        # aiohttp's default pool held the 101st read back until another ended (and failed it after 10 s).
        await wait_until(lambda: walrus.reading == 130, timeout=10)
        walrus.hold.set()
        assert await asyncio.gather(*reads) == [b"ciphertext"] * 130
        walrus.hold.clear()
        held = [asyncio.create_task(busy.get(blob_id)) for _ in range(2)]
        await wait_until(lambda: walrus.reading == 2)
        with pytest.raises(Unavailable, match="all 2 transfers to Walrus are in use"):
            await busy.get(blob_id)
        assert walrus.reading == 2  # the refused read never reached Walrus
        walrus.hold.set()
        assert await asyncio.gather(*held) == [b"ciphertext"] * 2
        assert await busy.get(blob_id) == b"ciphertext"
    finally:
        walrus.hold = None
        await store.close()
        await busy.close()


async def test_upload_goes_to_walrus_when_configured(aiohttp_client, settings, walrus, db):
    client = await aiohttp_client(create_app(settings.replace(
        walrus_publisher_url=walrus.url, walrus_aggregator_url=walrus.url, walrus_epochs=3)))
    assert isinstance(client.app[BLOBS], WalrusBlobStore)
    seller = await register(client)
    pod = await upload(client, seller)
    assert pod["walrus_blob_id"] in walrus.blobs and walrus.epochs == ["3"]
    assert await decrypt_stored(client, db, pod["id"]) == CSV_BYTES
    assert blob_files(settings.data_dir) == [] and spooled(settings.data_dir) == []
    walrus.fail_with = 500
    response = await client.post("/api/v1/datapods", data=form(), headers=auth(seller))
    assert response.status == 503 and (await response.json())["error"]["code"] == "unavailable"
    assert await db.fetchval("SELECT count(*) FROM datapods") == 1 and spooled(settings.data_dir) == []


async def test_local_store_is_content_addressed(tmp_path):
    store = LocalBlobStore(tmp_path / "blobs")
    path = tmp_path / "spool"
    path.write_bytes(b"abc" * 1000)
    blob_id = await store.put_file(path)
    assert blob_id == blob_id_for(b"abc" * 1000) and await store.put(b"abc" * 1000) == blob_id
    assert b"".join([c async for c in store.stream(blob_id, 100)]) == b"abc" * 1000
    with pytest.raises(KeyError):
        await store.get(blob_id_for(b"other"))


async def test_demo_data_is_sealed_like_uploads(client, db, settings):
    from server.services import demo

    assert await demo.load_if_empty(db, settings, client.app[MASTER_KEY], client.app[BLOBS]) is True
    pods = await db.fetch("SELECT id::text, schema, data_hash FROM datapods ORDER BY title")
    assert len(pods) == 4 and all(p["schema"]["format"] == "csv" for p in pods)
    plaintext = await decrypt_stored(client, db, pods[0]["id"])
    assert hashlib.sha256(plaintext).hexdigest() == pods[0]["data_hash"]
    listing = await (await client.get("/api/v1/datapods")).json()
    assert len(listing["data"]["items"]) == 4


def test_stale_spool_files_are_swept(tmp_path):
    import os
    import time

    from server.services.datasets import sweep_stale_uploads, upload_dir

    root = upload_dir(tmp_path)
    root.mkdir(parents=True)
    old, fresh = root / "upload-old.enc", root / "upload-new.enc"
    old.write_bytes(b"x")
    fresh.write_bytes(b"y")
    os.utime(old, (time.time() - 2 * 86_400,) * 2)
    assert sweep_stale_uploads(tmp_path) == 1
    assert not old.exists() and fresh.exists()
