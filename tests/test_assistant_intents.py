"""The retrieval-only assistant's intent router (issue 20) over a seeded marketplace and real PostgreSQL.

One test runs a table of questions through the router directly (fast: one seed, one app); one runs
a conversation over the socket through the real app in retrieval-only mode.
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from decimal import Decimal

from db.pool import POOL
from server.adapters.blobs import blob_id_for
from server.services import assistant_intents as intents
from server.services.assistant import RETRIEVAL_LABEL, datapod_ids
from tests.helpers import register
from tests.test_assistant import delta_text, events, message_row, sign_in, wait_finished

NOW = dt.datetime.now(dt.timezone.utc)

# key: title, category, price, rating, sales, rows, size, columns, days since added, description
PODS = {
    "W": ("Daily city weather", "climate", "1.5", "4.5", 7, 1200, 48_000, ["date", "city", "temperature", "rain"],
          10, "Temperature and rain readings, one row per city per day."),
    "T": ("Stock ticks", "finance", "4", "3.8", 12, 50_000, 2_000_000, ["ts", "symbol", "price", "volume"], 3,
          "Trades of listed equities."),
    "B": ("Bond yields", "finance", "2.25", "4.9", 3, 800, 30_000, ["date", "maturity", "yield"], 1,
          "Government bonds by maturity."),
    "C": ("Crop yields by region", "agriculture", "0.5", "0", 0, 300, 12_000, ["region", "crop", "Yield"], 20,
          "Harvests per region."),
    "R": ("Urban traffic counts", "transport", "6", "4.1", 20, 90_000, 5_000_000, ["sensor", "hour", "vehicles"], 5,
          "Vehicles per hour from road sensors."),
    "A": ("Air quality index", "climate", "3", "2.5", 1, 5000, 400_000, ["city", "pm25", "date"], 2,
          "Fine particle readings from street sensors."),
    "H": ("Hospital births", "health", "10", "4.7", 5, 150, 8_000_000, ["year", "births"], 30,
          "Births per hospital and year."),
    # Never shown: not published, though it is the cheapest, best rated, newest, with a yield column.
    "X": ("Unpublished secret stock", "finance", "0.1", "5", 100, 999_999, 9_000_000_000, ["yield", "city", "price"],
          0, "Stock weather traffic bonds."),
}


async def insert_pod(conn, seller_id: uuid.UUID, key: str) -> uuid.UUID:
    """A DataPod row as an upload makes it (fake blob: nothing reads it), with known facts."""
    title, category, price, rating, _, rows, size, cols, days, description = PODS[key]
    pod_id = uuid.uuid4()
    schema = {"format": "csv", "row_count": rows, "column_count": len(cols), "tags": [],
              "columns": [{"name": c, "type": "string", "null_count": 0} for c in cols]}
    await conn.execute(
        """INSERT INTO datapods (id, seller_id, title, description, category, price_sui, walrus_blob_id,
               encryption_key_hash, encryption_iv, wrapped_key, schema, published, average_rating, file_size,
               created_at)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'x', $10, $11, $12, $13, $14)""",
        pod_id, seller_id, title, description, category, Decimal(price), blob_id_for(pod_id.bytes), "0" * 64,
        "0" * 24, schema, key != "X", Decimal(rating), size, NOW - dt.timedelta(days=days))
    return pod_id


async def purchase(conn, buyer: uuid.UUID, pod: uuid.UUID, amount: str, status: str, ago: dt.timedelta) -> None:
    at = dt.datetime.now(dt.timezone.utc) - ago
    await conn.execute(
        """INSERT INTO purchases (buyer_id, datapod_id, payment_tx_digest, amount_sui, status, created_at,
                                  completed_at) VALUES ($1, $2, $3, $4, $5, $6, $7)""",
        buyer, pod, uuid.uuid4().hex, Decimal(amount), status, at, at if status == "completed" else None)


async def seed(client) -> tuple[dict[str, uuid.UUID], dict[str, dict]]:
    """The marketplace of PODS (seller1: W B C H X, seller2: T R A) and purchases by alice and bob."""
    accounts = {name: await register(client) for name in ("seller1", "seller2", "alice", "bob")}
    uid = {name: uuid.UUID(a["user"]["id"]) for name, a in accounts.items()}
    async with client.app[POOL].acquire() as conn:
        ids = {key: await insert_pod(conn, uid["seller1" if key in "WBCHX" else "seller2"], key) for key in PODS}
        # Seconds ago: "this week" (since Monday 00:00 UTC) holds them whenever the test runs.
        await purchase(conn, uid["alice"], ids["W"], "1.5", "completed", dt.timedelta(seconds=30))
        await purchase(conn, uid["alice"], ids["T"], "4", "completed", dt.timedelta(seconds=20))
        await purchase(conn, uid["bob"], ids["B"], "2.25", "completed", dt.timedelta(seconds=10))
        await purchase(conn, uid["bob"], ids["H"], "10", "failed", dt.timedelta(seconds=15))
        await purchase(conn, uid["bob"], ids["C"], "0.5", "completed", dt.timedelta(days=10))
        for key, facts in PODS.items():  # the trigger counted the purchases above: set the known totals
            await conn.execute("UPDATE datapods SET purchase_count = $2 WHERE id = $1", ids[key], facts[4])
    return ids, accounts


def answer_ids(text: str) -> list[str]:
    """The DataPods an answer links, in order of first mention."""
    return list(dict.fromkeys(re.findall(r"\[datapod:([0-9a-f-]{36})\]", text)))


# (asker, question, intent, expected DataPods in order (None: in any order), text the answer holds)
CASES = [
    ("alice", "hello", "greeting", "", "Hello! I'm the SourceNet marketplace assistant"),
    ("alice", "Hi there!", "greeting", "", "the 3 cheapest DataPods"),
    ("alice", "What can you do?", "greeting", "", "what did I buy"),
    ("alice", "thanks", "greeting", "", "You're welcome"),
    ("alice", "the 3 cheapest datapods", "listing", "CWB", "The 3 cheapest DataPods:"),
    ("alice", "What is the cheapest DataPod?", "listing", "C", "0.5 SUI"),
    ("alice", "cheapest five datasets", "listing", "CWBAT", "| 3 | **Bond yields**"),
    ("alice", "most expensive", "listing", "HRTAB", "10 SUI"),
    ("alice", "the most expensive dataset", "listing", "H", "The most expensive DataPod:"),
    ("alice", "top rated datapods", "listing", "BHWRT", "4.9★"),
    ("alice", "the 2 best rated", "listing", "BH", "The 2 top-rated DataPods"),
    ("alice", "best selling datapods", "listing", "RTWHB", "best-selling"),
    ("alice", "Which datapod sells the most?", "listing", "R", "| 20 |"),
    ("alice", "newest datapods", "listing", "BATRW", "Added"),
    ("alice", "the three latest datasets", "listing", "BAT", "The 3 newest DataPods"),
    ("alice", "oldest datapods", "listing", "HCWRT", "oldest"),
    ("alice", "Which one has the most rows?", "listing", "R", "90,000"),
    ("alice", "the largest dataset", "listing", "H", "7.6 MB"),
    ("alice", "the 2 smallest datasets", "listing", "CB", "11.7 KB"),
    ("alice", "datapods with the fewest rows", "listing", "HCBWA", "with the fewest rows"),
    ("alice", "compare the two cheapest datapods", "compare", "CW", "Side by side"),
    ("alice", "Compare Daily city weather and Stock ticks", "compare", "WT", "most rows: **Stock ticks** (50,000)"),
    ("alice", "stock ticks vs bond yields", "compare", "TB", "cheapest: **Bond yields** (2.25 SUI)"),
    ("alice", "compare the 3 most expensive", "compare", "HRT", "| Price | 10 SUI | 6 SUI | 4 SUI |"),
    ("alice", "compare Bond yields with zebra stripes", "compare", "B", "I found no DataPod for “zebra stripes”"),
    ("alice", "datapods under 2 SUI", "listing", "CW", "priced under 2 SUI"),
    ("alice", "anything between 1 and 3 SUI?", "listing", "WBA", "priced between 1 SUI and 3 SUI"),
    ("alice", "over 5 sui", "listing", "RH", "priced over 5 SUI"),
    ("alice", "datapods priced at most 1.5 sui", "listing", "CW", "at most 1.5 SUI"),
    ("alice", "between two and four sui", "listing", "BAT", "between 2 SUI and 4 SUI"),
    ("alice", "free datapods", "listing", "", "No published DataPod that is free"),
    ("alice", "datapods with a yield column", "listing", "CB", "with a `yield` column"),
    ("alice", "which datasets have a temperature column", "listing", "W", "`temperature`"),
    ("alice", "datapods containing the city field", "listing", "WA", "`city`"),
    ("alice", "the cheapest datapod with a price column", "listing", "T", "4 SUI"),
    ("alice", "the cheapest finance datapods", "listing", "BT", "in finance"),
    ("alice", "top rated in the climate category", "listing", "WA", "in climate"),
    ("alice", "the 2 newest datapods under 3 sui", "listing", "BW", "under 3 SUI"),
    ("alice", "top 3 rated datapods between 2 and 10 sui", "listing", "BHR", "The 3 top-rated DataPods"),
    ("alice", "How many rows does Daily city weather have?", "size", "W", "has 1,200 rows (46.9 KB, 4 columns)"),
    ("alice", "how big is stock ticks", "size", "T", "1.9 MB"),
    ("alice", "which categories are there?", "categories", "", "| climate | 2 | 1.5 SUI – 3 SUI |"),
    ("alice", "what kinds of data do you have", "categories", "", "5 categories, 7 DataPods in all"),
    ("alice", "Is there weather data for cities?", "search", "W", "DataPods matching"),
    ("alice", "zebra migration patterns", "search", "", "I found no published DataPod matching"),
    ("alice", "what did I buy?", "my_purchases", "TW", "You have 2 purchases"),
    ("bob", "my purchases", "my_purchases", "BHC", "| failed |"),
    ("seller1", "my sales this week", "my_sales", "BW", "**2 sales, 3.75 SUI**"),
    ("seller1", "my sales", "my_sales", "BWC", "**3 sales, 4.25 SUI**"),
    ("seller2", "what did I sell this week?", "my_sales", "T", "**1 sale, 4 SUI**"),
    ("alice", "my sales this week", "my_sales", "", "You have no completed sales this week"),
]


async def ask(conn, user_id: uuid.UUID, question: str, previous: list[uuid.UUID] | None = None):
    """Route one question on `conn`; returns (intent, answer, the tool calls' (name, datapod ids))."""
    calls: list[tuple[str, list[str]]] = []

    async def tool(name, arguments, run):
        result = await run(conn)
        calls.append((name, datapod_ids(intents.public(result))))
        return result

    async def read(run):
        return await run(conn)

    intent, answer = await intents.route(intents.Ask(question, user_id, tool, previous or [], None, read))
    return intent, answer, calls


async def test_the_intent_table(client):
    ids, accounts = await seed(client)
    name_of = {str(v): k for k, v in ids.items()}
    users = {name: uuid.UUID(a["user"]["id"]) for name, a in accounts.items()}
    assert len(CASES) >= 40
    async with client.app[POOL].acquire() as conn:
        for asker, question, intent, expected, text in CASES:
            got_intent, answer, calls = await ask(conn, users[asker], question)
            linked = "".join(name_of[i] for i in answer_ids(answer))
            assert (got_intent, linked) == (intent, expected), (question, answer)
            assert text in answer, (question, answer)
            assert "X" not in linked and "Unpublished" not in answer
            if expected and intent != "compare":  # the cards clients show are the DataPods the answer lists
                assert "".join(name_of[i] for _, found in calls for i in found) == expected, (question, calls)
            assert ".000" not in answer and "E+" not in answer, answer  # prices without trailing zeros

        # Follow-ups refer to the previous answer's DataPods.
        cheapest = [ids[k] for k in "CWB"]
        _, answer, calls = await ask(conn, users["alice"], "Which one has the most rows?", cheapest)
        assert "".join(name_of[i] for i in answer_ids(answer)) == "W" and calls == [("rank_datapods", [str(ids["W"])])]
        assert "among the DataPods of my previous answer" in answer
        _, answer, _ = await ask(conn, users["alice"], "compare them", cheapest)
        assert "".join(name_of[i] for i in answer_ids(answer)) == "CWB" and "Side by side" in answer
        _, answer, _ = await ask(conn, users["alice"], "how many rows do they have?", cheapest)
        assert "".join(name_of[i] for i in answer_ids(answer)) == "CWB" and "| 1,200 |" in answer
        _, answer, _ = await ask(conn, users["alice"], "the most expensive of them", cheapest)
        assert "".join(name_of[i] for i in answer_ids(answer)) == "B"
        # Without a previous answer "which one" means the whole marketplace.
        _, answer, _ = await ask(conn, users["alice"], "Which one has the most rows?", [])
        assert "".join(name_of[i] for i in answer_ids(answer)) == "R"


async def test_a_conversation_over_the_socket(client, sockets):
    ids, accounts = await seed(client)
    alice = await sign_in(client, sockets, accounts["alice"])
    conversation_id = await alice.conversation()

    async def answered(question: str) -> tuple[str, list[dict], str]:
        sent = await alice.send(conversation_id, question)
        message_id = sent["assistant_message"]["id"]
        done = await wait_finished(alice.sock, message_id)
        assert done["type"] == "message_completed", done
        seqs, text = delta_text(alice.sock, message_id)
        assert seqs == list(range(1, len(seqs) + 1))
        row = await message_row(client.app, message_id)
        assert row["content"] == text and row["model"] == "retrieval-only"
        returned = events(alice.sock, "tool_returned", message_id)
        called = events(alice.sock, "tool_called", message_id)
        assert [c["call_id"] for c in called] == [r["call_id"] for r in returned]
        assert [c["datapod_ids"] for c in row["tool_calls"] or []] == [r["datapod_ids"] for r in returned]
        return text, returned, message_id

    text, returned, _ = await answered("the 3 cheapest datapods")
    assert text.startswith(RETRIEVAL_LABEL + "\n\nThe 3 cheapest DataPods:")
    assert [r["name"] for r in returned] == ["rank_datapods"] and returned[0]["ok"] is True
    assert returned[0]["datapod_ids"] == [str(ids[k]) for k in "CWB"]
    assert f"| 1 | **Crop yields by region** [datapod:{ids['C']}] | agriculture | 0.5 SUI | not rated |" in text

    text, returned, _ = await answered("Which one has the most rows?")
    assert RETRIEVAL_LABEL not in text  # once per conversation
    assert returned[0]["datapod_ids"] == [str(ids["W"])]
    assert text.startswith(f"The DataPod with the most rows among the DataPods of my previous answer: "
                           f"**Daily city weather** [datapod:{ids['W']}].")

    text, returned, _ = await answered("hello")
    assert returned == [] and "No published DataPod matches" not in text and "the 3 cheapest DataPods" in text

    text, returned, _ = await answered("what did I buy?")
    assert returned[0]["name"] == "my_purchases" and returned[0]["datapod_ids"] == [str(ids["T"]), str(ids["W"])]
    assert "Bond yields" not in text and RETRIEVAL_LABEL not in text  # bob's purchase is not alice's

    # Another conversation opens with the disclaimer again.
    other = await alice.conversation()
    sent = await alice.send(other, "compare Daily city weather and Stock ticks")
    message_id = sent["assistant_message"]["id"]
    await wait_finished(alice.sock, message_id)
    _, text = delta_text(alice.sock, message_id)
    assert text.startswith(RETRIEVAL_LABEL) and "Side by side" in text
    assert events(alice.sock, "tool_returned", message_id)[0]["datapod_ids"] == [str(ids["W"]), str(ids["T"])]
