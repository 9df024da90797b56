"""Search that finds things, against the real server and database: facets whose counts match the rows,
filters on schema columns and types (and the GIN index behind them, by EXPLAIN), typo tolerance with
pg_trgm (and a clean fallback without it), "more like this", and bad parameters refused."""

from __future__ import annotations

import uuid
from collections import Counter
from decimal import Decimal
from typing import Any

import pytest

from db import marketplace as queries
from server.adapters.blobs import blob_id_for
from tests.helpers import register, register_seller, server_url


def auth(user: dict) -> dict:
    return {"Authorization": f"Bearer {user['token']}"}


def columns(*specs: str) -> list[dict[str, Any]]:
    """Schema columns from "name:type" specs."""
    return [{"name": name, "type": kind, "null_count": 0} for name, kind in (s.split(":") for s in specs)]


async def insert_pod(db, seller_id: uuid.UUID, title: str, *, category: str | None = "climate",
                     price: str = "1", published: bool = True, description: str | None = None,
                     cols: list[dict[str, Any]] | None = None, tags: list[str] | None = None,
                     purchase_count: int = 0) -> uuid.UUID:
    """A DataPod row as an upload makes it (fake blob: these tests never read it)."""
    pod_id = uuid.uuid4()
    schema = {"format": "csv", "columns": cols or [], "row_count": 1, "column_count": len(cols or []),
              "tags": tags or []}
    await db.execute(
        """INSERT INTO datapods (id, seller_id, title, description, category, price_sui, walrus_blob_id,
               encryption_key_hash, encryption_iv, wrapped_key, schema, published, purchase_count)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'x', $10, $11, $12)""",
        pod_id, seller_id, title, description, category, Decimal(price), blob_id_for(pod_id.bytes), "0" * 64,
        "0" * 24, schema, published, purchase_count)
    return pod_id


async def get(client, path: str, params: dict | None = None, user: dict | None = None,
              status: int = 200) -> dict:
    response = await client.get(path, params=params or {}, headers=auth(user) if user else {})
    body = await response.json()
    assert response.status == status, body
    return body["data"] if status == 200 else body["error"]


async def search_ids(client, params: dict, path: str = "/api/v1/datapods", user: dict | None = None) -> set[str]:
    """Every pod id a search lists, over all its pages."""
    found: list[str] = []
    params = {**params, "limit": "100"}
    while True:
        page = await get(client, path, params, user)
        found += [item["id"] for item in page["items"]]
        if page["next_cursor"] is None:
            return set(found)
        params["cursor"] = page["next_cursor"]


def band(price: Decimal) -> str:
    """The facet band of a price, computed independently of the SQL CASE."""
    for key, low, high in queries.PRICE_BANDS:
        if key == "free" and price == 0:
            return key
        if key != "free" and price > 0 and low <= price and (high is None or price < high):
            return key
    raise AssertionError(price)


# --- facets -----------------------------------------------------------------------------------


