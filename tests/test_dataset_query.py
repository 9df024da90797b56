"""Ask your data, on the real server and database with really bought datasets: the owner's SELECT,
the refused statements and file/URL reads, the time and row limits, who may query, the built-in
questions without a model, and a scripted model calling `query_dataset`."""

from __future__ import annotations

import csv
import io
import time
import uuid

import pytest

from db.pool import POOL
from server.adapters.blobs import BLOBS
from server.app import create_app
from server.core.crypto import MASTER_KEY
from server.services import assistant_intents as intents
from server.services.dataset_query import QueryResult, builtin_answer, markdown_cell
from tests.helpers import register
from tests.test_assistant import delta_text, events, scripted, sign_in, wait_finished
from tests.test_purchases import DATASET, auth, buy, make_pod, people

pytestmark = pytest.mark.usefixtures("chain_verified")

WEATHER = (b"date,city,temp_c,condition\n"
           b"2026-01-01,Berlin,3.5,rain\n"
           b"2026-01-01,Lagos,29.0,sun\n"
           b"2026-01-02,Berlin,-1.5,snow\n"
           b"2026-01-02,Lagos,30.5,sun\n"
           b"2026-01-03,Berlin,4.0,light rain\n"
           b"2026-01-03,Nairobi,,\n")
SLOW = "SELECT sum(a.range * b.range) FROM range(200000) a, range(200000) b"  # 4e10 products, little memory
GREEDY = "SELECT sum(a.range * b.range) FROM range(100000000) a, range(100000000) b"  # 800 MB for one side


def csv_rows(data: bytes) -> list[list]:
    """The uploaded CSV's data rows as the sandbox types them (city text, temp_c a number)."""
    reader = csv.reader(io.StringIO(data.decode()))
    next(reader)
    return [[city, float(temp)] for city, temp in reader]


@pytest.fixture
async def hub(fast, aiohttp_client):
    """The real app; a short query time limit, and a per-user limit these tests stay under."""
    return await aiohttp_client(create_app(fast.replace(dataset_query_timeout=1.0, dataset_queries_per_minute=500)))


async def query(hub, user: dict | None, pod, sql: str):
    response = await hub.post(f"/api/v1/datapods/{pod}/query", json={"sql": sql},
                              headers=auth(user) if user else {})
    return response.status, await response.json()


async def test_the_buyer_and_the_seller_query_the_dataset_and_nobody_else(hub, db):
    seller, buyer, seller_id, buyer_id, pod = await people(hub, db)
    await buy(hub, db, buyer, buyer_id, seller_id, pod)
    expected = csv_rows(DATASET)

    status, body = await query(hub, buyer, pod, "SELECT city, temp_c FROM data "
                                                "WHERE city IN ('Lagos', 'Berlin') OR city LIKE 'row1999_' "
                                                "ORDER BY temp_c DESC, city")
    assert status == 200, body
    result = body["data"]
    wanted = [row for row in expected if row[0] in ("Lagos", "Berlin") or
              (row[0].startswith("row1999") and len(row[0]) == 8)]
    assert len(wanted) == 12
    assert result["columns"] == ["city", "temp_c"] and result["truncated"] is False
    assert result["rows"] == sorted(wanted, key=lambda row: (-row[1], row[0]))
    assert isinstance(result["elapsed_ms"], float)

    status, body = await query(hub, buyer, pod, "WITH t AS (SELECT * FROM data) SELECT count(*) AS n, "
                                                "round(sum(temp_c), 1) AS total FROM t;")
    assert status == 200 and body["data"]["columns"] == ["n", "total"]
    assert body["data"]["rows"][0][0] == len(expected)
    assert body["data"]["rows"][0][1] == pytest.approx(sum(r[1] for r in expected), abs=0.1)

    # The row limit: the first 200 rows in file order, and truncated.
    status, body = await query(hub, buyer, pod, "FROM data")
    assert status == 200 and body["data"]["truncated"] is True and body["data"]["rows"] == expected[:200]

    # The seller queries their own pod without buying it.
    status, body = await query(hub, seller, pod, "SELECT max(city) FROM data WHERE city LIKE 'B%'")
    assert status == 200 and body["data"]["rows"] == [["Berlin"]]

    # Anyone else: forbidden; a pod the buyer never bought: forbidden; no such pod: not found.
    stranger = await register(hub)
    status, body = await query(hub, stranger, pod, "SELECT 1")
    assert status == 403 and body["error"]["code"] == "forbidden" and body["error"]["field"] == "datapod_id"
    other = await make_pod(db, hub.app[BLOBS], hub.app[MASTER_KEY], seller_id, title="Never bought")
    status, body = await query(hub, buyer, other, "SELECT count(*) FROM data")
    assert status == 403 and body["error"]["code"] == "forbidden"
    status, body = await query(hub, buyer, uuid.uuid4(), "SELECT 1")
    assert status == 404 and body["error"]["code"] == "not_found"
    status, body = await query(hub, None, pod, "SELECT 1")
    assert status == 401
    status, body = await query(hub, buyer, pod, "x" * 10_001)
    assert status == 400 and body["error"]["code"] == "invalid_payload"


