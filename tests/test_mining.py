"""User mining against real PostgreSQL: real proof-of-work shares from several Node miners, a Mobile miner
with heartbeats and a daily cap, a cheater refused with clear reasons, the block reward split by the
documented weights (exact amounts, the pool and the ledger agree), and the private "my mining" feed."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import uuid
from decimal import Decimal

import pytest

from db import ledger
from db import mining as mining_queries
from server.app import create_app
from server.core.errors import Conflict
from server.services import mining
from server.services.chain import SealConfig, mining_reference, seal_block
from tests.helpers import server_url
from tests.test_chain import account, admin_token, balance, call, funded_pool, published

# Every test here ends with `chain verify` passing: blocks, balances against the ledger, pools.
pytestmark = pytest.mark.usefixtures("chain_verified")

DIFFICULTY = 8
SHARES_PER_MINUTE = 5
DAILY_CAP = 100
OVERRIDES = {"mining_share_difficulty": DIFFICULTY, "mining_shares_per_minute": SHARES_PER_MINUTE,
             "mining_stale_grace_seconds": 0.0, "mobile_mining_seconds_per_day": DAILY_CAP,
             "mining_session_timeout_seconds": 60, "mining_mobile_second_weight": "0.1"}
SEAL = SealConfig(difficulty=2, mobile_second_weight=Decimal("0.1"))


@pytest.fixture
def mining_settings(settings):
    """Settings with an 8-bit share difficulty, 5 shares a minute, no stale grace, a 100 s Mobile day."""
    return dataclasses.replace(settings, **OVERRIDES)


@pytest.fixture
async def client(mining_settings, aiohttp_client):
    """A real app on a real socket."""
    return await aiohttp_client(create_app(mining_settings))


@pytest.fixture
async def setup(client, db):
    """A 1000-token mining pool and four users with wallets."""
    admin = await admin_token(client, db)
    pool_id = await funded_pool(client, admin, name="mining", total="1000")
    alice, bob, carol, dave = [await account(client) for _ in range(4)]
    return {"pool_id": pool_id, "alice": alice, "bob": bob, "carol": carol, "dave": dave}


async def start(client, user, device: str | None = None) -> tuple[int, dict]:
    return await call(client, "POST", "/api/v1/me/mining/start", user.token,
                      json={"device_type": device} if device else {})


async def share(client, user, challenge: str, nonce: int) -> tuple[int, dict]:
    return await call(client, "POST", "/api/v1/me/mining/shares", user.token,
                      json={"challenge": challenge, "nonce": nonce})


def solve_many(challenge: str, count: int) -> list[int]:
    """`count` distinct nonces whose shares meet the test difficulty (real proof of work)."""
    nonces, start_at = [], 0
    for _ in range(count):
        nonce, digest = mining.solve(challenge, DIFFICULTY, start_at)
        assert int(digest, 16) >> (256 - DIFFICULTY) == 0
        nonces.append(nonce)
        start_at = nonce + 1
    return nonces


def weak_nonce(challenge: str) -> int:
    """A nonce whose share does not meet the difficulty."""
    nonce = 0
    while mining.meets(mining.share_hash(challenge, nonce), DIFFICULTY):
        nonce += 1
    return nonce


async def rewind_heartbeat(db, user, seconds: int) -> None:
    """Pretend `seconds` went by since the session's last heartbeat."""
    await db.execute("UPDATE mining_sessions SET last_heartbeat_at = last_heartbeat_at - make_interval(secs => $2) "
                     "WHERE user_id = $1 AND ended_at IS NULL", user.id, seconds)


async def heartbeat(client, user) -> dict:
    status, body = await call(client, "POST", "/api/v1/me/mining/heartbeat", user.token)
    assert status == 200, body
    return body["data"]


# --- the split --------------------------------------------------------------------------------