async def test_facet_counts_equal_the_counts_of_the_rows(client, db, sockets):
    seller = await register_seller(client)
    seller_id = uuid.UUID(seller["user"]["id"])
    prices = ["0", "0.5", "0.999999999", "1", "4.99", "5", "19.5", "20", "250"]
    cats = ["climate", "finance", "transport", None]
    rows = []
    for i in range(36):
        pod = {"title": f"{'weather' if i % 3 == 0 else 'ledger'} set {i}", "category": cats[i % 4],
               "price": prices[i % len(prices)], "published": i % 7 != 6,
               "cols": columns("Date:string", "amount:number" if i % 2 else "city:string")}
        rows.append(pod)
        await insert_pod(db, seller_id, pod["title"], category=pod["category"], price=pod["price"],
                         published=pod["published"], cols=pod["cols"])

    def expected(keep) -> dict:
        kept = [r for r in rows if r["published"] and keep(r)]
        by_cat = Counter(r["category"] for r in kept)
        by_band = Counter(band(Decimal(r["price"])) for r in kept)
        return {"total": len(kept), "categories": dict(by_cat),
                "price_bands": {key: by_band.get(key, 0) for key, _, _ in queries.PRICE_BANDS}}

    def observed(data: dict) -> dict:
        assert [b["band"] for b in data["price_bands"]] == [key for key, _, _ in queries.PRICE_BANDS]
        counts = [c["count"] for c in data["categories"]]
        assert counts == sorted(counts, reverse=True)  # biggest first
        return {"total": data["total"], "categories": {c["category"]: c["count"] for c in data["categories"]},
                "price_bands": {b["band"]: b["count"] for b in data["price_bands"]}}

    cases = [
        ({}, lambda r: True),
        ({"category": "Finance"}, lambda r: r["category"] == "finance"),
        ({"min_price": "1", "max_price": "19.5"}, lambda r: 1 <= Decimal(r["price"]) <= Decimal("19.5")),
        ({"q": "weather"}, lambda r: "weather" in r["title"]),
        ({"column": "AMOUNT", "column_type": "number"}, lambda r: any(c["name"] == "amount" for c in r["cols"])),
        ({"column_type": "boolean"}, lambda r: False),
    ]
    for params, keep in cases:
        data = await get(client, "/api/v1/datapods/facets", params)
        assert observed(data) == expected(keep), params
        assert data["fuzzy"] is False and data["estimated"] is False  # a small table is read whole
        # The facets count exactly what the search lists.
        assert data["total"] == len(await search_ids(client, params)), params
    bands = {b["band"]: (b["min_sui"], b["max_sui"]) for b in (await get(client, "/api/v1/datapods/facets"))[
        "price_bands"]}
    assert bands["free"] == ("0", "0") and bands["20_plus"] == ("20", None)

    # The same from the socket command.
    sock = sockets()
    await sock.connect(server_url(client), "/marketplace")
    ack = await sock.call("/marketplace", "datapod_facets", {"category": "climate", "min_price": 1})
    assert ack["ok"] and observed(ack["data"]) == expected(
        lambda r: r["category"] == "climate" and Decimal(r["price"]) >= 1)


async def test_large_facet_sets_are_estimated_from_a_sample_and_small_ones_counted(client, db, monkeypatch):
    seller = await register_seller(client)
    await insert_filler(db, uuid.UUID(seller["user"]["id"]))  # 3000 pods, ANALYZEd: reltuples is exact
    # A sample of about 400 of the 3000 rows stands in for 10,000 of a million.
    monkeypatch.setattr(queries, "FACET_SAMPLE_ROWS", 400)

    everything = await get(client, "/api/v1/datapods/facets")
    assert everything["estimated"] is True
    # Every sampled row matches, so the total scales to the table's rows exactly.
    assert everything["total"] == 3000 and everything["categories"] == [{"category": "climate", "count": 3000}]
    bands = {b["band"]: b["count"] for b in everything["price_bands"]}
    truth = {"free": 100, "under_1": 0, "1_to_5": 400, "5_to_20": 1500, "20_plus": 1000}  # prices i % 30
    assert bands["under_1"] == 0 and abs(sum(bands.values()) - 3000) <= len(bands)
    for band, count in truth.items():
        assert abs(bands[band] - count) <= 0.5 * count, (band, bands)
    worded = await get(client, "/api/v1/datapods/facets", {"q": "pod"})  # full text is sampled too
    assert worded["estimated"] is True and worded["total"] == 3000

    # Ten matches: too few to sample, so they are counted, exactly.
    rare = await get(client, "/api/v1/datapods/facets", {"column": "col7"})
    assert rare["estimated"] is False and rare["total"] == 10
    assert rare["categories"] == [{"category": "climate", "count": 10}]
    assert (await get(client, "/api/v1/datapods/facets", {"column_type": "boolean"}))["total"] == 0

    monkeypatch.setattr(queries, "FACET_SAMPLE_ROWS", 10_000)  # more than the table: read whole, exact
    exact = await get(client, "/api/v1/datapods/facets")
    assert exact["estimated"] is False and {b["band"]: b["count"] for b in exact["price_bands"]} == truth


async def search_order(client, params: dict, limit: int) -> list[str]:
    """Every pod id a search lists, in order, page after page of `limit`."""
    found: list[str] = []
    params = {**params, "limit": str(limit)}
    while True:
        page = await get(client, "/api/v1/datapods", params)
        assert len(page["items"]) == limit or page["next_cursor"] is None, page
        found += [item["id"] for item in page["items"]]
        if page["next_cursor"] is None:
            return found
        params["cursor"] = page["next_cursor"]


