"""The KVP chain against real PostgreSQL: signed transfers, sealing, producers, halving, verify,
live feeds and catch-up, reward pools under concurrency."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import subprocess
import sys
import uuid
from decimal import Decimal

import asyncpg
import pytest

from db import chain as queries
from db import ledger
from db import users as user_queries
from db.pool import POOL
from server.app import create_app
from server.core import wallets
from server.core.crypto import MASTER_KEY
from server.realtime.hub import FIRST_ID, REALTIME
from server.services.block_producer import BLOCK_PRODUCER, apply_chain_settings
from server.services.chain import SealConfig, claim_faucet, seal_block, verify_chain
from server.services.demo import demo_wallet, load_if_empty
from tests.helpers import register, server_url, wait_until

# --- helpers ----------------------------------------------------------------------------------

# Every test here ends with `chain verify` passing (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("chain_verified")


async def admin_token(client, db) -> str:
    """A registered user promoted to administrator; returns its token."""
    account = await register(client)
    user = account["user"]
    await user_queries.upsert_admin(db, uuid.UUID(user["id"]), username=user["username"], email=user["email"],
                                    password_hash="x")
    return account["token"]


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


async def call(client, method: str, path: str, token: str | None = None, **kwargs) -> tuple[int, dict]:
    response = await client.request(method, path, headers=bearer(token) if token else {}, **kwargs)
    return response.status, await response.json()


class Account:
    """A registered user with a registered wallet."""

    def __init__(self, data: dict, wallet: wallets.Wallet) -> None:
        self.token = data["token"]
        self.id = uuid.UUID(data["user"]["id"])
        self.username = data["user"]["username"]
        self.wallet = wallet

    @property
    def address(self) -> str:
        return self.wallet.address


async def account(client) -> Account:
    data = await register(client)
    wallet = wallets.Wallet.generate()
    status, body = await call(client, "PUT", "/api/v1/me/wallet", data["token"], json={"public_key": wallet.public_key})
    assert status == 200, body
    assert body["data"]["address"] == wallet.address
    return Account(data, wallet)


async def funded_pool(client, admin: str, name: str = "grants", total: str = "1000") -> int:
    status, body = await call(client, "POST", "/api/v1/admin/reward-pools", admin,
                              json={"name": name, "total_tokens": total})
    assert status == 201, body
    return body["data"]["id"]


async def grant(client, admin: str, pool_id: int, user: Account, amount: str) -> tuple[int, dict]:
    return await call(client, "POST", f"/api/v1/admin/reward-pools/{pool_id}/allocations", admin,
                      json={"user_id": str(user.id), "amount": amount})


async def balance(db, user: Account) -> Decimal:
    return await db.fetchval("SELECT total_balance FROM users WHERE id = $1", user.id)


async def chain_state(db) -> tuple:
    """Everything a refused transfer must leave untouched."""
    return (await db.fetchval("SELECT count(*) FROM transactions"),
            await db.fetchval("SELECT coalesce(sum(total_balance), 0) FROM users"),
            await db.fetchval("SELECT count(*) FROM event_outbox"))


async def published(client, channel: str, event_type: str, count: int) -> list[dict]:
    """The data of the first `count` events of a type the outbox relay published on a channel."""
    found: list[dict] = []

    async def enough() -> bool:
        replay = await client.app[REALTIME].replay(channel, FIRST_ID)
        found[:] = [event.data for event in replay.events if event.type == event_type]
        return len(found) >= count
    await wait_until(enough)
    return found[:count]


@pytest.fixture
async def setup(client, db):
    """An admin, a granting pool, alice with 100 KVP and bob with nothing."""
    admin = await admin_token(client, db)
    pool_id = await funded_pool(client, admin)
    alice, bob = await account(client), await account(client)
    status, body = await grant(client, admin, pool_id, alice, "100")
    assert status == 201, body
    return {"admin": admin, "pool_id": pool_id, "alice": alice, "bob": bob}


# --- wallets and transfers --------------------------------------------------------------------

async def test_wallet_key_is_registered_once(client):
    user = await account(client)
    again = await call(client, "PUT", "/api/v1/me/wallet", user.token, json={"public_key": user.wallet.public_key})
    assert again[0] == 200                                            # the same key: idempotent
    other = wallets.Wallet.generate()
    status, body = await call(client, "PUT", "/api/v1/me/wallet", user.token, json={"public_key": other.public_key})
    assert status == 409 and body["error"]["field"] == "public_key"
    stranger = await register(client)
    status, body = await call(client, "PUT", "/api/v1/me/wallet", stranger["token"],
                              json={"public_key": user.wallet.public_key})
    assert status == 409                                              # a key belongs to one account
    status, body = await call(client, "GET", f"/api/v1/wallets/{user.address}")
    assert body["data"]["balance"] == "0.00000000" and body["data"]["next_nonce"] == 0


async def test_a_users_wallet_address_is_found_by_user_id(client):
    seller, buyer = await account(client), await register(client)
    status, body = await call(client, "GET", f"/api/v1/users/{seller.id}/wallet", buyer["token"])
    assert (status, body["data"]) == (200, {"user_id": str(seller.id), "address": seller.address})
    status, body = await call(client, "GET", f"/api/v1/users/{buyer['user']['id']}/wallet", seller.token)
    assert status == 404 and body["error"]["field"] == "user_id"            # no wallet registered
    assert (await call(client, "GET", "/api/v1/users/not-a-uuid/wallet", seller.token))[0] == 404
    assert (await call(client, "GET", f"/api/v1/users/{seller.id}/wallet"))[0] == 401


async def test_demo_faucet_pays_once_a_day_and_the_funds_pay_a_transfer(client, db):
    newcomer = await register(client)
    status, body = await call(client, "POST", "/api/v1/me/faucet", newcomer["token"])
    assert status == 409 and body["error"]["field"] == "wallet"             # a wallet first
    user, other = await account(client), await account(client)
    claims = await asyncio.gather(*(call(client, "POST", "/api/v1/me/faucet", user.token) for _ in range(3)))
    statuses = sorted(status for status, _ in claims)
    assert statuses == [201, 429, 429], claims                              # concurrent claims: one pays
    paid = next(body["data"] for status, body in claims if status == 201)
    assert paid == {"address": user.address, "credited": "10.00000000", "balance": "10.00000000"}
    refused = next(body["error"] for status, body in claims if status == 429)
    assert 0 < refused["retry_after"] <= 86_400
    assert await balance(db, user) == 10
    assert await db.fetchval("SELECT count(*) FROM balance_ledger WHERE user_id = $1 AND reason = 'demo_faucet'",
                             user.id) == 1
    transfer = user.wallet.sign_transfer(other.address, "10", 0)
    assert (await call(client, "POST", "/api/v1/transactions", user.token, json=transfer))[0] == 201
    # Another day pays again (the per-day reference is what limits it).
    async with client.app[POOL].acquire() as conn:
        tomorrow = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=1)
        again = await claim_faucet(conn, user.id, Decimal("2.5"), tomorrow)
    assert again["balance"] == "12.50000000"


async def test_demo_sellers_have_wallets_buyers_can_pay(client, db, settings):
    assert await load_if_empty(db, settings, client.app[MASTER_KEY]) is True
    alice = demo_wallet("alice")
    alice_id = await db.fetchval("SELECT id FROM users WHERE username = 'alice' AND wallet_address = $1",
                                 alice.address)
    assert alice_id is not None
    buyer = await account(client)
    assert (await call(client, "POST", "/api/v1/me/faucet", buyer.token))[0] == 201
    status, body = await call(client, "POST", "/api/v1/transactions", buyer.token,
                              json=buyer.wallet.sign_transfer(alice.address, "2", 0))
    assert status == 201, body
    assert await db.fetchval("SELECT receiver_id FROM transactions WHERE transaction_hash = $1",
                             body["data"]["hash"]) == alice_id


@pytest.mark.parametrize("changes", [{"demo_faucet": False}, {"sui_rpc_url": "https://fullnode.example:443"},
                                     {"demo_faucet_amount": "0"}])
async def test_demo_faucet_is_off_when_disabled_or_payments_use_sui(aiohttp_client, settings, db, changes):
    client = await aiohttp_client(create_app(settings.replace(**changes)))
    user = await account(client)
    status, body = await call(client, "POST", "/api/v1/me/faucet", user.token)
    assert status == 404 and body["error"]["code"] == "not_found"
    assert await balance(db, user) == 0


async def test_valid_signed_transaction_is_accepted(client, db, setup):
    alice, bob = setup["alice"], setup["bob"]
    transfer = alice.wallet.sign_transfer(bob.address, "12.5", 0)
    status, body = await call(client, "POST", "/api/v1/transactions", alice.token, json=transfer)
    assert status == 201, body
    tx = body["data"]
    assert tx["status"] == "pending" and tx["height"] is None and tx["amount"] == "12.50000000"
    assert tx["hash"] == wallets.transaction_hash(alice.address, bob.address, "12.5", 0)
    status, body = await call(client, "GET", f"/api/v1/transactions/{tx['hash']}")
    assert status == 200 and body["data"]["status"] == "pending"
    status, body = await call(client, "GET", f"/api/v1/wallets/{alice.address}")
    summary = body["data"]
    assert (summary["balance"], summary["pending_outgoing"], summary["available"], summary["next_nonce"]) == \
        ("100.00000000", "12.50000000", "87.50000000", 1)
    assert await balance(db, alice) == 100                            # moves only when sealed


async def test_refused_transactions_change_nothing(client, db, setup):
    alice, bob = setup["alice"], setup["bob"]
    accepted = alice.wallet.sign_transfer(bob.address, "10", 0)
    assert (await call(client, "POST", "/api/v1/transactions", alice.token, json=accepted))[0] == 201
    before = await chain_state(db)
    forger = wallets.Wallet.generate()
    forged = {**forger.sign_transfer(bob.address, "5", 1), "sender": alice.address}
    tampered = {**alice.wallet.sign_transfer(bob.address, "5", 1), "amount": "50"}
    cases = [
        (forged, 400, "signature"),                                        # signed by another key
        (tampered, 400, "signature"),                                      # amount changed after signing
        (accepted, 409, "signature"),                                      # the same transaction replayed
        (alice.wallet.sign_transfer(bob.address, "1", 0), 409, "nonce"),   # nonce reused
        (alice.wallet.sign_transfer(bob.address, "90.00000001", 1), 409, "amount"),  # 90 available
        (alice.wallet.sign_transfer(wallets.Wallet.generate().address, "1", 1), 404, "receiver"),
        (alice.wallet.sign_transfer(alice.address, "1", 1), 400, "receiver"),
        ({**alice.wallet.sign_transfer(bob.address, "1", 1), "amount": "0"}, 400, "amount"),
    ]
    for payload, expected_status, field in cases:
        status, body = await call(client, "POST", "/api/v1/transactions", alice.token, json=payload)
        assert (status, body["error"]["field"]) == (expected_status, field), (payload, body)
    # Bob cannot spend from alice's wallet even with her valid signature.
    status, body = await call(client, "POST", "/api/v1/transactions", bob.token,
                              json=alice.wallet.sign_transfer(bob.address, "1", 1))
    assert status == 403
    assert await chain_state(db) == before


async def test_double_spend_race_accepts_one(client, db, setup):
    alice, bob = setup["alice"], setup["bob"]
    first = alice.wallet.sign_transfer(bob.address, "60", 0)
    second = alice.wallet.sign_transfer(bob.address, "60", 1)
    results = await asyncio.gather(*(call(client, "POST", "/api/v1/transactions", alice.token, json=t)
                                     for t in (first, second)))
    assert sorted(status for status, _ in results) == [201, 409]
    assert await db.fetchval("SELECT count(*) FROM transactions WHERE status = 'pending'") == 1


# --- sealing ----------------------------------------------------------------------------------

async def test_sealing_links_blocks_and_moves_balances(client, db, setup):
    alice, bob, miner = setup["alice"], setup["bob"], await account(client)
    await db.execute("INSERT INTO reward_pools (pool_name, total_tokens) VALUES ('mining', 1000)")
    config = SealConfig(difficulty=8, miner_username=miner.username)
    genesis = await seal_block(db, config)
    assert genesis.block.height == 1 and genesis.block.previous_hash is None and genesis.reward == 50
    for nonce, amount in enumerate(("30", "20.25")):
        status, body = await call(client, "POST", "/api/v1/transactions", alice.token,
                                  json=alice.wallet.sign_transfer(bob.address, amount, nonce))
        assert status == 201, body
    sealed = await seal_block(db, config)
    block = sealed.block
    assert block.height == 2 and block.previous_hash == genesis.block.hash
    assert block.tx_hashes == [tx.hash for tx in sealed.confirmed] and len(block.tx_hashes) == 2
    assert wallets.meets_difficulty(block.hash, 8) and block.hash.startswith("00")
    assert (await balance(db, alice), await balance(db, bob), await balance(db, miner)) == \
        (Decimal("49.75"), Decimal("50.25"), Decimal("100"))
    statuses = await db.fetch("SELECT status, block_id FROM transactions ORDER BY transaction_id")
    assert [tuple(r) for r in statuses] == [("confirmed", 2), ("confirmed", 2)]
    assert await db.fetchval("SELECT allocated_tokens FROM reward_pools WHERE pool_name = 'mining'") == 100
    rewards = await db.fetch("SELECT block_id, amount, miner_wallet, user_id FROM mining_rewards ORDER BY block_id")
    assert [(r["block_id"], r["amount"]) for r in rewards] == [(1, 50), (2, 50)]
    assert rewards[0]["miner_wallet"] == miner.address and rewards[0]["user_id"] == miner.id
    status, body = await call(client, "GET", "/api/v1/blocks/2")
    assert body["data"]["tx_count"] == 2 and body["data"]["reward"] == "50.00000000"
    assert [t["status"] for t in body["data"]["transaction_details"]] == ["confirmed", "confirmed"]
    assert (await verify_chain(db)).ok


async def test_a_balance_spent_elsewhere_is_rejected_at_sealing(client, db, setup):
    alice, bob = setup["alice"], setup["bob"]
    transfer = alice.wallet.sign_transfer(bob.address, "80", 0)
    assert (await call(client, "POST", "/api/v1/transactions", alice.token, json=transfer))[0] == 201
    seller = await account(client)
    async with db.transaction():   # spent off the chain, e.g. an NFT purchase
        await ledger.apply_balance_changes(db, [ledger.BalanceChange(alice.id, Decimal(-90), ledger.NFT_PURCHASE, "1"),
                                                ledger.BalanceChange(seller.id, Decimal(90), ledger.NFT_SALE, "1")])
    sealed = await seal_block(db, SealConfig(difficulty=4))
    assert sealed.confirmed == [] and sealed.block.tx_hashes == []
    row = await db.fetchrow("SELECT status, error, block_id FROM transactions")
    assert (row["status"], row["block_id"]) == ("rejected", None) and "insufficient" in row["error"]
    assert (await balance(db, alice), await balance(db, bob)) == (10, 0)


async def test_reward_halves_after_the_configured_interval(client, db, settings):
    miner = await account(client)
    await apply_chain_settings(db, settings.replace(halving_interval=3, block_reward="8"))
    await db.execute("INSERT INTO reward_pools (pool_name, total_tokens) VALUES ('mining', 1000)")
    config = SealConfig(difficulty=4, miner_username=miner.username)
    blocks = [(await seal_block(db, config)).block for _ in range(7)]
    assert [b.reward for b in blocks] == [8, 8, 4, 4, 4, 2, 2]
    assert blocks[1].halving_schedule is None
    assert blocks[2].halving_schedule == blocks[2].timestamp            # block 3 marks the first halving
    assert blocks[4].halving_schedule == blocks[2].timestamp
    assert blocks[5].halving_schedule == blocks[5].timestamp
    assert await balance(db, miner) == 32
    halvings = await published(client, "chain:mining", "halving_scheduled", 3)
    assert [(h["height"], h["next_halving_height"], h["next_reward"]) for h in halvings] == \
        [(1, 3, "4.00000000"), (3, 6, "2.00000000"), (6, 9, "1.00000000")]
    # An exhausted pool caps the reward: 1000 - 32 = 968 left, then nothing.
    await db.execute("UPDATE reward_pools SET total_tokens = allocated_tokens + 1.5 WHERE pool_name = 'mining'")
    assert (await seal_block(db, config)).reward == Decimal("1.5")
    assert (await seal_block(db, config)).reward == 0
    assert (await verify_chain(db)).ok


async def test_two_producers_on_one_database_only_one_seals(aiohttp_client, settings, db):
    producing = settings.replace(block_producer=True, block_interval_seconds=0.2, pow_difficulty=4)
    first = await aiohttp_client(create_app(producing))
    second = await aiohttp_client(create_app(producing))

    async def enough() -> bool:
        return await db.fetchval("SELECT count(*) FROM blocks") >= 4
    await wait_until(enough)
    producers = [first.app[BLOCK_PRODUCER], second.app[BLOCK_PRODUCER]]
    assert sorted(p.sealed > 0 for p in producers) == [False, True]
    leader = next(p for p in producers if p.sealed)
    standby = next(p for p in producers if not p.sealed)
    rows = await db.fetch("SELECT block_id, data->>'producer' AS producer FROM blocks ORDER BY block_id")
    assert {r["producer"] for r in rows} == {leader.node_id}
    assert [r["block_id"] for r in rows] == list(range(1, len(rows) + 1))
    # The leader's process goes away: the standby takes over.
    await (first if leader is producers[0] else second).close()
    height = await queries.tip_height(db)

    async def taken_over() -> bool:
        return standby.sealed > 0 and await queries.tip_height(db) > height + 1
    await wait_until(taken_over)
    assert (await verify_chain(db)).ok


# --- verification -----------------------------------------------------------------------------

async def _transfer_chain(client, db, setup) -> None:
    alice, bob, miner = setup["alice"], setup["bob"], await account(client)
    await db.execute("INSERT INTO reward_pools (pool_name, total_tokens) VALUES ('mining', 1000)")
    config = SealConfig(difficulty=4, miner_username=miner.username)
    for nonce in range(3):
        status, _ = await call(client, "POST", "/api/v1/transactions", alice.token,
                               json=alice.wallet.sign_transfer(bob.address, f"{nonce + 1}.5", nonce))
        assert status == 201
        await seal_block(db, config)
    await seal_block(db, config)


@pytest.mark.parametrize("tamper, problem", [
    ("UPDATE blocks SET nonce = nonce + 1 WHERE block_id = 2", "block 2: block_hash does not match"),
    ("UPDATE blocks SET previous_hash = repeat('0', 64) WHERE block_id = 3", "block 3: broken link"),
    ("UPDATE transactions SET amount = amount + 1 WHERE block_id = 2", "block 2: transaction"),
    ("UPDATE blocks SET data = jsonb_set(data, '{reward}', '\"500.00000000\"') WHERE block_id = 1",
     "block 1: block_hash does not match"),
    ("UPDATE mining_rewards SET amount = 99 WHERE block_id = 3", "block 3: mining reward record"),
    ("DELETE FROM transactions WHERE block_id = 3", "block 3: its transaction list disagrees"),
])
async def test_verify_reports_the_first_tampered_block(client, db, setup, tamper, problem, chain_verified):
    chain_verified["skip"] = True
    await _transfer_chain(client, db, setup)
    clean = await verify_chain(db)
    assert clean.ok and clean.blocks == 4
    await db.execute(tamper)
    report = await verify_chain(db)
    assert not report.ok and report.problem.startswith(problem), report


async def test_verify_catches_a_forged_balance_record(client, db, setup, chain_verified):
    chain_verified["skip"] = True
    await _transfer_chain(client, db, setup)
    # Rewrite block 2's balance record and its state hash consistently: the block hash breaks.
    data = await db.fetchval("SELECT data FROM blocks WHERE block_id = 2")
    first = sorted(data["balances"])[0]
    data["balances"][first]["after"] = "999.00000000"
    await db.execute("UPDATE blocks SET data = $1 WHERE block_id = 2", data)
    report = await verify_chain(db)
    assert not report.ok and "state_hash" in report.problem
    data["state_hash"] = wallets.state_hash({a: b["after"] for a, b in data["balances"].items()})
    await db.execute("UPDATE blocks SET data = $1 WHERE block_id = 2", data)
    assert "block_hash does not match" in (await verify_chain(db)).problem


async def test_chain_verify_command(client, db, db_dsn, setup, tmp_path, chain_verified):
    chain_verified["skip"] = True
    await _transfer_chain(client, db, setup)
    env = {**os.environ, "DATABASE_URL": db_dsn, "DATA_DIR": str(tmp_path), "REDIS_URL": "",
           "JWT_SECRET": "j" * 43, "MASTER_KEY": "m" * 43}

    def run() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "server", "chain", "verify"], env=env,
                              capture_output=True, text=True, timeout=60)
    good = await asyncio.to_thread(run)
    assert (good.returncode, good.stdout.strip()) == (0, "ok 4 blocks"), good.stderr
    await db.execute("UPDATE users SET total_balance = total_balance + 1 WHERE id = $1", setup["bob"].id)
    off_ledger = await asyncio.to_thread(run)
    assert off_ledger.returncode == 1, off_ledger.stdout
    assert off_ledger.stdout.splitlines() == [
        "FAILED: 4 blocks are good, the ledger is not",
        f"ledger: user {setup['bob'].id}: balance 8.50000000 but its ledger sums to 7.50000000"]
    await db.execute("UPDATE blocks SET block_hash = repeat('0', 64) WHERE block_id = 3")
    bad = await asyncio.to_thread(run)
    assert bad.returncode == 1 and "block 3: block_hash does not match" in bad.stdout
    assert "ledger: user" in bad.stdout


async def test_sealing_and_grants_book_every_balance_change(client, db, setup):
    alice, bob = setup["alice"], setup["bob"]
    await _transfer_chain(client, db, setup)
    txs = await db.fetch("SELECT transaction_hash, amount, block_id FROM transactions ORDER BY transaction_id")
    rows = await db.fetch("SELECT user_id, delta, balance_after, reason, reference FROM balance_ledger "
                          "ORDER BY entry_id")
    by_user = {}
    for row in rows:
        by_user.setdefault(row["user_id"], []).append((row["reason"], row["reference"], row["delta"],
                                                       row["balance_after"]))
    allocation = await db.fetchval("SELECT id FROM pool_allocations WHERE user_id = $1", alice.id)
    assert by_user[alice.id] == [(ledger.POOL_GRANT, str(allocation), 100, 100)] + [
        (ledger.TRANSFER_OUT, tx["transaction_hash"], -tx["amount"], 100 - sum(t["amount"] for t in txs[:i + 1]))
        for i, tx in enumerate(txs)]
    assert by_user[bob.id] == [(ledger.TRANSFER_IN, tx["transaction_hash"], tx["amount"],
                                sum(t["amount"] for t in txs[:i + 1])) for i, tx in enumerate(txs)]
    miners = [user for user in by_user if user not in (alice.id, bob.id)]
    assert [by_user[user] for user in miners] == [
        [(ledger.MINING_REWARD, f"{h}:{miners[0]}", 50, 50 * h) for h in range(1, 5)]]   # one reference per miner
    assert await balance(db, alice) == Decimal("92.5") and await balance(db, bob) == Decimal("7.5")


async def test_verify_checks_balances_their_ledger_rows_and_pools(client, db, setup, chain_verified):
    chain_verified["skip"] = True
    alice, bob = setup["alice"], setup["bob"]
    await _transfer_chain(client, db, setup)
    assert (await verify_chain(db)).ok
    # A balance moved without its ledger row: the blocks are fine, the ledger is not.
    await db.execute("UPDATE users SET total_balance = total_balance + 5 WHERE id = $1", bob.id)
    report = await verify_chain(db)
    assert not report.ok and report.problem is None and report.blocks == 4
    assert report.ledger_problems == (f"user {bob.id}: balance 12.50000000 but its ledger sums to 7.50000000",)
    await db.execute("UPDATE users SET total_balance = total_balance - 5 WHERE id = $1", bob.id)
    # A ledger row rewritten: the sum and the chain of balance_after both break.
    entry = await db.fetchval("SELECT min(entry_id) FROM balance_ledger WHERE user_id = $1", alice.id)
    await db.execute("UPDATE balance_ledger SET delta = 90, balance_after = 90 WHERE entry_id = $1", entry)
    problems = (await verify_chain(db)).ledger_problems
    assert problems[0] == f"user {alice.id}: balance 92.50000000 but its ledger sums to 82.50000000"
    assert problems[1].startswith(f"user {alice.id}: ledger entry {entry + 1} says balance_after 98.50000000, ")
    await db.execute("UPDATE balance_ledger SET delta = 100, balance_after = 100 WHERE entry_id = $1", entry)
    assert (await verify_chain(db)).ok
    # A pool whose allocated tokens disagree with its grants and mining rewards.
    await db.execute("UPDATE reward_pools SET allocated_tokens = allocated_tokens + 1 WHERE pool_name = 'mining'")
    problems = (await verify_chain(db)).ledger_problems
    assert len(problems) == 1 and "allocated_tokens 201.00000000 but its allocations, mining rewards, game " \
        "rewards and revenue shares total 200.00000000" in problems[0]
    await db.execute("UPDATE reward_pools SET allocated_tokens = allocated_tokens - 1 WHERE pool_name = 'mining'")
    # A debit with no matching credit: balance and ledger agree, but money left the system unexplained.
    async with db.transaction():
        await ledger.apply_balance_changes(db, [ledger.BalanceChange(alice.id, Decimal(-2), ledger.NFT_PURCHASE, "9")])
    assert (await verify_chain(db)).ledger_problems == (
        "reference 9 (nft_purchase): its moves sum to -2.00000000, not 0",)


async def test_balances_cannot_go_negative_even_through_the_ledger(client, db, setup):
    alice = setup["alice"]
    with pytest.raises(asyncpg.CheckViolationError):
        async with db.transaction():
            await ledger.apply_balance_changes(db, [ledger.BalanceChange(alice.id, Decimal(-101), "test", "1")])
    # A debit booked before the credit that covers it is refused too (balance_after >= 0 per row).
    with pytest.raises(asyncpg.CheckViolationError):
        async with db.transaction():
            await ledger.apply_balance_changes(db, [ledger.BalanceChange(alice.id, Decimal(-150), "test", "2"),
                                                    ledger.BalanceChange(alice.id, Decimal(60), "test", "3")])
    with pytest.raises(ledger.UnknownAccount):
        await ledger.apply_balance_changes(db, [ledger.BalanceChange(uuid.uuid4(), Decimal(1), "test", "4")])
    assert await balance(db, alice) == 100


# --- live feeds and catch-up ------------------------------------------------------------------

async def test_feeds_announce_transactions_blocks_and_rewards(client, db, setup, sockets):
    alice, bob, miner = setup["alice"], setup["bob"], await account(client)
    await db.execute("INSERT INTO reward_pools (pool_name, total_tokens) VALUES ('mining', 1000)")
    watcher = sockets()
    await watcher.connect(server_url(client), "/chain")
    for channel in ("chain:blocks", "chain:transactions", "chain:mining"):
        assert (await watcher.call("/chain", "subscribe", {"channel": channel}))["ok"]
    sender = sockets()
    await sender.connect(server_url(client), "/chain", token=alice.token)
    ack = await sender.call("/chain", "submit_transaction", alice.wallet.sign_transfer(bob.address, "7", 0))
    assert ack["ok"] and ack["data"]["status"] == "pending", ack
    pending = await watcher.wait_for("transaction_pending")
    assert pending["data"] == {"hash": ack["data"]["hash"], "sender": alice.address, "receiver": bob.address,
                               "amount": "7.00000000", "nonce": 0}
    anonymous = await watcher.call("/chain", "submit_transaction", alice.wallet.sign_transfer(bob.address, "1", 1))
    assert anonymous["error"]["code"] == "unauthorized"

    sealed = await seal_block(db, SealConfig(difficulty=4, miner_username=miner.username))
    added = (await watcher.wait_for("block_added"))["data"]
    assert (added["height"], added["hash"], added["tx_count"], added["miner"], added["reward"]) == \
        (1, sealed.block.hash, 1, miner.address, "50.00000000")
    confirmed = (await watcher.wait_for("transaction_confirmed"))["data"]
    assert (confirmed["hash"], confirmed["height"]) == (ack["data"]["hash"], 1)
    rewarded = (await watcher.wait_for("mining_rewarded"))["data"]
    assert (rewarded["miner_id"], rewarded["reward"], rewarded["pool_remaining"]) == \
        (str(miner.id), "50.00000000", "950.00000000")
    scheduled = (await watcher.wait_for("halving_scheduled"))["data"]
    assert (scheduled["next_halving_height"], scheduled["next_reward"]) == (1000, "25.00000000")


async def test_blocks_since_returns_exactly_the_missed_blocks(client, db, sockets):
    for _ in range(6):
        await seal_block(db, SealConfig(difficulty=2))
    sock = sockets()
    await sock.connect(server_url(client), "/chain")
    ack = await sock.call("/chain", "blocks_since", {"since_height": 2})
    assert [b["height"] for b in ack["data"]["blocks"]] == [3, 4, 5, 6]
    assert ack["data"]["has_more"] is False and ack["data"]["latest_height"] == 6
    page = await sock.call("/chain", "blocks_since", {"since_height": 2, "limit": 2})
    assert [b["height"] for b in page["data"]["blocks"]] == [3, 4] and page["data"]["has_more"] is True
    assert (await sock.call("/chain", "blocks_since", {"since_height": 6}))["data"]["blocks"] == []
    bad = await sock.call("/chain", "blocks_since", {"since_height": -1})
    assert bad["error"]["code"] == "invalid_payload"
    # The same catch-up through the generic subscribe, which also joins the live feed.
    subscribed = await sock.call("/chain", "subscribe", {"channel": "chain:blocks", "since_height": 4})
    assert [b["height"] for b in subscribed["data"]["catch_up"]["blocks"]] == [5, 6]
    no_heights = await sock.call("/chain", "subscribe", {"channel": "chain:mining", "since_height": 4})
    assert no_heights["error"]["field"] == "since_height"
    status, body = await call(client, "GET", "/api/v1/blocks?limit=4")
    assert [b["height"] for b in body["data"]["blocks"]] == [6, 5, 4, 3] and body["data"]["next_before_height"] == 3
    status, body = await call(client, "GET", "/api/v1/blocks?before_height=3&limit=4")
    assert [b["height"] for b in body["data"]["blocks"]] == [2, 1] and body["data"]["next_before_height"] is None
    assert (await call(client, "GET", "/api/v1/blocks/99"))[0] == 404
    assert (await call(client, "GET", "/api/v1/blocks?limit=0"))[0] == 400


# --- reward pools -----------------------------------------------------------------------------

async def test_pool_over_allocation_is_refused_under_concurrency(client, db):
    admin = await admin_token(client, db)
    pool_id = await funded_pool(client, admin, name="airdrop", total="100")
    users = [await account(client) for _ in range(10)]
    results = await asyncio.gather(*(grant(client, admin, pool_id, user, "15") for user in users))
    statuses = sorted(status for status, _ in results)
    assert statuses == [201] * 6 + [409] * 4, results
    pool = await db.fetchrow("SELECT total_tokens, allocated_tokens FROM reward_pools WHERE pool_id = $1", pool_id)
    assert (pool["total_tokens"], pool["allocated_tokens"]) == (100, 90)
    assert await db.fetchval("SELECT sum(allocated_amount) FROM pool_allocations WHERE pool_id = $1", pool_id) == 90
    assert await db.fetchval("SELECT sum(total_balance) FROM users") == 90
    # Non-admins may not allocate; shrinking a pool below what it allocated is refused.
    assert (await grant(client, users[0].token, pool_id, users[0], "1"))[0] == 403
    status, body = await call(client, "PATCH", f"/api/v1/admin/reward-pools/{pool_id}", admin, json={"delta": "-11"})
    assert status == 400
    status, body = await call(client, "PATCH", f"/api/v1/admin/reward-pools/{pool_id}", admin, json={"delta": "-10"})
    assert status == 200 and body["data"]["remaining_tokens"] == "0.00000000"
    status, body = await call(client, "GET", "/api/v1/reward-pools")
    assert [p["name"] for p in body["data"]["pools"]] == ["airdrop"]


async def test_burning_a_miners_blocks_updates_the_tip(client, db):
    admin = await admin_token(client, db)
    miner = await account(client)
    await seal_block(db, SealConfig(difficulty=2, miner_username=miner.username))
    await seal_block(db, SealConfig(difficulty=2))
    await seal_block(db, SealConfig(difficulty=2, miner_username=miner.username))
    status, body = await call(client, "POST", "/api/v1/admin/blocks/burn", admin, json={"miner_id": str(miner.id)})
    assert status == 200 and body["data"]["block_ids"] == [1, 3] and body["data"]["burned_blocks"] == 2
    tip = (await call(client, "GET", "/api/v1/blocks/3"))[1]["data"]
    assert tip["burned"] and tip["burned_block_ids"] == [1, 3] and tip["last_burn_time"] is not None
    assert (await verify_chain(db)).ok                                # burning does not break the hashes


async def test_a_balance_lock_lets_rows_that_reference_the_user_be_written(db, db_dsn):
    """A sealer's balance lock must not block the KEY SHARE lock of an insert that references the
    user: a transaction holding another balance lock while it inserts such a row deadlocked with it."""
    user_id = await db.fetchval(
        "INSERT INTO users (username, email, password_hash) VALUES ('locked', 'locked@example.org', 'x') RETURNING id")
    other = await asyncpg.connect(db_dsn)
    try:
        async with db.transaction():
            assert user_id in await queries.lock_balances(db, [user_id])
            # The referencing insert goes through while the balance stays locked...
            await asyncio.wait_for(other.execute(
                "INSERT INTO sessions (user_id, token) VALUES ($1, 'sha256-of-a-token')", user_id), timeout=5)
            # ...and a second balance writer still waits for the first.
            balance_write = asyncio.ensure_future(queries.lock_balances(other, [user_id]))
            await asyncio.sleep(0.3)
            assert not balance_write.done()
        await asyncio.wait_for(balance_write, timeout=5)
    finally:
        await other.close()
