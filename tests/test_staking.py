"""Staking against real PostgreSQL: exact balances and ledger rows, lock-up, per-block rewards from the
staking pool (and a dry one), one payment under concurrency, reserved funds, events, paging."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from decimal import Decimal

import pytest

from db import ledger
from db import staking as staking_queries
from server.app import create_app
from server.services.chain import SealConfig, seal_block
from tests.test_chain import account, admin_token, balance, call, funded_pool, grant, published

# Every test here ends with `chain verify` passing: an active stake's moves sum to -amount, a closed one's to 0.
pytestmark = pytest.mark.usefixtures("chain_verified")

LOCKUP = 3
RATE = Decimal("0.001")
OVERRIDES = {"staking_lockup_blocks": LOCKUP, "staking_reward_per_block_rate": str(RATE)}


@pytest.fixture
def staking_settings(settings):
    """Settings with a 3-block lock-up and a 0.1% per-block rate."""
    return dataclasses.replace(settings, **OVERRIDES)


@pytest.fixture
async def client(staking_settings, aiohttp_client):
    """A real app on a real socket, serving the staking routes."""
    return await aiohttp_client((create_app(staking_settings)))


@pytest.fixture
async def setup(client, db):
    """An admin, a 1000-token staking pool, alice with 100 KVP and bob with nothing."""
    admin = await admin_token(client, db)
    grants = await funded_pool(client, admin)
    staking_pool = await funded_pool(client, admin, name="staking", total="1000")
    alice, bob = await account(client), await account(client)
    status, body = await grant(client, admin, grants, alice, "100")
    assert status == 201, body
    return {"admin": admin, "pool_id": staking_pool, "alice": alice, "bob": bob}


async def seal(db, blocks: int) -> None:
    for _ in range(blocks):
        await seal_block(db, SealConfig(difficulty=2))


async def stake(client, user, amount: str, **extra) -> tuple[int, dict]:
    return await call(client, "POST", "/api/v1/me/stakes", user.token, json={"amount": amount, **extra})


async def action(client, user, stake_id: int, verb: str) -> tuple[int, dict]:
    return await call(client, "POST", f"/api/v1/me/stakes/{stake_id}/{verb}", user.token)


async def ledger_rows(db, user) -> list[tuple[str, Decimal, str]]:
    rows = await db.fetch("SELECT reason, delta, reference FROM balance_ledger WHERE user_id = $1 AND reason <> $2 "
                          "ORDER BY entry_id", user.id, ledger.POOL_GRANT)
    return [(row["reason"], row["delta"], row["reference"]) for row in rows]


async def pool_allocated(db, pool_id: int) -> Decimal:
    return await db.fetchval("SELECT allocated_tokens FROM reward_pools WHERE pool_id = $1", pool_id)


# --- stake and unstake ------------------------------------------------------------------------

async def test_stake_and_unstake_move_exact_balances_and_book_ledger_rows(client, db, setup):
    alice = setup["alice"]
    await seal(db, 2)                                                     # the stake opens at height 2
    status, body = await stake(client, alice, "40")
    assert status == 201, body
    opened = body["data"]
    assert (opened["amount"], opened["status"], opened["opened_height"], opened["unlock_height"],
            opened["paid_height"], opened["balance"]) == ("40.00000000", "active", 2, 2 + LOCKUP, 2, "60.00000000")
    assert await balance(db, alice) == 60
    sid = opened["id"]
    assert await ledger_rows(db, alice) == [(ledger.STAKE, Decimal(-40), str(sid))]

    await seal(db, LOCKUP)
    status, body = await action(client, alice, sid, "unstake")
    assert status == 200, body
    reward = RATE * 40 * LOCKUP                                           # 0.12
    result = body["data"]
    assert (result["paid"], result["unpaid"], result["pool_exhausted"], result["balance"]) == \
        ("0.12000000", "0.00000000", False, "100.12000000")
    assert result["stake"]["status"] == "closed" and result["stake"]["rewards_paid"] == "0.12000000"
    assert await balance(db, alice) == Decimal(100) + reward
    assert await ledger_rows(db, alice) == [
        (ledger.STAKE, Decimal(-40), str(sid)),
        (ledger.STAKING_REWARD, reward, f"{sid}:3-5"),
        (ledger.UNSTAKE, Decimal(40), str(sid))]
    assert await pool_allocated(db, setup["pool_id"]) == reward
    status, body = await action(client, alice, sid, "unstake")            # closed: nothing more
    assert status == 409 and body["error"]["code"] == "conflict"
    assert await balance(db, alice) == Decimal(100) + reward


async def test_unstake_before_the_lock_up_ends_is_refused_with_when(client, db, setup):
    alice = setup["alice"]
    status, body = await stake(client, alice, "10")
    sid = body["data"]["id"]
    await seal(db, LOCKUP - 1)
    status, body = await action(client, alice, sid, "unstake")
    assert status == 409, body
    error = body["error"]
    assert (error["code"], error["field"], error["unlock_height"], error["blocks_left"]) == \
        ("conflict", "stake_id", LOCKUP, 1)
    assert error["retry_after"] > 0 and f"block {LOCKUP}" in error["message"]
    assert await balance(db, alice) == 90
    assert await db.fetchval("SELECT status FROM defi WHERE id = $1", sid) == "active"
    await seal(db, 1)
    status, body = await action(client, alice, sid, "unstake")
    assert status == 200, body


async def test_someone_elses_stake_is_not_found(client, db, setup):
    status, body = await stake(client, setup["alice"], "10")
    await seal(db, LOCKUP)
    for verb in ("claim", "unstake"):
        status, body2 = await action(client, setup["bob"], body["data"]["id"], verb)
        assert status == 404 and body2["error"]["code"] == "not_found"
    assert await balance(db, setup["bob"]) == 0


# --- rewards ----------------------------------------------------------------------------------

async def test_rewards_after_n_blocks_are_rate_times_amount_times_n_from_the_pool(client, db, setup):
    alice, pool_id = setup["alice"], setup["pool_id"]
    status, body = await stake(client, alice, "12.5")
    sid = body["data"]["id"]
    await seal(db, 5)
    status, body = await call(client, "GET", "/api/v1/me/stakes", alice.token)
    assert body["data"]["stakes"][0]["accrued"] == "0.06250000"            # 0.001 x 12.5 x 5, before the claim
    status, body = await action(client, alice, sid, "claim")
    assert status == 200, body
    assert body["data"]["paid"] == "0.06250000" and body["data"]["stake"]["paid_height"] == 5
    assert await balance(db, alice) == Decimal("87.5") + Decimal("0.0625")
    assert await pool_allocated(db, pool_id) == Decimal("0.0625")

    status, body = await action(client, alice, sid, "claim")               # no new block: nothing to pay
    assert status == 200 and body["data"]["paid"] == "0.00000000" and body["data"]["balance"] is None
    await seal(db, 2)
    status, body = await action(client, alice, sid, "claim")
    assert body["data"]["paid"] == "0.02500000"
    rewards = [row for row in await ledger_rows(db, alice) if row[0] == ledger.STAKING_REWARD]
    assert rewards == [(ledger.STAKING_REWARD, Decimal("0.0625"), f"{sid}:1-5"),
                       (ledger.STAKING_REWARD, Decimal("0.025"), f"{sid}:6-7")]
    assert await pool_allocated(db, pool_id) == Decimal("0.0875")
    assert await db.fetchval("SELECT sum(allocated_amount) FROM pool_allocations WHERE pool_id = $1",
                             pool_id) == Decimal("0.0875")


async def test_rewards_truncate_to_8_decimals(client, db, setup):
    alice = setup["alice"]
    status, body = await stake(client, alice, "0.00001234")
    await seal(db, 3)                                                     # 0.001 x 0.00001234 x 3 = 3.702e-8
    status, body = await action(client, alice, body["data"]["id"], "claim")
    assert body["data"]["paid"] == "0.00000003"


async def test_a_dry_pool_pays_what_it_has_left_and_says_so(client, db, setup):
    alice, admin, pool_id = setup["alice"], setup["admin"], setup["pool_id"]
    status, body = await call(client, "PATCH", f"/api/v1/admin/reward-pools/{pool_id}", admin,
                              json={"delta": "-999.9"})                   # 0.1 left
    assert status == 200, body
    status, body = await stake(client, alice, "50")
    sid = body["data"]["id"]
    await seal(db, 4)                                                     # 0.2 due
    status, body = await action(client, alice, sid, "claim")
    data = body["data"]
    assert (data["due"], data["paid"], data["unpaid"], data["pool_exhausted"], data["pool_remaining"]) == \
        ("0.20000000", "0.10000000", "0.10000000", True, "0.00000000")
    assert await db.fetchrow("SELECT total_tokens, allocated_tokens FROM reward_pools WHERE pool_id = $1",
                             pool_id) == (Decimal("0.1"), Decimal("0.1"))  # drawn to the last token
    await seal(db, 1)
    status, body = await action(client, alice, sid, "claim")              # dry: pays nothing, keeps accruing
    assert (body["data"]["paid"], body["data"]["pool_exhausted"], body["data"]["stake"]["paid_height"]) == \
        ("0.00000000", True, 4)
    status, body = await action(client, alice, sid, "unstake")            # the principal always comes back
    assert status == 200 and body["data"]["paid"] == "0.00000000"
    assert await balance(db, alice) == Decimal("100.1")


async def test_concurrent_claims_and_unstakes_of_one_stake_pay_once(client, db, setup):
    alice = setup["alice"]
    status, body = await stake(client, alice, "20")
    sid = body["data"]["id"]
    await seal(db, LOCKUP + 1)
    claims = await asyncio.gather(*(action(client, alice, sid, "claim") for _ in range(6)))
    assert all(status == 200 for status, _ in claims)
    assert sorted(body["data"]["paid"] for _, body in claims) == ["0.00000000"] * 5 + ["0.08000000"]
    await seal(db, 1)
    unstakes = await asyncio.gather(*(action(client, alice, sid, "unstake") for _ in range(6)))
    assert sorted(status for status, _ in unstakes) == [200] + [409] * 5
    assert await balance(db, alice) == Decimal(100) + Decimal("0.08") + Decimal("0.02")
    reasons = [row[0] for row in await ledger_rows(db, alice)]
    assert reasons == [ledger.STAKE, ledger.STAKING_REWARD, ledger.STAKING_REWARD, ledger.UNSTAKE]


async def test_opening_and_claiming_at_once_do_not_deadlock(client, db, setup):
    alice = setup["alice"]
    status, body = await stake(client, alice, "10")
    sid = body["data"]["id"]
    for _ in range(3):
        await seal(db, 1)
        results = await asyncio.gather(*(action(client, alice, sid, "claim") for _ in range(3)),
                                       *(stake(client, alice, "1") for _ in range(3)))
        assert sorted(status for status, _ in results) == [200] * 3 + [201] * 3, results
    assert await balance(db, alice) == Decimal(100) - 10 - 9 + Decimal("0.03")


# --- what may be staked -----------------------------------------------------------------------

async def test_a_stake_cannot_spend_funds_reserved_by_a_pending_transfer_or_missing(client, db, setup):
    alice, bob = setup["alice"], setup["bob"]
    transfer = alice.wallet.sign_transfer(bob.address, "70", 0)
    status, body = await call(client, "POST", "/api/v1/transactions", alice.token, json=transfer)
    assert status == 201, body
    status, body = await stake(client, alice, "40")                       # 100 - 70 reserved = 30 free
    assert status == 409 and body["error"]["field"] == "amount" and "30.00000000" in body["error"]["message"]
    status, body = await stake(client, bob, "0.00000001")
    assert status == 409 and body["error"]["field"] == "amount"
    assert await db.fetchval("SELECT count(*) FROM defi") == 0
    status, body = await stake(client, alice, "30")
    assert status == 201, body
    sealed = await seal_block(db, SealConfig(difficulty=2))
    assert len(sealed.confirmed) == 1 and not sealed.rejected             # the reserved 70 was still there
    assert await balance(db, alice) == 0 and await balance(db, bob) == 70


async def test_staking_needs_the_staking_pool_and_a_positive_amount(client, db):
    user = await account(client)
    status, body = await stake(client, user, "1")
    assert status == 409 and body["error"]["field"] == "pool"
    status, body = await stake(client, user, "0")
    assert status == 400 and body["error"]["field"] == "amount"


async def test_a_repeated_request_id_opens_one_stake(client, db, setup):
    alice, request_id = setup["alice"], str(uuid.uuid4())
    first = await stake(client, alice, "5", request_id=request_id)
    again = await stake(client, alice, "5", request_id=request_id)
    assert (first[0], again[0]) == (201, 200)
    assert first[1]["data"]["id"] == again[1]["data"]["id"]
    status, body = await stake(client, alice, "6", request_id=request_id)
    assert status == 409 and body["error"]["field"] == "request_id"
    assert await balance(db, alice) == 95
    assert await db.fetchval("SELECT count(*) FROM defi") == 1


# --- events and history -----------------------------------------------------------------------

async def test_every_change_is_an_event_on_the_users_channel(client, db, setup):
    alice = setup["alice"]
    status, body = await stake(client, alice, "10")
    sid = body["data"]["id"]
    await seal(db, LOCKUP)
    await action(client, alice, sid, "claim")
    await seal(db, 1)
    await action(client, alice, sid, "unstake")
    channel = f"user:{alice.id}"
    [opened] = await published(client, channel, "stake_opened", 1)
    assert opened["stake"]["id"] == sid and opened["balance"] == "90.00000000"
    rewarded = await published(client, channel, "stake_rewarded", 2)
    assert [(e["from_height"], e["to_height"], e["paid"]) for e in rewarded] == \
        [(1, LOCKUP, "0.03000000"), (LOCKUP + 1, LOCKUP + 1, "0.01000000")]
    [closed] = await published(client, channel, "stake_closed", 1)
    assert (closed["stake"]["status"], closed["returned"], closed["balance"]) == \
        ("closed", "10.00000000", "100.04000000")


async def test_stakes_are_listed_newest_first_by_cursor(client, db, setup):
    alice = setup["alice"]
    ids = []
    for amount in ("1", "2", "3"):
        status, body = await stake(client, alice, amount)
        ids.append(body["data"]["id"])
    await seal(db, LOCKUP)
    await action(client, alice, ids[0], "unstake")
    status, body = await call(client, "GET", "/api/v1/me/stakes?limit=2", alice.token)
    page = body["data"]
    assert [s["id"] for s in page["stakes"]] == [ids[2], ids[1]] and page["next_before"] == ids[1]
    assert [s["accrued"] for s in page["stakes"]] == ["0.00900000", "0.00600000"]
    status, body = await call(client, "GET", f"/api/v1/me/stakes?limit=2&before={ids[1]}", alice.token)
    assert [(s["id"], s["status"], s["accrued"]) for s in body["data"]["stakes"]] == [(ids[0], "closed", "0.00000000")]
    assert body["data"]["next_before"] is None
    status, body = await call(client, "GET", "/api/v1/me/stakes?status=closed", alice.token)
    assert [s["id"] for s in body["data"]["stakes"]] == [ids[0]]
    status, body = await call(client, "GET", "/api/v1/me/stakes", setup["bob"].token)
    assert body["data"]["stakes"] == []


# --- verification -----------------------------------------------------------------------------

async def test_verify_accepts_an_active_stake_and_flags_one_closed_without_its_principal(client, db, setup,
                                                                                         chain_verified):
    status, body = await stake(client, setup["alice"], "10")
    sid = body["data"]["id"]
    assert await ledger.unbalanced_moves(db, 10) == []                    # locked, not lost
    await db.execute("UPDATE defi SET status = 'closed' WHERE id = $1", sid)
    chain_verified["skip"] = True
    assert await ledger.unbalanced_moves(db, 10) == \
        [f"reference {sid} (stake): its moves sum to -10.00000000, not 0"]


async def test_the_stakes_page_uses_its_index(db, setup, client):
    for amount in ("1", "2"):
        await stake(client, setup["alice"], amount)
    await db.execute("ANALYZE defi")
    async with db.transaction():
        await db.execute("SET LOCAL enable_seqscan = off")
        plan = "\n".join(row[0] for row in await db.fetch(f"EXPLAIN {staking_queries.LIST_STAKES}",
                                                            setup["alice"].id, 10, None, 21))
    assert "idx_defi_user_product_order" in plan and "Sort" not in plan, plan