async def test_a_block_splits_its_reward_among_node_and_mobile_miners_by_weight(client, db, setup, sockets):
    alice, bob, carol, dave = setup["alice"], setup["bob"], setup["carol"], setup["dave"]
    watcher = sockets()
    await watcher.connect(server_url(client), "/chain", token=alice.token)
    assert (await watcher.call("/chain", "subscribe", {"channel": f"user:{alice.id}"}))["ok"]

    # alice mines over the socket, bob over REST: 3 and 1 real shares.
    ack = await watcher.call("/chain", "start_mining", {"device_type": "Node"})
    assert ack["ok"], ack
    assert (ack["data"]["difficulty"], ack["data"]["tip_height"]) == (DIFFICULTY, 0)
    alice_challenge = ack["data"]["challenge"]
    assert alice_challenge == mining.challenge_for(None, ack["data"]["session"]["id"])
    for nonce in solve_many(alice_challenge, 3):
        reply = await watcher.call("/chain", "submit_share", {"challenge": alice_challenge, "nonce": nonce})
        assert reply["ok"], reply
    assert reply["data"]["session"]["unpaid_shares"] == 3
    status, body = await start(client, bob, "Node")
    assert status == 201, body
    bob_challenge = body["data"]["challenge"]
    assert bob_challenge != alice_challenge                     # one challenge per session
    status, body = await share(client, bob, bob_challenge, solve_many(bob_challenge, 1)[0])
    assert status == 201, body
    # carol's phone: 20 s of heartbeats, worth 20 x 0.1 = 2 shares.
    status, body = await start(client, carol, "Mobile")
    assert status == 201 and "challenge" not in body["data"], body
    await rewind_heartbeat(db, carol, 20)
    assert (await heartbeat(client, carol))["credited_seconds"] == 20
    # dave holds an open session but did no work: he gets nothing.
    assert (await start(client, dave, "Node"))[0] == 201

    # The configured miner is only the fallback: with users mining, dave's account as MINER_USERNAME gets nothing.
    sealed = await seal_block(db, dataclasses.replace(SEAL, miner_username=dave.username))
    # 50 KVP over weights 3 : 1 : 2 (total 6), each truncated to 8 decimals; 0.00000001 stays in the pool.
    expected = {alice.id: Decimal("25"), bob.id: Decimal("8.33333333"), carol.id: Decimal("16.66666666")}
    assert sealed.reward == Decimal("49.99999999")
    rows = await db.fetch("SELECT user_id, amount, device_type, shares, mobile_seconds, pool_id, miner_wallet "
                          "FROM mining_rewards WHERE block_id = 1")
    assert {row["user_id"]: (row["amount"], row["device_type"], row["shares"], row["mobile_seconds"],
                             row["pool_id"], row["miner_wallet"]) for row in rows} == {
        alice.id: (expected[alice.id], "Node", 3, 0, setup["pool_id"], alice.address),
        bob.id: (expected[bob.id], "Node", 1, 0, setup["pool_id"], bob.address),
        carol.id: (expected[carol.id], "Mobile", 0, 20, setup["pool_id"], carol.address)}
    for user, amount in expected.items():
        assert await db.fetchval("SELECT total_balance FROM users WHERE id = $1", user) == amount
        assert await db.fetch("SELECT delta, reason, reference FROM balance_ledger WHERE user_id = $1 AND reason = $2",
                              user, ledger.MINING_REWARD) == [(amount, ledger.MINING_REWARD,
                                                               mining_reference(1, user))]
    assert await balance(db, dave) == 0
    assert await db.fetchval("SELECT allocated_tokens FROM reward_pools WHERE pool_id = $1",
                             setup["pool_id"]) == Decimal("49.99999999")
    assert await db.fetchval("SELECT sum(delta) FROM balance_ledger WHERE reason = $1",
                             ledger.MINING_REWARD) == Decimal("49.99999999")

    status, body = await call(client, "GET", "/api/v1/blocks/1")
    assert (body["data"]["reward"], body["data"]["miner"], body["data"]["miner_id"]) == \
        ("49.99999999", alice.address, str(alice.id))             # the header names the largest part
    received = (await watcher.wait_for("mining_reward_received"))["data"]
    assert (received["height"], received["amount"], received["shares"], received["balance"]) == \
        (1, "25.00000000", 3, "25.00000000")
    carol_feed = await published(client, f"user:{carol.id}", mining.MINING_REWARD_RECEIVED, 1)
    assert (carol_feed[0]["amount"], carol_feed[0]["device_type"], carol_feed[0]["mobile_seconds"]) == \
        ("16.66666666", "Mobile", 20)
    assert len(await published(client, "chain:mining", "mining_rewarded", 3)) == 3

    # The work is paid once: the next block has none, so it pays nobody (no configured miner here).
    assert await db.fetchval("SELECT sum(unpaid_shares + unpaid_seconds) FROM mining_sessions") == 0
    assert (await seal_block(db, SEAL)).reward == 0


