"""Escrow with real money on the KVP chain: the payment sits in the server's escrow wallet until it is
released (buyer confirms, the window passes, an administrator resolves a dispute) or refunded, and the
payout is a transfer the server signs, sealed in a block. Every test ends with the escrow wallet back
at 0 and `chain verify` passing (which checks that each settled escrow nets to zero)."""

from __future__ import annotations

import asyncio
import uuid
from decimal import Decimal

import pytest

from db import chain as chain_queries
from server.app import create_app
from server.services import chain as chain_service
from server.services import escrow, purchase_jobs
from server.services.purchase_jobs import PURCHASE_WORKER
from tests.helpers import register, server_url, wait_until
from tests.test_purchases import (
    PRICE,
    auth,
    balance,
    buy,
    escrow_address,
    escrow_balance,
    make_admin,
    people,
    received,
    settle,
    wallet_of,
)

pytestmark = pytest.mark.usefixtures("chain_verified")


@pytest.fixture
async def hub(fast, aiohttp_client):
    return await aiohttp_client(create_app(fast))


async def steps_of(hub, user, purchase_id) -> list[str]:
    body = await (await hub.get(f"/api/v1/purchases/{purchase_id}/escrow", headers=auth(user))).json()
    return [step["step"] for step in body["data"]["steps"]]


async def dispute(hub, user, purchase_id, reason="the file is empty") -> tuple[int, dict]:
    response = await hub.post(f"/api/v1/purchases/{purchase_id}/dispute", json={"reason": reason},
                              headers=auth(user))
    return response.status, await response.json()


async def resolve(hub, admin, purchase_id, outcome, note="checked the file") -> tuple[int, dict]:
    response = await hub.post(f"/api/v1/admin/purchases/{purchase_id}/resolve",
                              json={"outcome": outcome, "note": note}, headers=auth(admin))
    return response.status, await response.json()


async def test_pay_hold_confirm_release_pays_the_seller_through_a_sealed_transfer(hub, db, sockets):
    seller, buyer, seller_id, buyer_id, pod = await people(hub, db)
    await wallet_of(db, seller_id)
    seller_sock = sockets()
    await seller_sock.connect(server_url(hub), "/purchases", seller["token"])
    await seller_sock.call("/purchases", "subscribe", {"channel": f"user:{seller_id}"})
    purchase_id = await buy(hub, db, buyer, buyer_id, seller_id, pod)
    # The payment sits in the escrow wallet, not with the seller.
    assert await escrow_balance(hub, db) == PRICE and await balance(db, seller_id) == 0
    assert await steps_of(hub, buyer, purchase_id) == ["holding"]

    confirm = await hub.post(f"/api/v1/purchases/{purchase_id}/confirm", headers=auth(buyer))
    assert (await confirm.json())["data"] == {"purchase_id": purchase_id, "released": True,
                                              "escrow_status": "released"}
    await settle(hub, db)
    assert await balance(db, seller_id) == PRICE and await escrow_balance(hub, db) == 0
    view = (await (await hub.get(f"/api/v1/purchases/{purchase_id}/escrow", headers=auth(seller))).json())["data"]
    assert [s["step"] for s in view["steps"]] == ["holding", "confirmed", "released", "settled"]
    assert view["status"] == "released" and view["settled_at"] is not None and view["fee_amount"] == "0.000000000"
    payout = await chain_queries.get_transaction(db, view["settlement_tx_hash"])
    assert payout.sender == escrow_address(hub) and payout.receiver == (await wallet_of(db, seller_id)).address
    assert payout.status == "confirmed" and payout.height is not None and payout.amount == PRICE
    settled = await seller_sock.wait_for("escrow_settled")
    assert settled["data"]["paid"] == "1.500000000" and settled["data"]["settlement_tx_hash"] == payout.hash
    assert [e["data"]["reason"] for e in received(seller_sock, "escrow_released")] == ["buyer_confirmed"]
    # Settled once: more sweeps and blocks move nothing.
    await settle(hub, db)
    assert await balance(db, seller_id) == PRICE
    assert await db.fetchval("SELECT count(*) FROM transactions WHERE sender = $1", escrow_address(hub)) == 1


async def test_platform_fee_goes_to_the_fee_wallet(fast, aiohttp_client, db):
    hub = await aiohttp_client(create_app(fast.replace(platform_fee_rate="0.1")))
    seller, buyer, seller_id, buyer_id, pod = await people(hub, db)
    await wallet_of(db, seller_id)
    purchase_id = await buy(hub, db, buyer, buyer_id, seller_id, pod)
    await hub.post(f"/api/v1/purchases/{purchase_id}/confirm", headers=auth(buyer))
    await settle(hub, db)
    fee_account = hub.app[escrow.ESCROW_ACCOUNTS].fees.user_id
    assert await balance(db, seller_id) == Decimal("1.35") and await balance(db, fee_account) == Decimal("0.15")
    assert await escrow_balance(hub, db) == 0
    terms = (await (await hub.get("/api/v1/escrow")).json())["data"]
    assert terms == {"chain": "kvp", "address": escrow_address(hub), "platform_fee_rate": "0.1",
                     "release_seconds": fast.escrow_release_seconds, "block_seconds": fast.block_interval_seconds,
                     "custodial": True}


