"""REST at scale: search, facets, DataPod detail, "more like this" and a buyer's history over a million DataPods.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres .venv/bin/python bench/rest_scale.py
    .venv/bin/python bench/rest_scale.py --datapods 1000000 --requests 400 [--keep NAME | --reuse NAME]

Seeds a fresh database on the DATABASE_URL server (1,000 sellers, `--datapods` DataPods with
titles, descriptions, categories, prices, column schemas, ratings and dates drawn from fixed word
lists; 95% published; one buyer with 500 completed purchases), starts one real server process on
it, and then for each endpoint sends `--requests` requests one after another (a keep-alive HTTP
connection), and runs the very same SQL, through the same functions the service calls
(server/services/marketplace.py `find` and `count_facets`: a search may read a window and then
the matches, and fall back to titles by similarity; db/ for detail and history), on one asyncpg
connection in the same run. It prints p50/p99 of both and what the endpoint adds (HTTP parsing,
auth, validation, the pool, JSON). Targets (issue 21): the endpoint adds <= 2 ms at p99; search
p99 < 25 ms.

Seeding a million rows (generated tsvector, GIN and trigram indexes) takes about three minutes on
two cores: `--keep NAME` leaves the database behind under that name (a generated one without
NAME), `--reuse NAME` measures it again without seeding (the server migrates it to the current
schema first). Drop it afterwards: `DROP DATABASE NAME`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import itertools
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Awaitable, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp  # noqa: E402
import asyncpg  # noqa: E402

from bench.rewards import admin, free_port, percentile, start_server, stop_server, wait_ready, with_database  # noqa: E402
from db import marketplace as pod_queries  # noqa: E402
from db import purchases as purchase_queries  # noqa: E402
from db import seller as seller_queries  # noqa: E402
from server.services.marketplace import count_facets, find, search_filter  # noqa: E402

WORDS = ["weather", "stock", "crypto", "traffic", "energy", "health", "retail", "sports", "climate", "census",
         "housing", "flight", "shipping", "music", "movie", "genome", "satellite", "election", "crime",
         "education", "yield", "price", "sensor", "transit", "ocean"]
CATEGORIES = ["finance", "weather", "health", "transport", "energy", "retail", "sports", "science", "government",
              "media"]
CHUNK = 100_000

# The searches a marketplace page sends: words, a category, a price band, sorts, a column filter.
SEARCHES: list[dict[str, Any]] = [
    {"q": "weather"},
    {"q": "stock price", "category": "finance"},
    {"q": "energy", "min_price": "5", "max_price": "20", "sort": "price"},
    {"category": "health", "sort": "rating"},
    {"q": "satellite ocean"},
    {"column": "yield"},
    {"q": "traffic", "sort": "newest"},
    {"min_price": "1", "max_price": "2"},
]


async def seed(dsn: str, datapods: int) -> None:
    """Sellers, DataPods in chunks (printing progress), then ANALYZE."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            """INSERT INTO users (username, email, password_hash)
               SELECT 'seller_' || n, 'seller_' || n || '@example.org', 'not-a-login'
               FROM generate_series(1, 1000) n""")
        started = time.monotonic()
        for first in range(1, datapods + 1, CHUNK):
            last = min(first + CHUNK - 1, datapods)
            await conn.execute(
                """WITH sellers AS (SELECT array_agg(id ORDER BY username) AS ids FROM users
                                    WHERE username LIKE 'seller\\_%')
                   INSERT INTO datapods (seller_id, title, description, category, price_sui, walrus_blob_id,
                                         walrus_storage_size, encryption_key_hash, encryption_iv, file_type,
                                         file_size, schema, published, purchase_count, average_rating, created_at,
                                         wrapped_key)
                   SELECT sellers.ids[1 + n % 1000],
                          initcap(($1::text[])[1 + (n * 7) % 25] || ' ' || ($1::text[])[1 + (n * 13) % 25]) || ' ' || n,
                          'Daily ' || ($1::text[])[1 + (n * 3) % 25] || ' records with '
                            || ($1::text[])[1 + (n * 11) % 25] || ' and ' || ($1::text[])[1 + (n * 17) % 25]
                            || ' measurements',
                          ($2::text[])[1 + n % 10],
                          round((random() * 50)::numeric, 2),
                          'bench-blob-' || n, 1000 + n % 100000, md5(n::text) || md5(n::text),
                          substr(md5(n::text), 1, 24), 'text/csv', 1000 + (n::bigint * 7919) % 100000000,
                          jsonb_build_object('format', 'csv', 'row_count', (n::bigint * 104729) % 1000000,
                              'columns', jsonb_build_array(
                                  jsonb_build_object('name', ($1::text[])[1 + (n * 5) % 25], 'type', 'number'),
                                  jsonb_build_object('name', 'date', 'type', 'string'))),
                          n % 20 <> 0, n % 97, round(((n % 500) / 100.0)::numeric, 2),
                          now() - make_interval(mins => n), 'bench: no key'
                   FROM generate_series($3::int, $4::int) n, sellers""", WORDS, CATEGORIES, first, last)
            print(f"  seeded {last:,} DataPods ({time.monotonic() - started:.0f} s)", flush=True)
        await conn.execute("ANALYZE")
    finally:
        await conn.close()


async def buyer(url: str, dsn: str) -> tuple[str, uuid.UUID]:
    """A buyer registered through the API, with 500 completed purchases written straight to the database."""
    name = f"buyer{uuid.uuid4().hex[:8]}"
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}/api/v1/auth/register", json={
                "username": name, "email": f"{name}@example.org", "password": "correct horse battery"}) as response:
            body = await response.json()
            assert response.status == 201, body
    user_id = uuid.UUID(body["data"]["user"]["id"])
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            """INSERT INTO purchases (buyer_id, datapod_id, payment_tx_digest, amount_sui, status, completed_at,
                                      created_at)
               SELECT $1, id, 'bench-' || id, price_sui, 'completed', now(), now() - make_interval(mins => n::int)
               FROM (SELECT id, price_sui, row_number() OVER () AS n FROM datapods WHERE published LIMIT 500) picked""",
            user_id)
    finally:
        await conn.close()
    return body["data"]["token"], user_id


async def timed(calls: int, one: Callable[[int], Awaitable[Any]]) -> list[float]:
    """Latencies (ms) of `calls` sequential calls of `one(i)`."""
    latencies = []
    for i in range(calls):
        start = time.perf_counter()
        await one(i)
        latencies.append((time.perf_counter() - start) * 1000)
    return latencies


def summary(latencies: list[float]) -> tuple[float, float]:
    return statistics.median(latencies), percentile(latencies, 0.99)


async def measure(url: str, dsn: str, token: str, buyer_id: uuid.UUID, requests: int) -> list[dict[str, Any]]:
    """Each endpoint and its SQL, interleaved per endpoint so both see the same cache state."""
    conn = await asyncpg.connect(dsn)
    headers = {"Authorization": f"Bearer {token}"}
    pods = [row["id"] for row in await conn.fetch(
        "SELECT id FROM datapods WHERE published ORDER BY random() LIMIT 200")]
    cycle = list(itertools.islice(itertools.cycle(SEARCHES), requests))
    facet_cycle = [{key: value for key, value in search.items() if key != "sort"} for search in cycle]
    results = []
    try:
        async with aiohttp.ClientSession(headers=headers) as http:
            async def get(path: str, params: dict[str, Any] | None = None) -> None:
                async with http.get(url + path, params=params) as response:
                    await response.read()
                    assert response.status == 200, (path, params, response.status)

            # The statements the service runs for one request (a search may take two ways, and falls
            # back to titles by similarity), so "added" is what HTTP, validation, the pool and JSON add.
            async def search_sql(i: int) -> None:
                await find(conn, search_filter(cycle[i]))

            async def facets_sql(i: int) -> None:
                await count_facets(conn, search_filter(facet_cycle[i]))

            async def detail_sql(i: int) -> None:
                await pod_queries.get_datapod(conn, pods[i % len(pods)])
                await seller_queries.count_view(conn, pods[i % len(pods)])

            async def history_sql(i: int) -> None:
                await purchase_queries.list_purchases(conn, buyer_id, limit=21)

            async def similar_sql(i: int) -> None:
                await pod_queries.get_datapod(conn, pods[i % len(pods)])  # the visibility check
                await pod_queries.similar_datapods(conn, pods[i % len(pods)], 6)

            cases = [
                ("search", lambda i: get("/api/v1/datapods", cycle[i]), search_sql),
                ("facets", lambda i: get("/api/v1/datapods/facets", facet_cycle[i]), facets_sql),
                ("DataPod detail", lambda i: get(f"/api/v1/datapods/{pods[i % len(pods)]}"), detail_sql),
                ("buyer history", lambda i: get("/api/v1/purchases", {"limit": "20"}), history_sql),
                ("more like this", lambda i: get(f"/api/v1/datapods/{pods[i % len(pods)]}/similar"), similar_sql),
            ]
            for name, endpoint, sql in cases:
                await timed(20, endpoint)  # warm-up: plans cached, pages in memory
                await timed(20, sql)
                endpoint_ms = await timed(requests, endpoint)
                sql_ms = await timed(requests, sql)
                results.append({"name": name, "endpoint": summary(endpoint_ms), "sql": summary(sql_ms)})
    finally:
        await conn.close()
    return results


def report(results: list[dict[str, Any]], datapods: int, requests: int) -> None:
    print(f"\n{datapods:,} DataPods, {requests} sequential requests per endpoint (load average "
          f"{os.getloadavg()[0]:.2f})")
    header = f"{'endpoint':<16}{'p50':>9}{'p99':>9}{'SQL p50':>10}{'SQL p99':>10}{'added p50':>11}{'added p99':>11}"
    print(header)
    print("-" * len(header))
    for r in results:
        (e50, e99), (s50, s99) = r["endpoint"], r["sql"]
        print(f"{r['name']:<16}{e50:>7.2f}ms{e99:>7.2f}ms{s50:>8.2f}ms{s99:>8.2f}ms{e50 - s50:>9.2f}ms"
              f"{e99 - s99:>9.2f}ms")
    search = next(r for r in results if r["name"] == "search")
    added = max(r["endpoint"][1] - r["sql"][1] for r in results)
    print(f"targets: endpoint adds <= 2 ms at p99: {'met' if added <= 2 else 'NOT met'} (worst {added:.2f} ms); "
          f"search p99 < 25 ms: {'met' if search['endpoint'][1] < 25 else 'NOT met'} "
          f"({search['endpoint'][1]:.2f} ms)")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datapods", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--keep", nargs="?", const="", metavar="NAME",
                        help="keep the seeded database, named NAME if given (its name is printed)")
    parser.add_argument("--reuse", metavar="NAME", help="measure a database kept by --keep, without seeding")
    args = parser.parse_args()
    admin_dsn = os.environ.get("DATABASE_URL")
    if not admin_dsn:
        raise SystemExit("set DATABASE_URL to a PostgreSQL server where the bench may create a database")
    name = args.reuse or args.keep or f"hub_bench_rest_{uuid.uuid4().hex[:8]}"
    dsn = with_database(admin_dsn, name)
    if not args.reuse:
        await admin(admin_dsn, f'CREATE DATABASE "{name}"')
    # A kept database holds the server's wallets wrapped under its MASTER_KEY: every run on it must
    # use the same keys, derived from its name (bench data only).
    for variable in ("JWT_SECRET", "MASTER_KEY"):
        os.environ[variable] = base64.urlsafe_b64encode(hashlib.sha256(f"{variable}:{name}".encode()).digest()).decode()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="hub-bench-rest-") as tmp:
        process = start_server(dsn, port, Path(tmp), Path(tmp) / "server.log", None)
        try:
            await wait_ready(url, process)  # the server migrates the new database on start
            if not args.reuse:
                print(f"seeding {args.datapods:,} DataPods into {name}", flush=True)
                await seed(dsn, args.datapods)
            token, buyer_id = await buyer(url, dsn)
            results = await measure(url, dsn, token, buyer_id, args.requests)
        finally:
            stop_server(process)
            if args.keep is not None or args.reuse:
                print(f"database kept: {name} (--reuse {name})")
            else:
                await admin(admin_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    report(results, args.datapods, args.requests)


if __name__ == "__main__":
    asyncio.run(main())