async def test_pages_are_exact_whichever_way_the_search_reads(client, db, monkeypatch):
    seller = await register_seller(client)
    await db.execute(
        """INSERT INTO datapods (seller_id, title, category, price_sui, walrus_blob_id, encryption_key_hash,
               encryption_iv, wrapped_key, schema, published, purchase_count, created_at)
           SELECT $1, CASE WHEN i % 40 = 0 THEN 'Rare zephyr ' ELSE 'Common ledger ' END || i,
                  (ARRAY['climate', 'finance', 'transport'])[1 + i % 3], (i * 7) % 50 / 4.0, 'window-' || i,
                  repeat('0', 64), repeat('0', 24), 'x',
                  jsonb_build_object('columns', jsonb_build_array(jsonb_build_object(
                      'name', CASE WHEN i % 9 = 0 THEN 'Yield' ELSE 'date' END, 'type', 'number'))),
                  i % 11 <> 0, i % 13, now() - make_interval(mins => i % 50)
             FROM generate_series(1, 240) i""", uuid.UUID(seller["user"]["id"]))
    await db.execute("ANALYZE datapods")
    # Tiny windows, so 240 pods take every way: a window that fills the page, one widened by the
    # density it saw, matches-first when a window finds none, and windows that run out at the end.
    monkeypatch.setattr(queries, "SEARCH_WINDOW_FIRST", 4)
    monkeypatch.setattr(queries, "SEARCH_WINDOW_MAX", 12)
    ways: Counter = Counter()
    for name in ("window_sql", "search_sql"):
        monkeypatch.setattr(queries, name, lambda *args, _build=getattr(queries, name), _name=name: (
            ways.update([_name]), _build(*args))[1])

    cases = [  # the API's parameters, and the same search in plain SQL
        ({}, "true", "created_at DESC, id DESC"),
        ({"q": "ledger"}, "search_vector @@ plainto_tsquery('english', 'ledger')", "created_at DESC, id DESC"),
        ({"q": "zephyr"}, "search_vector @@ plainto_tsquery('english', 'zephyr')", "created_at DESC, id DESC"),
        ({"q": "zephyr", "category": "finance", "sort": "price"},
         "search_vector @@ plainto_tsquery('english', 'zephyr') AND category = 'finance'", "price_sui, id"),
        ({"category": "transport", "sort": "price"}, "category = 'transport'", "price_sui, id"),
        ({"min_price": "3", "max_price": "4", "sort": "rating"}, "price_sui BETWEEN 3 AND 4",
         "average_rating DESC, id DESC"),  # every rating is 0: the id alone orders
        ({"column": "yield", "sort": "sales", "order": "asc"},
         "schema -> 'columns' @> '[{\"name\": \"Yield\"}]'", "purchase_count, id"),
        ({"q": "ledger", "category": "climate", "sort": "price", "order": "desc", "min_price": "2"},
         "search_vector @@ plainto_tsquery('english', 'ledger') AND category = 'climate' AND price_sui >= 2",
         "price_sui DESC, id DESC"),
    ]
    for params, where, order in cases:
        expected = [str(r["id"]) for r in await db.fetch(
            f"SELECT id FROM datapods WHERE published AND deleted_at IS NULL AND {where} ORDER BY {order}")]
        assert expected, params
        for limit in (1, 7, 100):
            assert await search_order(client, params, limit) == expected, (params, limit)
    assert ways["window_sql"] and ways["search_sql"], ways


# --- schema filters ---------------------------------------------------------------------------


async def test_schema_column_and_type_filters(client, db, sockets):
    seller = await register_seller(client)
    seller_id = uuid.UUID(seller["user"]["id"])
    temp_number = await insert_pod(db, seller_id, "A", cols=columns("Temperature:number", "city:string"))
    temp_string = await insert_pod(db, seller_id, "B", cols=columns("temperature:string", "count:integer"))
    flags = await insert_pod(db, seller_id, "C", cols=columns("rainy:boolean", "TEMPERATUREX:number"))
    draft = await insert_pod(db, seller_id, "D", published=False, cols=columns("temperature:number"))
    await insert_pod(db, seller_id, "E", cols=[])
    ids = {name: str(pod) for name, pod in
           {"a": temp_number, "b": temp_string, "c": flags, "draft": draft}.items()}

    assert await search_ids(client, {"column": "temperature"}) == {ids["a"], ids["b"]}  # whole name, any case
    assert await search_ids(client, {"column": "TEMPERATURE"}) == {ids["a"], ids["b"]}
    assert await search_ids(client, {"column_type": "number"}) == {ids["a"], ids["c"]}
    assert await search_ids(client, {"column_type": "boolean"}) == {ids["c"]}
    # Together they describe one column: B has a temperature column and an integer one, not both in one.
    assert await search_ids(client, {"column": "temperature", "column_type": "number"}) == {ids["a"]}
    assert await search_ids(client, {"column": "temperature", "column_type": "integer"}) == set()
    assert await search_ids(client, {"column": "count", "column_type": "integer", "category": "climate"}) == {
        ids["b"]}
    # Drafts only for their seller, on the seller's own listing.
    assert await search_ids(client, {"column": "temperature", "column_type": "number"},
                            path="/api/v1/seller/datapods", user=seller) == {ids["a"], ids["draft"]}
    assert ids["draft"] not in await search_ids(client, {"column_type": "number"},
                                                user=await register(client))

    sock = sockets()
    await sock.connect(server_url(client), "/marketplace")
    ack = await sock.call("/marketplace", "search_datapods", {"column": "Temperature", "column_type": "number"})
    assert ack["ok"] and [item["id"] for item in ack["data"]["items"]] == [ids["a"]]


