"""The chain explorer against real PostgreSQL: blocks by height and hash, a block's transactions,
an address's balance, history and ledger, mining rewards, search, halving and burns, keyset
paging without gaps or duplicates, and EXPLAIN checks that every list uses its index."""

from __future__ import annotations

import uuid
from decimal import Decimal

import pytest

from db import chain as chain_queries
from db import explorer as queries
from db import users as user_queries
from server.core import wallets
from server.services.chain import SealConfig, seal_block
from tests.helpers import register, server_url

# --- helpers ----------------------------------------------------------------------------------


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


async def call(client, method: str, path: str, token: str | None = None, **kwargs) -> tuple[int, dict]:
    response = await client.request(method, path, headers=bearer(token) if token else {}, **kwargs)
    return response.status, await response.json()


async def get(client, path: str, **params) -> dict:
    """The data of a successful anonymous GET."""
    status, body = await call(client, "GET", path, params=params)
    assert status == 200, body
    return body["data"]


class Account:
    """A registered user with a registered wallet."""

    def __init__(self, data: dict, wallet: wallets.Wallet) -> None:
        self.token = data["token"]
        self.id = uuid.UUID(data["user"]["id"])
        self.username = data["user"]["username"]
        self.wallet = wallet
        self.address = wallet.address
        self.nonce = 0

    def sign(self, receiver: Account, amount: str) -> dict:
        payload = self.wallet.sign_transfer(receiver.address, amount, self.nonce)
        self.nonce += 1
        return payload


async def account(client, *, funded: bool = False) -> Account:
    data = await register(client)
    wallet = wallets.Wallet.generate()
    status, body = await call(client, "PUT", "/api/v1/me/wallet", data["token"], json={"public_key": wallet.public_key})
    assert status == 200, body
    user = Account(data, wallet)
    if funded:
        status, body = await call(client, "POST", "/api/v1/me/faucet", user.token)      # 10 KVP
        assert status == 201, body
    return user


async def send(client, sender: Account, receiver: Account, amount: str) -> str:
    status, body = await call(client, "POST", "/api/v1/transactions", sender.token, json=sender.sign(receiver, amount))
    assert status == 201, body
    return body["data"]["hash"]


async def walk(client, path: str, cursor: str, limit: int, **params) -> list[dict]:
    """Every item of a list, page by page, following `next`; checks no page is over `limit`."""
    items: list[dict] = []
    key = None
    for _ in range(100):
        data = await get(client, path, limit=limit, **params, **({cursor: key} if key is not None else {}))
        assert len(data["items"]) <= limit
        items += data["items"]
        key = data["next"]
        if key is None:
            return items
        assert len(data["items"]) == limit          # only a full page has a next one
    raise AssertionError("the list did not end")


@pytest.fixture
async def chain(client, db):
    """alice and bob (10 KVP each from the faucet), a miner, a 'mining' pool; block 1 seals alice's
    three transfers to bob and bob's one to alice, block 2 is empty, and alice has one pending."""
    alice, bob, miner = await account(client, funded=True), await account(client, funded=True), await account(client)
    await db.execute("INSERT INTO reward_pools (pool_name, total_tokens) VALUES ('mining', 1000)")
    config = SealConfig(difficulty=4, miner_username=miner.username)
    sealed_hashes = [await send(client, alice, bob, amount) for amount in ("1", "2.5", "3")]
    sealed_hashes.append(await send(client, bob, alice, "4"))
    first = await seal_block(db, config)
    second = await seal_block(db, config)
    pending = await send(client, alice, bob, "0.5")
    return {"alice": alice, "bob": bob, "miner": miner, "config": config, "first": first.block,
            "second": second.block, "sealed": sealed_hashes, "pending": pending}


# --- blocks -----------------------------------------------------------------------------------

async def test_a_block_by_height_and_by_hash_is_the_same_block(client, chain):
    first = chain["first"]
    by_height = await get(client, f"/api/v1/chain/blocks/{first.height}")
    by_hash = await get(client, f"/api/v1/chain/blocks/{first.hash}")
    upper = await get(client, f"/api/v1/chain/blocks/{first.hash.upper()}")
    assert by_height == by_hash == upper == first.to_public()
    assert by_height["height"] == 1 and by_height["transactions"] == chain["sealed"]
    for missing in ("3", "0", "9" * 10, "ab" * 32, "nothex", "1" * 11):
        status, body = await call(client, "GET", f"/api/v1/chain/blocks/{missing}")
        assert (status, body["error"]["code"], body["error"]["field"]) == (404, "not_found", "block"), missing