REFUSED = [
    ("INSERT INTO data VALUES ('Oslo', 1.0)", "INSERT"),
    ("CREATE TABLE stolen AS SELECT * FROM data", "CREATE"),
    ("COPY data TO '{tmp}/leak.csv'", "COPY"),
    ("ATTACH '{tmp}/leak.duckdb' AS leak", "ATTACH"),
    ("INSTALL httpfs", "LOAD"),
    ("LOAD httpfs", "LOAD"),
    ("SET enable_external_access = true", "SET"),
    ("PRAGMA version", "PRAGMA"),
    ("DROP TABLE data", "DROP"),
    ("SELECT 1; SELECT 2", None),
    ("SELECT 1; COPY data TO '{tmp}/leak.csv'", None),
    ("SELEC city FROM data", None),
]
UNREADABLE = [
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_text('/etc/hostname')",
    "SELECT * FROM read_parquet('http://127.0.0.1:9/data.parquet')",
    "SELECT * FROM read_csv('https://example.org/data.csv')",
    "SELECT * FROM glob('/etc/*')",
    "WITH f AS (SELECT * FROM read_csv_auto('/etc/passwd')) SELECT count(*) FROM f",
]


async def test_anything_but_one_select_and_any_file_or_url_is_refused(hub, db, tmp_path):
    seller, buyer, seller_id, buyer_id, pod = await people(hub, db)
    await buy(hub, db, buyer, buyer_id, seller_id, pod)
    for sql, kind in REFUSED:
        status, body = await query(hub, buyer, pod, sql.format(tmp=tmp_path))
        assert status == 400, (sql, body)
        assert body["error"]["code"] == "invalid_payload" and body["error"]["field"] == "sql"
        if kind is not None:
            assert body["error"]["message"] == f"only a read-only SELECT is allowed, not {kind}", sql
    assert "(got 2)" in (await query(hub, buyer, pod, "SELECT 1; SELECT 2"))[1]["error"]["message"]
    assert not list(tmp_path.glob("leak*"))
    # Table functions reading files or URLs parse as SELECTs: external access being off stops them.
    for sql in UNREADABLE:
        status, body = await query(hub, buyer, pod, sql)
        assert status == 403, (sql, body)
        assert body["error"]["code"] == "forbidden" and body["error"]["field"] == "sql"
        assert "disabled by configuration" in body["error"]["message"]
        assert "root:" not in str(body)
    status, body = await query(hub, buyer, pod, "SELECT count(*) FROM data")
    assert status == 200 and body["data"]["rows"] == [[20_002]]


async def test_a_slow_query_is_interrupted_at_the_time_limit(hub, db):
    seller, buyer, seller_id, buyer_id, pod = await people(hub, db)
    await buy(hub, db, buyer, buyer_id, seller_id, pod)
    started = time.monotonic()
    status, body = await query(hub, buyer, pod, SLOW)
    elapsed = time.monotonic() - started
    assert status == 400, body
    assert body["error"]["reason"] == "timeout"
    assert body["error"]["message"] == "the query was stopped at its time limit of 1 s"
    assert elapsed < 15
    # The server is free again at once.
    status, body = await query(hub, buyer, pod, "SELECT min(temp_c) FROM data")
    assert status == 200 and body["data"]["rows"] == [[0.0]]