def test_the_split_never_pays_more_than_the_reward():
    rng = random.Random(18)
    for _ in range(300):
        work = [mining_queries.Work(uuid.uuid4(), f"user:{i}", rng.randint(0, 50), rng.randint(0, 3000))
                for i in range(rng.randint(1, 30))]
        reward = Decimal(rng.randint(1, 5_000_000_000)) / Decimal(10**8)
        payouts = mining.split_reward(reward, work, Decimal("0.1"))
        paid = sum((p.amount for p in payouts), Decimal(0))
        assert paid <= reward and reward - paid < Decimal("0.00000001") * len(work)
        assert all(p.amount == p.amount.quantize(Decimal("0.00000001")) and p.amount > 0 for p in payouts)
    assert mining.split_reward(Decimal(50), [], Decimal("0.1")) == []


# --- cheating ---------------------------------------------------------------------------------

async def test_a_cheater_is_refused_with_clear_reasons(client, db, setup, sockets):
    dave, carol = setup["dave"], setup["carol"]
    sock = sockets()
    await sock.connect(server_url(client), "/chain", token=dave.token)
    ack = await sock.call("/chain", "start_mining", {"device_type": "Node"})
    assert ack["ok"], ack
    challenge = ack["data"]["challenge"]

    # A second session at once, on the socket and over REST.
    again = await sock.call("/chain", "start_mining", {"device_type": "Node"})
    assert (again["error"]["code"], again["error"]["reason"]) == ("conflict", mining.SESSION_OPEN)
    status, body = await start(client, dave, "Node")
    assert (status, body["error"]["reason"]) == (409, mining.SESSION_OPEN)
    status, body = await call(client, "PUT", "/api/v1/me/mining/device", dave.token, json={"device_type": "Mobile"})
    assert (status, body["error"]["reason"]) == (409, mining.WRONG_DEVICE)

    # Below the difficulty.
    weak = await sock.call("/chain", "submit_share", {"challenge": challenge, "nonce": weak_nonce(challenge)})
    assert (weak["error"]["code"], weak["error"]["reason"], weak["error"]["field"]) == \
        ("invalid_payload", mining.LOW_DIFFICULTY, "nonce")
    # The same share twice.
    first, second, *rest = solve_many(challenge, SHARES_PER_MINUTE + 1)
    assert (await sock.call("/chain", "submit_share", {"challenge": challenge, "nonce": first}))["ok"]
    duplicate = await sock.call("/chain", "submit_share", {"challenge": challenge.upper(), "nonce": first})
    assert (duplicate["error"]["code"], duplicate["error"]["reason"]) == ("conflict", mining.DUPLICATE_SHARE)
    # Someone else's challenge (carol's session) is not dave's.
    status, body = await start(client, carol, "Node")
    assert status == 201, body
    status, body = await share(client, dave, body["data"]["challenge"], 0)
    assert (status, body["error"]["reason"]) == (409, mining.STALE_SHARE)
    # Over the rate limit: 5 a minute per session.
    for nonce in [second, *rest][:SHARES_PER_MINUTE - 1]:
        assert (await sock.call("/chain", "submit_share", {"challenge": challenge, "nonce": nonce}))["ok"]
    limited = await sock.call("/chain", "submit_share", {"challenge": challenge, "nonce": rest[-1]})
    assert (limited["error"]["code"], limited["error"]["reason"]) == ("rate_limited", mining.SHARE_RATE)
    assert 0 < limited["error"]["retry_after"] <= 60
    # Stale: a block landed, so the old challenge is refused and the current one named.
    await db.execute("DELETE FROM mining_shares WHERE user_id = $1", dave.id)   # lift the rate limit
    await seal_block(db, SEAL)
    stale = await sock.call("/chain", "submit_share", {"challenge": challenge, "nonce": rest[-1]})
    assert (stale["error"]["code"], stale["error"]["reason"]) == ("conflict", mining.STALE_SHARE)
    session_id = ack["data"]["session"]["id"]
    tip = await db.fetchval("SELECT block_hash FROM blocks WHERE block_id = 1")
    assert stale["error"]["challenge"] == mining.challenge_for(tip, session_id)
    # A Mobile session has no shares to give.
    mobile = setup["bob"]
    assert (await start(client, mobile, "Mobile"))[0] == 201
    status, body = await share(client, mobile, challenge, first)
    assert (status, body["error"]["reason"]) == (409, mining.WRONG_DEVICE)

    # Refusals record nothing: dave's 5 accepted shares were paid by block 1, none since.
    assert await db.fetchval("SELECT shares FROM mining_sessions WHERE id = $1", session_id) == SHARES_PER_MINUTE
    assert await db.fetchval("SELECT shares FROM mining_rewards WHERE block_id = 1 AND user_id = $1",
                             dave.id) == SHARES_PER_MINUTE