async def insert_filler(db, seller_id: uuid.UUID, count: int = 3000) -> None:
    """Many published pods, each with two of 300 column names (any one name is rare), then ANALYZE."""
    await db.execute(
        """INSERT INTO datapods (seller_id, title, category, price_sui, walrus_blob_id, encryption_key_hash,
               encryption_iv, wrapped_key, schema, published)
           SELECT $1, 'pod ' || md5(i::text), 'climate', i % 30, 'blob' || i, repeat('0', 64), repeat('0', 24),
                  'x', jsonb_build_object('columns', jsonb_build_array(
                      jsonb_build_object('name', 'Col' || (i % 300), 'type', 'number', 'null_count', 0),
                      jsonb_build_object('name', 'other' || (i % 150), 'type', 'string', 'null_count', 0))),
                  true
             FROM generate_series(1, $2) i""", seller_id, count)
    await db.execute("ANALYZE datapods")


async def _plan(db, sql: str, params: list, *, hint: bool = True) -> str:
    async with db.transaction():
        if hint:
            await db.execute("SET LOCAL enable_seqscan = off")
        return "\n".join(row[0] for row in await db.fetch(f"EXPLAIN {sql}", *params))


async def test_the_schema_filters_use_the_gin_index(client, db):
    seller = await register_seller(client)
    seller_id = uuid.UUID(seller["user"]["id"])
    await insert_filler(db, seller_id)
    for search in (queries.SearchFilter(column="col7", limit=21),
                   queries.SearchFilter(column="COL7", column_type="number", limit=21, sort="price"),
                   queries.SearchFilter(column_type="string", column="other3", category="climate", limit=21)):
        for build in (queries.search_sql, queries.facets_sql):
            sql, params = build(search)
            plan = await _plan(db, sql, params)
            assert "idx_datapods_schema_columns" in plan, plan
    # Without hints too, for a rare name the planner itself prefers the index.
    sql, params = queries.facets_sql(queries.SearchFilter(column="col7"))
    assert "idx_datapods_schema_columns" in await _plan(db, sql, params, hint=False)
    assert len(await search_ids(client, {"column": "col7"})) == 10


# --- typo tolerance ---------------------------------------------------------------------------