async def test_memory_and_queries_per_minute_are_limited(fast, aiohttp_client, db):
    # A time limit the memory check cannot reach first, even on a loaded machine.
    hub = await aiohttp_client(create_app(fast.replace(dataset_queries_per_minute=2, dataset_query_memory_mb=64,
                                                       dataset_query_timeout=60.0)))
    seller, buyer, seller_id, buyer_id, pod = await people(hub, db)
    await buy(hub, db, buyer, buyer_id, seller_id, pod)
    assert (await query(hub, buyer, pod, "SELECT 1"))[0] == 200
    # DATASET_QUERY_MEMORY_MB bounds a query's memory, and nothing spills to disk.
    status, body = await query(hub, buyer, pod, GREEDY)
    assert status == 400 and body["error"]["reason"] == "memory", body
    status, body = await query(hub, buyer, pod, "SELECT 1")
    assert status == 429 and body["error"]["code"] == "rate_limited" and body["error"]["retry_after"] > 0
    assert (await query(hub, seller, pod, "SELECT 1"))[0] == 200  # another user's own budget


async def test_builtin_questions_answer_from_the_whole_dataset(hub, db):
    seller, buyer, seller_id, buyer_id, _ = await people(hub, db)
    pod = await make_pod(db, hub.app[BLOBS], hub.app[MASTER_KEY], seller_id, plaintext=WEATHER,
                         title="Daily city weather")
    await buy(hub, db, buyer, buyer_id, seller_id, pod)
    user = uuid.UUID(buyer["user"]["id"])

    stats = await builtin_answer(hub.app, user, "stats of Daily city weather")
    assert stats is not None
    assert stats.startswith(f"Stats of **Daily city weather** (6 rows): [datapod:{pod}]\n\n")
    assert stats.split("\n\n", 1)[1] == "\n".join([
        "| column | type | count | nulls | distinct | min | max | avg |",
        "|---|---|---|---|---|---|---|---|",
        "| date | string | 6 | 0 | 3 |  |  |  |",
        "| city | string | 6 | 0 | 3 |  |  |  |",
        "| temp_c | number | 5 | 1 | 5 | -1.5 | 30.5 | 13.1 |",
        "| condition | string | 5 | 1 | 4 |  |  |  |"])

    top = await builtin_answer(hub.app, user, "What are the top values of City in the Daily City Weather dataset?")
    assert top is not None and top.startswith("Top values of `city` in **Daily city weather**")
    assert top.split("\n\n", 1)[1] == "| value | count |\n|---|---|\n| Berlin | 3 |\n| Lagos | 2 |\n| Nairobi | 1 |"

    rows = await builtin_answer(hub.app, user, f"rows matching rain in {pod}")
    assert rows is not None and rows.startswith("Rows of **Daily city weather** matching “rain”")
    assert rows.split("\n\n", 1)[1] == ("| date | city | temp_c | condition |\n|---|---|---|---|\n"
                                        "| 2026-01-01 | Berlin | 3.5 | rain |\n"
                                        "| 2026-01-03 | Berlin | 4.0 | light rain |")
    # The keyword is a bound value, and LIKE's wildcards in it are literal.
    none = await builtin_answer(hub.app, user, "rows matching %' OR 1=1 -- in Daily city weather")
    assert none is not None and none.endswith("*No rows.*")
    missing = await builtin_answer(hub.app, user, "top values of humidity in Daily city weather")
    assert missing is not None and "has no column `humidity`" in missing and "`temp_c`" in missing

    # Not data questions, or about a dataset the user does not hold: None (the router answers).
    assert await builtin_answer(hub.app, user, "Is there weather data for cities?") is None
    assert await builtin_answer(hub.app, user, "stats of Weather, Berlin & Lagos") is None
    stranger = uuid.UUID((await register(hub))["user"]["id"])
    assert await builtin_answer(hub.app, stranger, "stats of Daily city weather") is None
    # The seller asks about their own pod.
    assert (await builtin_answer(hub.app, seller_id, "stats of Daily city weather")) == stats

    # The no-model router asks the dataset first, for its holders only.
    async def tool(name, arguments, run):
        async with hub.app[POOL].acquire() as conn:
            return await run(conn)

    assert await intents.route(intents.Ask("stats of Daily city weather", user, tool, app=hub.app)) == (
        "ask_your_data", stats)
    routed, _ = await intents.route(intents.Ask("stats of Daily city weather", stranger, tool, app=hub.app))
    assert routed != "ask_your_data"