async def test_the_previous_tips_challenge_is_accepted_within_the_grace(db, setup):
    dave = setup["dave"]
    config = mining.MiningConfig(share_difficulty=DIFFICULTY, stale_grace=30.0)
    started = await mining.start(db, dave.id, "Node", config)
    challenge = started["challenge"]
    await seal_block(db, SEAL)
    nonce = solve_many(challenge, 1)[0]
    accepted = await mining.submit_share(db, dave.id, challenge, nonce, config)
    assert accepted["tip_height"] == 1 and accepted["challenge"] != challenge   # told the new challenge
    await seal_block(db, SEAL)                                                    # two blocks back: stale
    with pytest.raises(Conflict) as refused:
        await mining.submit_share(db, dave.id, challenge, solve_many(challenge, 2)[1], config)
    assert refused.value.extra["reason"] == mining.STALE_SHARE


async def test_two_concurrent_starts_open_one_session(client, setup):
    dave = setup["dave"]
    results = await asyncio.gather(*(start(client, dave, "Node") for _ in range(4)))
    assert sorted(status for status, _ in results) == [201, 409, 409, 409]
    assert all(body["error"]["reason"] == mining.SESSION_OPEN for status, body in results if status == 409)


# --- Mobile -----------------------------------------------------------------------------------