async def test_a_blocks_transactions_page_in_block_order_without_gaps(client, chain):
    path = f"/api/v1/chain/blocks/{chain['first'].hash}/transactions"
    for limit in (1, 3, 4, 100):
        items = await walk(client, path, "after", limit)
        assert [tx["hash"] for tx in items] == chain["sealed"], limit
    first_page = await get(client, path, limit=3)
    assert first_page["height"] == 1 and first_page["next"] is not None
    assert [tx["amount"] for tx in first_page["items"]] == ["1.00000000", "2.50000000", "3.00000000"]
    assert all(tx["status"] == "confirmed" and tx["height"] == 1 for tx in first_page["items"])
    empty = await get(client, f"/api/v1/chain/blocks/{chain['second'].height}/transactions")
    assert empty == {"height": 2, "items": [], "next": None}


@pytest.mark.parametrize("query", [{"limit": "0"}, {"limit": "101"}, {"limit": "x"}, {"after": "-1"},
                                   {"after": "2147483648"}])
async def test_bad_page_parameters_are_invalid_payload(client, chain, query):
    status, body = await call(client, "GET", "/api/v1/chain/blocks/1/transactions", params=query)
    assert (status, body["error"]["code"], body["error"]["field"]) == (400, "invalid_payload", next(iter(query)))


# --- addresses --------------------------------------------------------------------------------

async def test_an_address_has_its_balance_and_pending_amount(client, chain):
    alice = chain["alice"]
    data = await get(client, f"/api/v1/chain/addresses/{alice.address}")
    # 10 from the faucet, 6.5 sent, 4 received; 0.5 pending.
    assert data == {"address": alice.address, "user_id": str(alice.id), "public_key": alice.wallet.public_key,
                    "balance": "7.50000000", "pending_outgoing": "0.50000000", "available": "7.00000000",
                    "next_nonce": 4}
    status, body = await call(client, "GET", f"/api/v1/chain/addresses/{wallets.Wallet.generate().address}")
    assert (status, body["error"]["field"]) == (404, "address")
    status, body = await call(client, "GET", "/api/v1/chain/addresses/kvp1nothex")
    assert (status, body["error"]["field"]) == (404, "address")


async def test_an_address_history_lists_sent_and_received_newest_first(client, chain):
    alice, bob = chain["alice"], chain["bob"]
    sealed, pending = chain["sealed"], chain["pending"]
    expected = [(pending, "sent", "pending"), (sealed[3], "received", "confirmed"), (sealed[2], "sent", "confirmed"),
                (sealed[1], "sent", "confirmed"), (sealed[0], "sent", "confirmed")]
    for limit in (1, 2, 5, 20):
        items = await walk(client, f"/api/v1/chain/addresses/{alice.address}/transactions", "before", limit)
        assert [(tx["hash"], tx["direction"], tx["status"]) for tx in items] == expected, limit
    bobs = await walk(client, f"/api/v1/chain/addresses/{bob.address}/transactions", "before", 2)
    assert [(tx["hash"], tx["direction"]) for tx in bobs] == [
        (pending, "received"), (sealed[3], "sent"), (sealed[2], "received"), (sealed[1], "received"),
        (sealed[0], "received")]
    nobody = await account(client)
    assert await get(client, f"/api/v1/chain/addresses/{nobody.address}/transactions") == {
        "address": nobody.address, "items": [], "next": None}


async def test_an_address_ledger_is_its_owners_balance_ledger_newest_first(client, db, chain):
    alice = chain["alice"]
    rows = await db.fetch("""SELECT entry_id, delta, balance_after, reason, reference FROM balance_ledger
                              WHERE user_id = $1 ORDER BY entry_id DESC""", alice.id)
    assert rows and rows[-1]["reason"] == "demo_faucet" and rows[-1]["delta"] == Decimal(10)
    expected = [{"id": r["entry_id"], "delta": f"{r['delta']:.8f}", "balance_after": f"{r['balance_after']:.8f}",
                 "reason": r["reason"], "reference": r["reference"]} for r in rows]
    for limit in (1, 2, 100):
        items = await walk(client, f"/api/v1/chain/addresses/{alice.address}/ledger", "before", limit)
        assert [{k: v for k, v in item.items() if k != "created_at"} for item in items] == expected, limit
    first = await get(client, f"/api/v1/chain/addresses/{alice.address}/ledger", limit=1)
    assert first["balance"] == "7.50000000"
    assert first["next"] == (rows[0]["entry_id"] if len(rows) > 1 else None)


