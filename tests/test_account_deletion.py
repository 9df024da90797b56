"""Account deletion (issue 18): re-authentication, refusal while money is in flight, and a deletion
that burns the balance and the mined blocks, scrubs the row, ends every session and keeps the
chain verifiable."""

from __future__ import annotations

import dataclasses
import uuid
from decimal import Decimal

import pytest

from db import ledger
from server.app import create_app
from server.services.auth import AUTH
from server.services.chain import SealConfig, seal_block
from tests.helpers import register, server_url, wait_until
from tests.test_chain import account, admin_token, balance, call, funded_pool, grant

# Every test ends with `chain verify` passing: the burn is a documented exception to the zero-sum check.
pytestmark = pytest.mark.usefixtures("chain_verified")

PASSWORD = "correct horse battery"   # tests.helpers.register's default


@pytest.fixture
async def setup(client, db):
    """An admin, a granting pool and a mining pool, alice with 50 KVP and bob with nothing."""
    admin = await admin_token(client, db)
    grants = await funded_pool(client, admin)
    await funded_pool(client, admin, name="mining")
    alice, bob = await account(client), await account(client)
    status, body = await grant(client, admin, grants, alice, "50")
    assert status == 201, body
    return {"admin": admin, "grants": grants, "alice": alice, "bob": bob}


async def delete_me(client, token: str, **body) -> tuple[int, dict]:
    return await call(client, "DELETE", "/api/v1/me", token, json=body)


async def user_row(db, user_id: uuid.UUID) -> dict:
    return dict(await db.fetchrow("SELECT * FROM users WHERE id = $1", user_id))


async def datapod(db, seller_id: uuid.UUID) -> uuid.UUID:
    return await db.fetchval(
        """INSERT INTO datapods (seller_id, title, price_sui, walrus_blob_id, encryption_key_hash, encryption_iv,
                                 wrapped_key, published)
           VALUES ($1, 'weather', 1, $2, repeat('0', 64), repeat('0', 24), 'not-a-key', true) RETURNING id""",
        seller_id, uuid.uuid4().hex)


async def purchase(db, buyer_id: uuid.UUID, pod_id: uuid.UUID, escrow: str | None, seller_id: uuid.UUID,
                   settled: bool = False) -> uuid.UUID:
    purchase_id = await db.fetchval(
        """INSERT INTO purchases (buyer_id, datapod_id, payment_tx_digest, amount_sui, status)
           VALUES ($1, $2, $3, 1, 'completed') RETURNING id""", buyer_id, pod_id, uuid.uuid4().hex)
    if escrow is not None:
        await db.execute(
            """INSERT INTO escrow_transactions (purchase_id, seller_id, amount_sui, status, released_at, settled_at)
               VALUES ($1, $2, 1, $3::text, CASE WHEN $3::text = 'holding' THEN NULL ELSE now() END,
                       CASE WHEN $4::boolean THEN now() END)""", purchase_id, seller_id, escrow, settled)
    return purchase_id


# --- re-authentication ------------------------------------------------------------------------

async def test_a_wrong_or_missing_password_is_refused_and_changes_nothing(client, db, setup):
    alice = setup["alice"]
    before = await user_row(db, alice.id)
    entries = await db.fetchval("SELECT count(*) FROM balance_ledger")
    status, body = await delete_me(client, alice.token, password="not my password")
    assert status == 403 and body["error"]["field"] == "password", body
    assert "password is wrong" in body["error"]["message"]
    status, body = await delete_me(client, alice.token)
    assert status == 400 and body["error"]["field"] == "password", body
    assert await user_row(db, alice.id) == before
    assert await db.fetchval("SELECT count(*) FROM balance_ledger") == entries
    assert (await call(client, "GET", "/api/v1/me", alice.token))[0] == 200


@pytest.fixture
async def strict_client(settings, aiohttp_client):
    """An app that allows two wrong passwords per account per window."""
    return await aiohttp_client(create_app(dataclasses.replace(settings, login_failures_per_account=2)))


async def test_wrong_passwords_are_rate_limited_like_sign_in(strict_client):
    data = await register(strict_client)
    for _ in range(2):
        assert (await delete_me(strict_client, data["token"], password="guess"))[0] == 403
    status, body = await delete_me(strict_client, data["token"], password=PASSWORD)
    assert status == 429 and body["error"]["code"] == "rate_limited" and body["error"]["retry_after"] > 0