async def test_mobile_heartbeats_count_live_seconds_up_to_the_daily_cap(client, db, setup):
    carol = setup["carol"]
    status, body = await call(client, "PUT", "/api/v1/me/mining/device", carol.token, json={"device_type": "Mobile"})
    assert (status, body["data"]) == (200, {"device_type": "Mobile"})
    status, body = await start(client, carol)                                # the stored device type
    assert (status, body["data"]["session"]["device_type"]) == (201, "Mobile")

    await rewind_heartbeat(db, carol, 30)
    assert (await heartbeat(client, carol))["credited_seconds"] == 30
    await rewind_heartbeat(db, carol, 90)               # silent for longer than the 60 s timeout: nothing counts
    beat = await heartbeat(client, carol)
    assert (beat["credited_seconds"], beat["today_seconds"]) == (0, 30)
    await rewind_heartbeat(db, carol, 50)
    assert (await heartbeat(client, carol))["credited_seconds"] == 50
    await rewind_heartbeat(db, carol, 40)               # 80 counted today: 20 more reach the 100 s cap
    beat = await heartbeat(client, carol)
    assert (beat["credited_seconds"], beat["today_seconds"], beat["capped"]) == (20, DAILY_CAP, True)
    await rewind_heartbeat(db, carol, 10)
    assert (await heartbeat(client, carol))["credited_seconds"] == 0
    session = await db.fetchrow("SELECT active_seconds, unpaid_seconds FROM mining_sessions WHERE user_id = $1",
                                carol.id)
    assert (session["active_seconds"], session["unpaid_seconds"]) == (DAILY_CAP, DAILY_CAP)

    # Alone in the block, she takes the whole 50 KVP reward for her 100 s.
    sealed = await seal_block(db, SEAL)
    assert sealed.reward == 50 and await balance(db, carol) == 50

    # A session that went quiet is closed as expired when she starts again; stopping works once.
    await rewind_heartbeat(db, carol, 120)
    status, body = await start(client, carol, "Mobile")
    assert status == 201, body
    ended = await db.fetch("SELECT end_reason FROM mining_sessions WHERE user_id = $1 AND ended_at IS NOT NULL",
                           carol.id)
    assert [row["end_reason"] for row in ended] == ["expired"]
    status, body = await call(client, "POST", "/api/v1/me/mining/stop", carol.token)
    assert (status, body["data"]["session"]["end_reason"]) == (200, "stopped")
    status, body = await call(client, "POST", "/api/v1/me/mining/stop", carol.token)
    assert (status, body["error"]["reason"]) == (409, mining.NO_SESSION)
    stopped = await published(client, f"user:{carol.id}", mining.MINING_STOPPED, 2)
    assert [event["session"]["end_reason"] for event in stopped] == ["expired", "stopped"]


# --- my mining --------------------------------------------------------------------------------

async def test_my_mining_pages_the_callers_rewards_and_is_private(client, db, setup, sockets):
    alice, bob = setup["alice"], setup["bob"]
    status, body = await start(client, alice, "Node")
    assert status == 201, body
    for shares in (2, 2, 1):                       # 5 shares: the most a session may send in a minute
        status, body = await call(client, "GET", "/api/v1/me/mining", alice.token)
        challenge = body["data"]["challenge"]
        for nonce in solve_many(challenge, shares):
            assert (await share(client, alice, challenge, nonce))[0] == 201
        await seal_block(db, SEAL)

    status, body = await call(client, "GET", "/api/v1/me/mining?limit=2", alice.token)
    assert status == 200, body
    page = body["data"]
    assert [(r["height"], r["shares"]) for r in page["rewards"]] == [(3, 1), (2, 2)]
    assert all((r["amount"], r["device_type"]) == ("50.00000000", "Node") for r in page["rewards"])
    assert page["totals"] == {"rewards": 3, "amount": "150.00000000", "shares": 5, "mobile_seconds": 0}
    assert (page["device_type"], page["session"]["shares"], page["session"]["alive"]) == ("Node", 5, True)
    assert page["challenge"] == mining.challenge_for(
        await db.fetchval("SELECT block_hash FROM blocks WHERE block_id = 3"), page["session"]["id"])
    status, body = await call(client, "GET", f"/api/v1/me/mining?limit=2&before={page['next_before']}", alice.token)
    assert [r["height"] for r in body["data"]["rewards"]] == [1] and body["data"]["next_before"] is None

    # Private: bob sees only his own (nothing), anonymous callers nothing at all, and no one else's channel.
    status, body = await call(client, "GET", "/api/v1/me/mining", bob.token)
    assert (body["data"]["rewards"], body["data"]["session"], body["data"]["totals"]["rewards"]) == ([], None, 0)
    assert (await call(client, "GET", "/api/v1/me/mining"))[0] == 401
    sock = sockets()
    await sock.connect(server_url(client), "/chain", token=bob.token)
    spy = await sock.call("/chain", "subscribe", {"channel": f"user:{alice.id}"})
    assert not spy["ok"] and spy["error"]["code"] == "forbidden"
    mine = await sock.call("/chain", "get_my_mining", {"limit": 1})
    assert mine["ok"] and mine["data"]["rewards"] == []
    anonymous = sockets()
    await anonymous.connect(server_url(client), "/chain")
    assert (await anonymous.call("/chain", "get_my_mining"))["error"]["code"] == "unauthorized"