# --- mining rewards ---------------------------------------------------------------------------

async def test_mining_rewards_by_block_and_by_user(client, db, chain):
    miner = chain["miner"]
    third = await seal_block(db, chain["config"])
    by_block = await get(client, f"/api/v1/chain/blocks/{third.block.hash}/mining-rewards")
    assert [(r["height"], r["user_id"], r["miner"], r["amount"], r["device_type"]) for r in by_block["items"]] == [
        (3, str(miner.id), miner.address, "50.00000000", "Node")]
    assert by_block["next"] is None
    for path in (f"/api/v1/chain/users/{miner.id}/mining-rewards",
                 f"/api/v1/chain/addresses/{miner.address}/mining-rewards"):
        items = await walk(client, path, "before", 2)
        assert [(r["height"], r["amount"]) for r in items] == [(3, "50.00000000"), (2, "50.00000000"),
                                                               (1, "50.00000000")]
        summary = await get(client, path, limit=1)
        assert (summary["user_id"], summary["reward_count"], summary["total_rewards"]) == \
            (str(miner.id), 3, "150.00000000")
    idle = chain["alice"]
    assert await get(client, f"/api/v1/chain/users/{idle.id}/mining-rewards") == {
        "user_id": str(idle.id), "reward_count": 0, "total_rewards": "0.00000000", "items": [], "next": None}
    status, body = await call(client, "GET", f"/api/v1/chain/users/{uuid.uuid4()}/mining-rewards")
    assert (status, body["error"]["field"]) == (404, "user_id")


# --- search -----------------------------------------------------------------------------------

async def test_search_names_heights_hashes_and_addresses(client, chain):
    first, alice = chain["first"], chain["alice"]
    assert await get(client, "/api/v1/chain/search", q="1") == {
        "query": "1", "kind": "block", "height": 1, "hash": first.hash, "path": "/api/v1/chain/blocks/1"}
    assert await get(client, "/api/v1/chain/search", q=first.hash.upper()) == {
        "query": first.hash.upper(), "kind": "block", "height": 1, "hash": first.hash,
        "path": "/api/v1/chain/blocks/1"}
    sealed = chain["sealed"][1]
    assert await get(client, "/api/v1/chain/search", q=sealed) == {
        "query": sealed, "kind": "transaction", "hash": sealed, "status": "confirmed", "height": 1,
        "path": f"/api/v1/transactions/{sealed}"}
    pending = await get(client, "/api/v1/chain/search", q=chain["pending"])
    assert (pending["kind"], pending["status"], pending["height"]) == ("transaction", "pending", None)
    assert await get(client, "/api/v1/chain/search", q=f" {alice.address} ") == {
        "query": f" {alice.address} ", "kind": "address", "address": alice.address, "user_id": str(alice.id),
        "path": f"/api/v1/chain/addresses/{alice.address}"}
    for missing in ("99", "0", "f" * 64, wallets.Wallet.generate().address):
        status, body = await call(client, "GET", "/api/v1/chain/search", params={"q": missing})
        assert (status, body["error"]["code"], body["error"]["field"]) == (404, "not_found", "q"), missing
    for invalid in ("kvp1xyz", "hello", "12345678901", "-1", "abc" * 30):
        status, body = await call(client, "GET", "/api/v1/chain/search", params={"q": invalid})
        assert (status, body["error"]["code"], body["error"]["field"]) == (400, "invalid_payload", "q"), invalid
    status, body = await call(client, "GET", "/api/v1/chain/search")
    assert (status, body["error"]["field"]) == (400, "q")


# --- halving and burns ------------------------------------------------------------------------