async def test_a_google_only_account_needs_a_fresh_sign_in(client, db):
    user_id = await db.fetchval(
        """INSERT INTO users (username, email, google_id) VALUES ('gina', 'gina@example.org', 'google-sub-1')
           RETURNING id""")
    tokens = await client.app[AUTH].start_session(db, user_id, ip_address=None, device_info=None)
    await db.execute("UPDATE sessions SET login_time = now() - interval '10 minutes' WHERE user_id = $1", user_id)
    status, body = await delete_me(client, tokens.token)
    assert status == 403 and body["error"]["field"] == "session" and "5 minutes" in body["error"]["message"]
    await db.execute("UPDATE sessions SET login_time = now() WHERE user_id = $1", user_id)
    status, body = await delete_me(client, tokens.token)
    assert status == 200, body
    row = await user_row(db, user_id)
    assert (row["google_id"], row["email"], row["account_kind"]) == (None, None, "deleted")


# --- money in flight --------------------------------------------------------------------------

async def test_refused_while_a_stake_is_active(client, db, setup):
    alice = setup["alice"]
    await funded_pool(client, setup["admin"], name="staking")
    status, body = await call(client, "POST", "/api/v1/me/stakes", alice.token, json={"amount": "5"})
    assert status == 201, body
    status, body = await delete_me(client, alice.token, password=PASSWORD)
    assert status == 409 and body["error"]["code"] == "conflict" and body["error"]["field"] == "stakes", body
    assert "unstake first" in body["error"]["message"]
    assert (await user_row(db, alice.id))["account_kind"] == "person"
    assert await balance(db, alice) == Decimal(45)


async def test_refused_while_a_purchase_or_a_sale_is_in_escrow(client, db, setup):
    alice, bob = setup["alice"], setup["bob"]
    pod = await datapod(db, bob.id)
    purchase_id = await purchase(db, alice.id, pod, "holding", bob.id)
    status, body = await delete_me(client, alice.token, password=PASSWORD)
    assert status == 409 and body["error"]["field"] == "purchases", body
    assert "escrow" in body["error"]["message"]
    status, body = await delete_me(client, bob.token, password=PASSWORD)
    assert status == 409 and body["error"]["field"] == "sales", body
    # A dispute blocks too; a released but unsettled escrow still has a payout on its way.
    await db.execute("UPDATE escrow_transactions SET status = 'disputed', disputed_at = now(), dispute_reason = 'x' "
                     "WHERE purchase_id = $1", purchase_id)
    assert (await delete_me(client, alice.token, password=PASSWORD))[0] == 409
    await db.execute("UPDATE escrow_transactions SET status = 'released', disputed_at = NULL, dispute_reason = NULL, "
                     "released_at = now() WHERE purchase_id = $1", purchase_id)
    assert (await delete_me(client, bob.token, password=PASSWORD))[1]["error"]["field"] == "sales"
    await db.execute("UPDATE escrow_transactions SET settled_at = now() WHERE purchase_id = $1", purchase_id)
    assert (await delete_me(client, alice.token, password=PASSWORD))[0] == 200


async def test_refused_while_an_outgoing_transfer_is_pending(client, db, setup):
    alice, bob = setup["alice"], setup["bob"]
    status, body = await call(client, "POST", "/api/v1/transactions", alice.token,
                              json=alice.wallet.sign_transfer(bob.address, "1", 0))
    assert status == 201, body
    status, body = await delete_me(client, alice.token, password=PASSWORD)
    assert status == 409 and body["error"]["field"] == "transfers" and "pending" in body["error"]["message"]


# --- a deletion -------------------------------------------------------------------------------