def test_markdown_tables_escape_and_cut_cells():
    result = QueryResult(columns=["a|b", "text"], rows=[["x|y", "line one\nline two"], [None, "z" * 100]],
                         truncated=True, elapsed_ms=1.0)
    assert result.to_markdown(max_cell_chars=20).split("\n") == [
        "| a\\|b | text |", "|---|---|", "| x\\|y | line one line two |", "|  | " + "z" * 19 + "… |",
        "", "*Showing the first 2 rows; there are more.*"]
    assert markdown_cell(True) == "true" and markdown_cell({"k": [1]}) == '{"k": [1]}'


async def test_the_model_queries_the_data_and_the_table_streams_into_the_answer(fast, aiohttp_client, db, sockets):
    model, server = await scripted([{"tool_calls": []}, {"text": ["Berlin ", "is colder."]}])
    try:
        hub = await aiohttp_client(create_app(fast.replace(openai_base_url=str(server.make_url("/v1")))))
        seller, buyer_account, seller_id, buyer_id, _ = await people(hub, db)
        pod = await make_pod(db, hub.app[BLOBS], hub.app[MASTER_KEY], seller_id, plaintext=WEATHER,
                             title="Daily city weather")
        await buy(hub, db, buyer_account, buyer_id, seller_id, pod)
        sql = "SELECT city, avg(temp_c) AS mean FROM data GROUP BY city HAVING mean IS NOT NULL ORDER BY mean"
        model.script[0] = {"tool_calls": [
            {"name": "query_dataset", "arguments": {"datapod_id": str(pod), "sql": sql}},
            {"name": "query_dataset", "arguments": {"datapod_id": str(pod), "sql": "DELETE FROM data"}}]}
        buyer = await sign_in(hub, sockets, buyer_account)
        conversation_id = await buyer.conversation()
        message_id = (await buyer.send(conversation_id, "Which city is colder?"))["assistant_message"]["id"]
        done = await wait_finished(buyer.sock, message_id)
        assert done["type"] == "message_completed", done

        returned = events(buyer.sock, "tool_returned", message_id)
        assert [r["name"] for r in returned] == ["query_dataset", "query_dataset"]
        first, refused = returned
        assert first["ok"] is True and first["datapod_ids"] == [str(pod)]
        assert first["result"]["columns"] == ["city", "mean"] and first["result"]["truncated"] is False
        assert first["result"]["rows"] == [["Berlin", 2.0], ["Lagos", 29.75]]
        assert refused["ok"] is False
        assert refused["result"] == {"error": "invalid_payload: only a read-only SELECT is allowed, not DELETE"}

        table = "| city | mean |\n|---|---|\n| Berlin | 2.0 |\n| Lagos | 29.75 |"
        _, text = delta_text(buyer.sock, message_id)
        assert text == table + "\n\nBerlin is colder."
        # The model saw both results: the rows, and the refusal as a tool error.
        tool_messages = [m for m in model.requests[1]["messages"] if m["role"] == "tool"]
        assert '"rows": [["Berlin", 2.0], ["Lagos", 29.75]]' in tool_messages[0]["content"]
        assert "not DELETE" in tool_messages[1]["content"]
        assert any(t["function"]["name"] == "query_dataset" for t in model.requests[0]["tools"])

        # Someone who does not hold the pod gets the refusal as the tool's error.
        model.script[:] = [{"tool_calls": [{"name": "query_dataset",
                                            "arguments": {"datapod_id": str(pod), "sql": "SELECT 1"}}]},
                           {"text": ["Sorry."]}]
        stranger = await sign_in(hub, sockets)
        other_conversation = await stranger.conversation()
        other_id = (await stranger.send(other_conversation, "Query it"))["assistant_message"]["id"]
        assert (await wait_finished(stranger.sock, other_id))["type"] == "message_completed"
        denied = events(stranger.sock, "tool_returned", other_id)[0]
        assert denied["ok"] is False and denied["result"]["error"].startswith("forbidden: ")
        assert delta_text(stranger.sock, other_id)[1] == "Sorry."
    finally:
        await server.close()