async def test_typos_fall_back_to_trigram_similarity_on_titles(client, db):
    assert await db.fetchval("SELECT count(*) FROM pg_extension WHERE extname = 'pg_trgm'") == 1
    seller = await register_seller(client)
    seller_id = uuid.UUID(seller["user"]["id"])
    weather = str(await insert_pod(db, seller_id, "Daily weather observations", category="climate"))
    await insert_pod(db, seller_id, "Stock prices", category="finance", description="Closing prices per day")
    await insert_pod(db, seller_id, "Weather draft", published=False)
    leather = str(await insert_pod(db, seller_id, "Leather goods exports", category="trade"))

    exact = await get(client, "/api/v1/datapods", {"q": "weather"})
    assert [i["id"] for i in exact["items"]] == [weather] and exact["fuzzy"] is False
    typo = await get(client, "/api/v1/datapods", {"q": "wether"})
    assert typo["fuzzy"] is True and {i["id"] for i in typo["items"]} == {weather}
    assert leather not in {i["id"] for i in typo["items"]}
    # Filters still apply, and the facets count what the search lists.
    assert (await get(client, "/api/v1/datapods", {"q": "wether", "category": "finance"}))["items"] == []
    facets = await get(client, "/api/v1/datapods/facets", {"q": "wether"})
    assert facets["fuzzy"] is True and facets["total"] == 1 and facets["categories"] == [
        {"category": "climate", "count": 1}]
    assert (await get(client, "/api/v1/datapods", {"q": "qzxvkj"}))["items"] == []
    # Pages of a fuzzy search keep the fuzzy mode (the cursor carries no flag).
    for i in range(3):
        await insert_pod(db, seller_id, f"Weather station {i}")
    first = await get(client, "/api/v1/datapods", {"q": "wether", "limit": "2"})
    second = await get(client, "/api/v1/datapods", {"q": "wether", "limit": "2", "cursor": first["next_cursor"]})
    assert first["fuzzy"] and second["fuzzy"] and len(first["items"]) == len(second["items"]) == 2
    assert not {i["id"] for i in first["items"]} & {i["id"] for i in second["items"]}

    # With many other pods, the similarity queries use the trigram index.
    await insert_filler(db, seller_id)
    for build in (queries.search_sql, queries.facets_sql):
        sql, params = build(queries.SearchFilter(q="wether", fuzzy=True, limit=21))
        async with db.transaction():
            await queries.set_similarity_threshold(db)
            await db.execute("SET LOCAL enable_seqscan = off")
            plan = "\n".join(r[0] for r in await db.fetch(f"EXPLAIN {sql}", *params))
        assert "idx_datapods_title_trgm" in plan, plan
    assert len(await search_ids(client, {"q": "wether"})) == 4


async def test_without_pg_trgm_search_stays_full_text(client, db):
    seller = await register_seller(client)
    await insert_pod(db, uuid.UUID(seller["user"]["id"]), "Daily weather observations")
    await db.execute("DROP EXTENSION pg_trgm CASCADE")  # as on a server without contrib
    typo = await get(client, "/api/v1/datapods", {"q": "wether"})
    assert typo == {"items": [], "next_cursor": None, "fuzzy": False}
    assert (await get(client, "/api/v1/datapods/facets", {"q": "wether"}))["total"] == 0
    assert len((await get(client, "/api/v1/datapods", {"q": "weather"}))["items"]) == 1


# --- more like this ---------------------------------------------------------------------------


async def test_more_like_this_orders_by_the_documented_score(client, db, sockets):
    seller = await register_seller(client)
    seller_id = uuid.UUID(seller["user"]["id"])
    cols = columns("date:string", "city:string", "temp_c:number")
    source = await insert_pod(db, seller_id, "Oslo daily weather", description="Rain and temperature",
                              tags=["weather", "rain"], cols=cols)
    # Same category, both tags, all three columns, most words: 3 + 2*2 + 3 + text.
    twin = await insert_pod(db, seller_id, "Bergen daily weather", description="Rain and temperature",
                            tags=["Weather", "rain"], cols=columns("Date:string", "city:string", "temp_c:number"))
    # Same category and one tag, nothing else: 3 + 2 = 5.
    cousin = await insert_pod(db, seller_id, "Market ticks", description="Order book", tags=["weather"],
                              cols=columns("symbol:string"))
    # Another category, one shared column: 1.
    distant = await insert_pod(db, seller_id, "Bus timetable", category="transport", description="Stops",
                               cols=columns("city:string", "line:integer"))
    # Another category, only words in common: 4 * 2/6 (daili, weather shared of 6 distinct lexemes).
    wordy = await insert_pod(db, seller_id, "Daily weather poems", category="arts", cols=columns("verse:string"))
    unrelated = await insert_pod(db, seller_id, "Bird sightings", category="nature", cols=columns("species:string"))
    draft = await insert_pod(db, seller_id, "Oslo daily weather", description="Rain and temperature",
                             tags=["weather", "rain"], cols=cols, published=False)

    data = await get(client, f"/api/v1/datapods/{source}/similar")
    order = [item["id"] for item in data["items"]]
    assert order == [str(twin), str(cousin), str(wordy), str(distant)]
    scores = [item["score"] for item in data["items"]]
    # Words are English lexemes of title and description: oslo daili weather rain temperatur.
    assert scores[0] == pytest.approx(3 + 2 * 2 + 3 + 4 * 4 / 6, abs=1e-4)  # bergen for oslo: 4 shared of 6
    assert scores[1] == 5 and scores[2] == pytest.approx(4 * 2 / 6, abs=1e-4) and scores[3] == 1
    assert str(unrelated) not in order and str(draft) not in order and str(source) not in order
    assert [i["id"] for i in (await get(client, f"/api/v1/datapods/{source}/similar", {"limit": "1"}))[
        "items"]] == [str(twin)]

    # A draft's seller may ask about it; nobody else sees it.
    assert (await get(client, f"/api/v1/datapods/{draft}/similar", user=seller))["items"][0]["id"] == str(source)
    stranger = await register(client)
    assert (await get(client, f"/api/v1/datapods/{draft}/similar", user=stranger, status=404))["code"] == "not_found"
    await get(client, f"/api/v1/datapods/{uuid.uuid4()}/similar", status=404)

    sock = sockets()
    await sock.connect(server_url(client), "/marketplace")
    ack = await sock.call("/marketplace", "similar_datapods", {"datapod_id": str(source), "limit": 2})
    assert ack["ok"] and [i["id"] for i in ack["data"]["items"]] == [str(twin), str(cousin)]