async def test_dispute_freezes_release_and_an_admin_refunds_from_the_queue(fast, aiohttp_client, db, sockets):
    hub = await aiohttp_client(create_app(fast.replace(escrow_release_seconds=2)))
    seller, buyer, seller_id, buyer_id, pod = await people(hub, db)
    buyer_sock = sockets()
    await buyer_sock.connect(server_url(hub), "/purchases", buyer["token"])
    await buyer_sock.call("/purchases", "subscribe", {"channel": f"user:{buyer_id}"})
    purchase_id = await buy(hub, db, buyer, buyer_id, seller_id, pod)
    # Only the buyer disputes, with a reason.
    assert (await dispute(hub, seller, purchase_id))[0] == 403
    assert (await dispute(hub, await register(hub), purchase_id))[0] == 404
    assert (await dispute(hub, buyer, purchase_id, "   "))[0] == 400
    ack = await buyer_sock.call("/purchases", "open_dispute", {"purchase_id": purchase_id,
                                                               "reason": "columns are shuffled"})
    assert ack["ok"] and ack["data"]["status"] == "disputed"
    assert ack["data"]["dispute_reason"] == "columns are shuffled"
    assert (await dispute(hub, buyer, purchase_id))[0] == 409  # already disputed
    assert (await buyer_sock.wait_for("escrow_disputed"))["data"]["reason"] == "columns are shuffled"
    # The window passes; the sweep must not release a disputed escrow.
    await asyncio.sleep(2.5)
    await hub.app[PURCHASE_WORKER].release_due_escrows()
    assert await db.fetchval("SELECT status FROM escrow_transactions") == "disputed"

    admin = await make_admin(hub, db)
    assert (await hub.get("/api/v1/admin/escrow/disputes", headers=auth(buyer))).status == 403
    queue = (await (await hub.get("/api/v1/admin/escrow/disputes", headers=auth(admin))).json())["data"]
    assert [item["purchase_id"] for item in queue["items"]] == [purchase_id] and queue["next_cursor"] is None
    assert (await resolve(hub, buyer, purchase_id, "refund"))[0] == 403
    code, body = await resolve(hub, admin, purchase_id, "refund", "the seller's file is broken")
    assert code == 200 and body["data"]["status"] == "refunded"
    assert (await resolve(hub, admin, purchase_id, "release"))[0] == 409  # exactly once
    await settle(hub, db)
    assert await balance(db, buyer_id) == PRICE and await escrow_balance(hub, db) == 0
    assert await db.fetchval("SELECT status FROM purchases WHERE id = $1", uuid.UUID(purchase_id)) == "refunded"
    assert await steps_of(hub, buyer, purchase_id) == ["holding", "disputed", "refunded", "settled"]
    assert (await (await hub.get("/api/v1/admin/escrow/disputes", headers=auth(admin))).json())["data"]["items"] == []
    refunded = await buyer_sock.wait_for("escrow_refunded")
    assert refunded["data"]["reason"] == "the seller's file is broken"


async def test_an_admin_can_release_a_disputed_escrow_and_late_disputes_are_refused(fast, aiohttp_client, db,
                                                                                   monkeypatch):
    # The late dispute below is also due for release: the worker's own sweep (every second) could
    # release it first. This test runs the sweep itself, after the dispute.
    monkeypatch.setattr(purchase_jobs, "ESCROW_SWEEP_SECONDS", 3600)
    hub = await aiohttp_client(create_app(fast.replace(escrow_release_seconds=3600)))
    seller, buyer, seller_id, buyer_id, pod = await people(hub, db)
    await wallet_of(db, seller_id)
    purchase_id = await buy(hub, db, buyer, buyer_id, seller_id, pod)
    assert (await dispute(hub, buyer, purchase_id))[0] == 200
    admin = await make_admin(hub, db)
    code, body = await resolve(hub, admin, purchase_id, "release", "the data matches the description")
    assert code == 200 and body["data"]["status"] == "released"
    assert body["data"]["resolution_note"] == "the data matches the description"
    await settle(hub, db)
    assert await balance(db, seller_id) == PRICE and await escrow_balance(hub, db) == 0
    # A second purchase whose window has passed can no longer be disputed.
    other = await people(hub, db)
    late = await buy(hub, db, other[1], other[3], other[2], other[4])
    await db.execute("UPDATE escrow_transactions SET created_at = now() - interval '2 hours' WHERE purchase_id = $1",
                     uuid.UUID(late))
    code, body = await dispute(hub, other[1], late)
    assert code == 409 and "window" in body["error"]["message"]
    await hub.app[PURCHASE_WORKER].release_due_escrows()
    await wallet_of(db, other[2])
    await settle(hub, db)
    assert await escrow_balance(hub, db) == 0