async def test_the_halving_schedule_follows_the_chain_settings(client, db, chain):
    await db.execute("UPDATE chain_settings SET halving_interval = 3, initial_block_reward = 50")
    third = await seal_block(db, chain["config"])                     # height 3: the first halved block
    assert third.reward == 25
    data = await get(client, "/api/v1/chain/halving", eras="4")
    assert data == {
        "initial_block_reward": "50.00000000", "halving_interval": 3, "target_block_seconds": 60,
        "max_blocks": 21000000, "current_height": 3, "current_era": 1, "current_reward": "25.00000000",
        "next_halving_height": 6, "next_reward": "12.50000000", "blocks_until_halving": 3,
        "eras": [{"era": 0, "from_height": 1, "to_height": 2, "reward": "50.00000000"},
                 {"era": 1, "from_height": 3, "to_height": 5, "reward": "25.00000000"},
                 {"era": 2, "from_height": 6, "to_height": 8, "reward": "12.50000000"},
                 {"era": 3, "from_height": 9, "to_height": 11, "reward": "6.25000000"}]}
    assert len((await get(client, "/api/v1/chain/halving"))["eras"]) == 10             # the default
    # The Python schedule agrees with the SQL block_reward() to the last decimal, to the last era.
    await db.execute("UPDATE chain_settings SET halving_interval = 1, initial_block_reward = 33.33333333")
    eras = (await get(client, "/api/v1/chain/halving", eras="64"))["eras"]
    sql = await db.fetch("SELECT block_reward(h) AS reward FROM generate_series(1, 63) h")
    assert [era["era"] for era in eras] == list(range(1, 64))           # era 0 has no block at interval 1
    assert [era["reward"] for era in eras] == [f"{row['reward']:.8f}" for row in sql]
    status, body = await call(client, "GET", "/api/v1/chain/halving", params={"eras": "65"})
    assert (status, body["error"]["field"]) == (400, "eras")


async def test_burn_totals_and_burned_blocks(client, db, chain):
    miner = chain["miner"]
    empty = await get(client, "/api/v1/chain/burns")
    assert empty == {"burned_blocks": 0, "burned_rewards": "0.00000000", "last_burn_time": None, "items": [],
                     "next": None}
    other = await account(client)
    await seal_block(db, SealConfig(difficulty=4, miner_username=other.username))      # height 3, kept
    admin = await register(client)
    await user_queries.upsert_admin(db, uuid.UUID(admin["user"]["id"]), username=admin["user"]["username"],
                                    email=admin["user"]["email"], password_hash="x")
    status, body = await call(client, "POST", "/api/v1/admin/blocks/burn", admin["token"],
                              json={"miner_id": str(miner.id)})
    assert status == 200 and body["data"]["block_ids"] == [1, 2], body
    data = await get(client, "/api/v1/chain/burns", limit=1)
    assert (data["burned_blocks"], data["burned_rewards"]) == (2, "100.00000000")
    assert data["last_burn_time"] is not None and data["next"] == 2
    items = await walk(client, "/api/v1/chain/burns", "before", 1)
    assert [(b["height"], b["hash"], b["miner_id"], b["reward"]) for b in items] == [
        (2, chain["second"].hash, str(miner.id), "50.00000000"), (1, chain["first"].hash, str(miner.id), "50.00000000")]


# --- the /chain commands ----------------------------------------------------------------------

async def test_chain_commands_answer_anonymous_callers_like_rest(client, chain, sockets):
    sock = sockets()
    await sock.connect(server_url(client), "/chain")
    first, alice, miner = chain["first"], chain["alice"], chain["miner"]

    async def ok(event: str, payload: dict) -> dict:
        answer = await sock.call("/chain", event, payload)
        assert answer["ok"], (event, answer)
        return answer["data"]

    assert await ok("get_block", {"block": first.hash}) == await ok("get_block", {"block": 1}) == first.to_public()
    page = await ok("block_transactions", {"block": 1, "limit": 2})
    rest = await get(client, "/api/v1/chain/blocks/1/transactions", limit=2)
    assert page == rest and len(page["items"]) == 2
    assert await ok("block_transactions", {"block": 1, "after": page["next"]}) == await get(
        client, "/api/v1/chain/blocks/1/transactions", after=page["next"])
    assert await ok("block_mining_rewards", {"block": 1}) == await get(client, "/api/v1/chain/blocks/1/mining-rewards")
    assert await ok("get_address", {"address": alice.address}) == await get(
        client, f"/api/v1/chain/addresses/{alice.address}")
    assert await ok("address_transactions", {"address": alice.address, "limit": 2, "before": 5}) == await get(
        client, f"/api/v1/chain/addresses/{alice.address}/transactions", limit=2, before=5)
    assert await ok("address_ledger", {"address": alice.address}) == await get(
        client, f"/api/v1/chain/addresses/{alice.address}/ledger")
    rewards = await get(client, f"/api/v1/chain/users/{miner.id}/mining-rewards")
    assert await ok("miner_rewards", {"user_id": str(miner.id)}) == rewards
    assert await ok("miner_rewards", {"address": miner.address}) == rewards
    assert (await ok("search", {"q": alice.address}))["kind"] == "address"
    assert await ok("halving_schedule", {"eras": 2}) == await get(client, "/api/v1/chain/halving", eras=2)
    assert await ok("burns", {}) == await get(client, "/api/v1/chain/burns")
    for event, payload, code in [("get_block", {"block": 9}, "not_found"),
                                 ("get_block", {"block": "zz"}, "invalid_payload"),
                                 ("miner_rewards", {"user_id": str(miner.id), "address": miner.address},
                                  "invalid_payload"),
                                 ("miner_rewards", {}, "invalid_payload"),
                                 ("block_transactions", {"block": 1, "limit": 101}, "invalid_payload"),
                                 ("search", {"q": "nope"}, "invalid_payload")]:
        answer = await sock.call("/chain", event, payload)
        assert not answer["ok"] and answer["error"]["code"] == code, (event, payload, answer)