async def test_deletion_burns_balance_and_blocks_scrubs_the_row_and_ends_every_session(client, db, setup, sockets):
    alice, bob = setup["alice"], setup["bob"]
    await seal_block(db, SealConfig(difficulty=2, miner_username=alice.username))    # block 1: alice's
    await seal_block(db, SealConfig(difficulty=2, miner_username=bob.username))      # block 2: bob's
    await seal_block(db, SealConfig(difficulty=2, miner_username=alice.username))    # block 3: alice's
    # Her DataPod, bought and settled by bob, and her own settled purchase of bob's pod.
    her_pod = await datapod(db, alice.id)
    bobs_purchase = await purchase(db, bob.id, her_pod, "released", alice.id, settled=True)
    await purchase(db, alice.id, await datapod(db, bob.id), "released", bob.id, settled=True)
    # A transfer to her still pending: nobody would own it, so it is rejected.
    await grant(client, setup["admin"], setup["grants"], bob, "3")
    incoming = bob.wallet.sign_transfer(alice.address, "2", 0)
    assert (await call(client, "POST", "/api/v1/transactions", bob.token, json=incoming))[0] == 201
    login = await client.post("/api/v1/auth/login", json={"login": alice.username, "password": PASSWORD})
    second_device = (await login.json())["data"]
    sock = sockets()
    await sock.connect(server_url(client), "/purchases", token=alice.token)
    held = await balance(db, alice)
    assert held > 50                                                               # grant plus mining rewards

    status, body = await delete_me(client, second_device["token"], password=PASSWORD)
    assert status == 200, body
    result = body["data"]
    assert result["balance_burned"] == f"{held:.8f}" and result["blocks_burned"] == [1, 3]
    assert result["datapods_unpublished"] == 1 and result["sessions_ended"] == 2
    assert len(result["incoming_transfers_rejected"]) == 1

    # Sessions end everywhere at once: the socket hears it, no token or refresh token works.
    assert await sock.wait_for("signed_out") == {"reason": "account_deleted"}
    await wait_until(lambda: "/purchases" not in sock.sio.namespaces)
    for token in (alice.token, second_device["token"]):
        assert (await call(client, "GET", "/api/v1/me", token))[0] == 401
    refreshed = await client.post("/api/v1/auth/refresh", json={"refresh_token": second_device["refresh_token"]})
    assert refreshed.status == 401
    assert await db.fetchval("SELECT count(*) FROM sessions WHERE user_id = $1", alice.id) == 0

    # The row: anonymised under its id, address kept without its key, balance burned through the ledger.
    row = await user_row(db, alice.id)
    assert row["account_kind"] == "deleted" and row["deleted_at"] is not None
    assert row["username"].startswith("deleted-") and row["username"] != alice.username
    assert (row["email"], row["password_hash"], row["google_id"], row["wallet_public_key"]) == (None,) * 4
    assert row["wallet_address"] == alice.address and row["total_balance"] == 0
    burn = await db.fetchrow("SELECT delta, reference FROM balance_ledger WHERE user_id = $1 AND reason = $2",
                             alice.id, ledger.ACCOUNT_CLOSED_BURN)
    assert (burn["delta"], burn["reference"]) == (-held, str(alice.id))
    burned = await db.fetch("SELECT block_id, burned FROM blocks ORDER BY block_id")
    assert [(r["block_id"], r["burned"]) for r in burned] == [(1, True), (2, False), (3, True)]
    assert await db.fetchval("SELECT count(*) FROM mining_rewards WHERE user_id = $1", alice.id) == 2
    # Her pod is off the market; bob keeps what he bought.
    assert not await db.fetchval("SELECT published FROM datapods WHERE id = $1", her_pod)
    assert await db.fetchval("SELECT status FROM purchases WHERE id = $1", bobs_purchase) == "completed"
    tx = await db.fetchrow("SELECT status, error FROM transactions WHERE receiver = $1", alice.address)
    assert tx["status"] == "rejected" and "deleted" in tx["error"]

    # Nothing can be sent to the address any more, and nobody signs in as her again.
    resend = bob.wallet.sign_transfer(alice.address, "1", 1)
    status, body = await call(client, "POST", "/api/v1/transactions", bob.token, json=resend)
    assert status == 404 and body["error"]["field"] == "receiver"
    assert (await call(client, "GET", f"/api/v1/wallets/{alice.address}"))[0] == 404
    relogin = await client.post("/api/v1/auth/login", json={"login": alice.username, "password": PASSWORD})
    assert relogin.status == 401
    # Her username and email are free again: a new, different account.
    again = await register(client, alice.username)
    assert again["user"]["id"] != str(alice.id)
    await seal_block(db, SealConfig(difficulty=2))   # the sealer skips the rejected transfer


async def test_an_admin_cannot_delete_their_account(client, db):
    admin = await admin_token(client, db)
    status, body = await delete_me(client, admin, password=PASSWORD)
    assert status == 409 and body["error"]["field"] == "account" and "administrator" in body["error"]["message"]
    assert (await call(client, "GET", "/api/v1/me", admin))[0] == 200