async def test_auto_release_after_the_window_waits_for_the_sellers_wallet(fast, aiohttp_client, db):
    hub = await aiohttp_client(create_app(fast.replace(escrow_release_seconds=1)))
    seller, buyer, seller_id, buyer_id, pod = await people(hub, db)
    purchase_id = uuid.UUID(await buy(hub, db, buyer, buyer_id, seller_id, pod))

    async def released():
        return await db.fetchval("SELECT status FROM escrow_transactions WHERE purchase_id = $1",
                                 purchase_id) == "released"
    await wait_until(released, timeout=10)
    # The seller has no wallet yet: the payout waits in escrow rather than going anywhere else.
    await settle(hub, db)
    assert await escrow_balance(hub, db) == PRICE
    assert await db.fetchval("SELECT settlement_tx_hash FROM escrow_transactions") is None
    await wallet_of(db, seller_id)
    await settle(hub, db)
    assert await balance(db, seller_id) == PRICE and await escrow_balance(hub, db) == 0
    reason = await db.fetchval("SELECT reason FROM escrow_steps WHERE step = 'released'")
    assert reason == escrow.WINDOW_PASSED


async def test_a_rejected_payout_is_signed_again(hub, db):
    seller, buyer, seller_id, buyer_id, pod = await people(hub, db)
    await wallet_of(db, seller_id)
    purchase_id = await buy(hub, db, buyer, buyer_id, seller_id, pod)
    await hub.post(f"/api/v1/purchases/{purchase_id}/confirm", headers=auth(buyer))
    worker = hub.app[PURCHASE_WORKER]
    await worker.settle_escrows()
    first = await db.fetchval("SELECT settlement_tx_hash FROM escrow_transactions")
    # As if the chain refused it: the sweep forgets it and signs a new one with the next nonce.
    await db.execute("UPDATE transactions SET status = 'rejected', error = 'test' WHERE transaction_hash = $1", first)
    await worker.settle_escrows()
    await settle(hub, db)
    second = await db.fetchval("SELECT settlement_tx_hash FROM escrow_transactions")
    assert second != first and await balance(db, seller_id) == PRICE and await escrow_balance(hub, db) == 0
    assert "reissued" in await steps_of(hub, buyer, purchase_id)


async def test_system_wallets_are_created_once_by_racing_processes(db, db_dsn):
    import asyncpg

    from db.pool import init_connection

    pool = await asyncpg.create_pool(db_dsn, min_size=1, max_size=6, init=init_connection)
    try:
        loaded = await asyncio.gather(*(escrow.load_accounts(pool, b"k" * 32) for _ in range(4)))
    finally:
        await pool.close()
    assert len({accounts.escrow.address for accounts in loaded}) == 1
    assert len({accounts.fees.address for accounts in loaded}) == 1
    assert await db.fetchval("SELECT count(*) FROM users WHERE account_kind = 'system'") == 2
    assert loaded[0].signer.public_key == loaded[0].escrow.public_key  # the wrapped key opens to the wallet's
    assert "signer" not in repr(loaded[0])  # the key stays out of reprs and so out of logs


async def test_system_accounts_never_sign_in(hub):
    for username in ("system:escrow", "system:platform-fees"):
        response = await hub.post("/api/v1/auth/login", json={"login": username, "password": "anything at all"})
        assert response.status == 401, await response.text()


async def test_verify_catches_an_escrow_that_does_not_net_to_zero(hub, db, chain_verified):
    seller, buyer, seller_id, buyer_id, pod = await people(hub, db)
    await wallet_of(db, seller_id)
    purchase_id = await buy(hub, db, buyer, buyer_id, seller_id, pod)
    await hub.post(f"/api/v1/purchases/{purchase_id}/confirm", headers=auth(buyer))
    await settle(hub, db)
    assert (await chain_service.verify_chain(db)).ok
    # Point the settled escrow at another transfer: its moves on the escrow wallet no longer net to 0.
    await db.execute("UPDATE escrow_transactions SET settlement_tx_hash = 'not-a-payout'")
    report = await chain_service.verify_chain(db)
    assert not report.ok and any("escrow of purchase" in p for p in report.problems)
    chain_verified["skip"] = True