async def test_more_like_this_scores_bounded_candidates_found_through_indexes(client, db, monkeypatch):
    # At a million pods scoring every one took 46 s: only pods sharing the category (its best
    # sellers), words or columns are scored, at most SIMILAR_CANDIDATES found each way.
    seller = await register_seller(client)
    seller_id = uuid.UUID(seller["user"]["id"])
    source = await insert_pod(db, seller_id, "Oslo rain", cols=columns("mm:number"))
    by_sales = [await insert_pod(db, seller_id, f"Pod {name}", cols=columns(f"{name}:string"), purchase_count=sales)
                for name, sales in (("alpha", 9), ("bravo", 7), ("charlie", 5), ("delta", 3))]
    wordy = await insert_pod(db, seller_id, "Bergen rain", category="arts", cols=columns("verse:string"))
    columnar = await insert_pod(db, seller_id, "Tide table", category="ocean", cols=columns("MM:number"))

    async def similar() -> list[str]:
        return [i["id"] for i in (await get(client, f"/api/v1/datapods/{source}/similar", {"limit": "20"}))["items"]]

    everything = await similar()
    assert set(everything) == {str(p) for p in [*by_sales, wordy, columnar]}  # all found, all scored
    monkeypatch.setattr(queries, "SIMILAR_CANDIDATES", 2)
    bounded = await similar()
    # The category's two best sellers, the pod sharing a word and the one sharing a column.
    assert set(bounded) == {str(by_sales[0]), str(by_sales[1]), str(wordy), str(columnar)}


# --- bad parameters ---------------------------------------------------------------------------


@pytest.mark.parametrize("path, params", [
    ("/api/v1/datapods", {"column_type": "date"}),
    ("/api/v1/datapods", {"column": ""}),
    ("/api/v1/datapods", {"column": "a\u0001b"}),
    ("/api/v1/datapods", {"column": "x" * 201}),
    ("/api/v1/datapods/facets", {"sort": "price"}),
    ("/api/v1/datapods/facets", {"cursor": "abc"}),
    ("/api/v1/datapods/facets", {"unknown": "1"}),
    ("/api/v1/datapods/facets", {"q": "x" * 201}),
    ("/api/v1/datapods/facets", {"min_price": "5", "max_price": "1"}),
    ("/api/v1/datapods/facets", {"column_type": "NUMBER"}),
    ("/api/v1/datapods/{id}/similar", {"limit": "0"}),
    ("/api/v1/datapods/{id}/similar", {"limit": "21"}),
    ("/api/v1/datapods/{id}/similar", {"limit": "two"}),
    ("/api/v1/datapods/{id}/similar", {"q": "weather"}),
])
async def test_bad_parameters_are_refused(client, db, path, params):
    seller = await register_seller(client)
    pod = await insert_pod(db, uuid.UUID(seller["user"]["id"]), "Daily weather")
    error = await get(client, path.replace("{id}", str(pod)), params, status=400)
    assert error["code"] == "invalid_payload"


async def test_bad_socket_payloads_are_refused(client, sockets):
    sock = sockets()
    await sock.connect(server_url(client), "/marketplace")
    for event, payload in (("datapod_facets", {"column_type": "date"}), ("datapod_facets", {"limit": 5}),
                           ("similar_datapods", {}), ("similar_datapods", {"datapod_id": "x"}),
                           ("similar_datapods", {"datapod_id": str(uuid.uuid4()), "limit": 50})):
        ack = await sock.call("/marketplace", event, payload)
        assert not ack["ok"] and ack["error"]["code"] == "invalid_payload", (event, payload, ack)