# --- every list query uses its index ----------------------------------------------------------

async def _plan(db, sql: str, *args, hint: bool = True) -> str:
    """The plan PostgreSQL picks for `sql` with these parameters (sequential scans discouraged with `hint`)."""
    async with db.transaction():
        if hint:
            await db.execute("SET LOCAL enable_seqscan = off")
        rows = await db.fetch(f"EXPLAIN {sql}", *args)
    return "\n".join(row[0] for row in rows)


async def test_every_explorer_list_query_uses_its_index(db, chain):
    alice, miner = chain["alice"], chain["miner"]
    await db.execute("ANALYZE")
    cases = [
        (queries.BLOCK_TRANSACTIONS, (1, 0, 21), ["idx_transactions_block_order"]),
        (queries.ADDRESS_TRANSACTIONS, (alice.address, queries.MAX_INTEGER_KEY, 21),
         ["idx_transactions_sender_history", "idx_transactions_receiver_history"]),
        (queries.USER_LEDGER, (alice.id, queries.MAX_BIGINT_KEY, 21), ["idx_balance_ledger_user"]),
        (queries.BLOCK_MINING_REWARDS, (1, 0, 21), ["idx_mining_rewards_block_order"]),
        (queries.USER_MINING_REWARDS, (miner.id, queries.MAX_INTEGER_KEY, 21), ["idx_mining_rewards_user_order"]),
        (queries.USER_MINING_TOTAL, (miner.id,), ["idx_mining_rewards_user_order"]),
        (queries.BURNED_BLOCKS, (queries.MAX_INTEGER_KEY, 21), ["idx_blocks_burned"]),
        (queries.BURNED_COUNT, (), ["idx_blocks_burned"]),
        (queries.BURNED_REWARDS, (), ["idx_blocks_burned"]),
        (queries.BLOCK_HEIGHT_BY_HASH, ("ab" * 32,), ["blocks_block_hash_key"]),
        (queries.BLOCK_EXISTS, (1,), ["blocks_pkey"]),
        (queries.TRANSACTION_BY_HASH, ("ab" * 32,), ["transactions_transaction_hash_key"]),
        (chain_queries.WALLET_BY_ADDRESS, (alice.address,), ["users_wallet_address_key"]),
        (chain_queries.PENDING_OUTGOING, (alice.address,), ["idx_transactions_pending"]),
    ]
    for sql, args, indexes in cases:
        plan = await _plan(db, sql, *args)
        assert "Seq Scan" not in plan, plan
        assert "Sort" not in plan or sql is queries.ADDRESS_TRANSACTIONS, plan      # the index gives the order
        for index in indexes:
            assert index in plan, (index, plan)


async def test_the_history_plans_hold_with_many_rows_and_no_hints(db, chain):
    """With thousands of other transactions, the planner itself prefers the indexes (no enable_seqscan)."""
    alice, bob = chain["alice"], chain["bob"]
    await db.execute(
        """INSERT INTO transactions (transaction_hash, block_id, sender, receiver, amount, status)
           SELECT md5(i::text) || md5((i + 1)::text), NULL,
                  'kvp1' || substr(md5((i % 500)::text) || md5('x'), 1, 40), $1, 1, 'rejected'
             FROM generate_series(1, 5000) i""", bob.address)
    await db.execute("ANALYZE transactions")
    plan = await _plan(db, queries.ADDRESS_TRANSACTIONS, alice.address, queries.MAX_INTEGER_KEY, 21, hint=False)
    assert "Seq Scan" not in plan and "idx_transactions_sender_history" in plan, plan
    plan = await _plan(db, queries.BLOCK_TRANSACTIONS, 1, 0, 21, hint=False)
    assert "Seq Scan" not in plan and "idx_transactions_block_order" in plan, plan
