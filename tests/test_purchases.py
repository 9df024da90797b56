"""Purchases end to end on real PostgreSQL and real sockets: the job, payments, escrow, downloads,
the X25519 key envelope, reviews, authorisation, crash recovery, racing workers, the Sui verifier."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
import json
import subprocess
import sys
import uuid
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from db import chain as chain_queries
from db import ledger
from db import purchases as queries
from db import users as user_queries
from db.pool import init_connection
from server.adapters.blobs import BLOBS
from server.adapters.payments import KvpChainVerifier, Outcome, PaymentClaim, SuiChainVerifier
from server.app import create_app
from server.core import wallets
from server.core.crypto import MASTER_KEY, encrypt_dataset, wrap_key
from server.services import chain as chain_service
from server.services import delivery
from server.services.escrow import ESCROW_ACCOUNTS
from server.services.purchase_jobs import MAX_ATTEMPTS, PURCHASE_WORKER, PurchaseWorker
from server.services.purchases import refund_purchase, release_escrow
from tests.helpers import SocketClient, register, register_seller, server_url, wait_until

DATASET = b"city,temp_c\nBerlin,7.5\nLagos,29.1\n" + b"".join(
    f"row{i},{i % 40}.{i % 10}\n".encode() for i in range(20_000))  # several blob chunks
PRICE = Decimal("1.500000000")
ROOT = Path(__file__).resolve().parent.parent


# Every test here ends with `chain verify` passing (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("chain_verified")


@pytest.fixture
async def hub(fast, aiohttp_client):
    """The real app (worker included) on this test's database.

    `fast` comes first so that the app closes before the test's database is dropped: the other
    order left the worker failing against a dropped database for seconds after each test.
    """
    return await aiohttp_client(create_app(fast))


@pytest.fixture
async def pool(db_dsn):
    pool = await asyncpg.create_pool(db_dsn, min_size=1, max_size=30, init=init_connection)
    yield pool
    await pool.close()


async def make_pod(db, blobs, master_key: bytes, seller_id, plaintext: bytes = DATASET, price: Decimal = PRICE,
                   title: str = "Weather, Berlin & Lagos") -> uuid.UUID:
    """A published DataPod encrypted exactly as uploads are."""
    pod_id = uuid.uuid4()
    encrypted = encrypt_dataset(plaintext, str(pod_id).encode())
    blob_id = await blobs.put(encrypted.ciphertext)
    await db.execute(
        """INSERT INTO datapods (id, seller_id, title, category, price_sui, walrus_blob_id, walrus_storage_size,
               encryption_key_hash, encryption_iv, wrapped_key, file_type, file_size, data_hash, published)
           VALUES ($1, $2, $3, 'climate', $4, $5, $6, $7, $8, $9, 'text/csv', $10, $11, true)""",
        pod_id, seller_id, title, price, blob_id, len(encrypted.ciphertext), encrypted.key_hash, encrypted.iv_hex,
        wrap_key(master_key, encrypted.key, str(pod_id).encode()), len(plaintext),
        hashlib.sha256(plaintext).hexdigest())
    return pod_id


async def synthetic_payment(db, sender_id, receiver_id, amount: Decimal = PRICE) -> str:
    """A confirmed transfer row written straight to the table, for workers run without the app (and
    its escrow wallet) whose verifier accepts the pre-escrow rule: paid to the seller."""
    digest = "kvp" + uuid.uuid4().hex + uuid.uuid4().hex[:8]
    await db.execute(
        """INSERT INTO transactions (transaction_hash, sender, receiver, amount, sender_id, receiver_id, user_id,
                                     status)
           VALUES ($1, $2, $3, $4, $5, $6, $5, 'confirmed')""",
        digest, f"w-{sender_id}", f"w-{receiver_id}", amount, sender_id, receiver_id)
    return digest


SIGNERS: dict[uuid.UUID, wallets.Wallet] = {}


async def wallet_of(db, user_id) -> wallets.Wallet:
    """The user's registered wallet (registered on first use)."""
    if user_id not in SIGNERS:
        SIGNERS[user_id] = wallets.Wallet.generate()
        await chain_queries.set_wallet(db, user_id, SIGNERS[user_id].public_key, SIGNERS[user_id].address)
    return SIGNERS[user_id]


def escrow_address(hub) -> str:
    return hub.app[ESCROW_ACCOUNTS].escrow.address


async def pay(hub, db, sender_id, amount: Decimal = PRICE, *, receiver: str | None = None,
              status: str = "confirmed", created_at: dt.datetime | None = None) -> str:
    """A real KVP transfer from the sender's wallet (credited `amount` first) to the escrow wallet (or
    `receiver`), signed, submitted and sealed in a block; returns its hash, the payment digest."""
    signer = await wallet_of(db, sender_id)
    kvp = amount.quantize(Decimal("0.00000001"))
    async with db.transaction():
        await ledger.apply_balance_changes(db, [ledger.BalanceChange(sender_id, kvp, ledger.FAUCET,
                                                                     f"test:{uuid.uuid4()}")])
    nonce = await chain_queries.next_nonce(db, signer.address)
    tx = await chain_service.record_transfer(db, sender_id, signer.sign_transfer(receiver or escrow_address(hub),
                                                                                 kvp, nonce))
    if status == "rejected":
        await db.execute("UPDATE transactions SET status = 'rejected' WHERE transaction_hash = $1", tx.hash)
    elif status == "confirmed":
        await chain_service.seal_block(db, chain_service.SealConfig())
    if created_at is not None:
        await db.execute("UPDATE transactions SET created_at = $2 WHERE transaction_hash = $1", tx.hash, created_at)
    return tx.hash


async def balance(db, user_id) -> Decimal:
    return await db.fetchval("SELECT total_balance FROM users WHERE id = $1", user_id)


async def escrow_balance(hub, db) -> Decimal:
    return await balance(db, hub.app[ESCROW_ACCOUNTS].escrow.user_id)


async def settle(hub, db, rounds: int = 5) -> None:
    """Sweep, seal the payouts and sweep again, until no decided escrow is left unsettled."""
    worker = hub.app[PURCHASE_WORKER]
    # The worker's own sweep runs beside this one: a payout it signs after our block was sealed waits
    # for the next block, so one round is not always enough.
    for _ in range(rounds):
        await worker.settle_escrows()
        await chain_service.seal_block(db, chain_service.SealConfig())
        await worker.settle_escrows()
        if not await db.fetchval("""SELECT count(*) FROM escrow_transactions
                                     WHERE status IN ('released', 'refunded') AND settled_at IS NULL"""):
            return


def received(sock: SocketClient, event: str) -> list[dict]:
    return [data for _, name, data in sock.events if name == event]


async def status_of(db, purchase_id) -> str:
    return await db.fetchval("SELECT status FROM purchases WHERE id = $1", uuid.UUID(str(purchase_id)))


async def people(hub, db):
    """A verified seller with a published pod, and a buyer; tokens and ids."""
    seller, buyer = await register_seller(hub), await register(hub)
    seller_id, buyer_id = uuid.UUID(seller["user"]["id"]), uuid.UUID(buyer["user"]["id"])
    pod = await make_pod(db, hub.app[BLOBS], hub.app[MASTER_KEY], seller_id)
    return seller, buyer, seller_id, buyer_id, pod


def auth(user: dict) -> dict:
    return {"Authorization": f"Bearer {user['token']}"}


async def buy(hub, db, buyer: dict, buyer_id, seller_id, pod) -> str:
    """Pay and start a purchase over REST, wait until it completes; returns its id."""
    digest = await pay(hub, db, buyer_id)
    response = await hub.post("/api/v1/purchases", json={"datapod_id": str(pod), "payment_tx_digest": digest},
                              headers=auth(buyer))
    body = await response.json()
    assert response.status == 202, body
    purchase_id = body["data"]["id"]

    async def done():
        return await status_of(db, purchase_id) == "completed"
    await wait_until(done)
    return purchase_id


# --- the full flow ---------------------------------------------------------------------------------

async def test_full_purchase_flow_over_socketio(hub, db, sockets):
    seller, buyer, seller_id, buyer_id, pod = await people(hub, db)
    buyer_sock, seller_sock = sockets(), sockets()
    await buyer_sock.connect(server_url(hub), "/purchases", buyer["token"])
    await seller_sock.connect(server_url(hub), "/purchases", seller["token"])
    assert (await buyer_sock.call("/purchases", "subscribe", {"channel": f"user:{buyer_id}"}))["ok"]
    assert (await seller_sock.call("/purchases", "subscribe", {"channel": f"user:{seller_id}"}))["ok"]

    digest = await pay(hub, db, buyer_id)
    ack = await buyer_sock.call("/purchases", "start_purchase", {"datapod_id": str(pod), "payment_tx_digest": digest})
    assert ack["ok"] is True, ack
    purchase_id = ack["data"]["id"]
    assert ack["data"]["status"] == "pending_payment" and ack["data"]["amount_sui"] == "1.500000000"

    async def completed():
        return any(e["data"]["step"] == "completed" for e in received(buyer_sock, "purchase_progressed"))
    await wait_until(completed)
    progress = [e["data"] for e in received(buyer_sock, "purchase_progressed")]
    assert [p["step"] for p in progress] == ["payment_pending", "payment_verifying", "payment_verified",
                                             "key_wrapping", "escrow_holding", "completed"]
    assert [p["percent"] for p in progress] == sorted(p["percent"] for p in progress)
    assert progress[-1] == {"purchase_id": purchase_id, "datapod_id": str(pod), "status": "completed",
                            "step": "completed", "percent": 100}
    sale = await seller_sock.wait_for("sale_completed")
    assert sale["data"]["purchase_id"] == purchase_id and sale["data"]["amount_sui"] == "1.500000000"

    got = await buyer_sock.call("/purchases", "get_purchase", {"purchase_id": purchase_id})
    assert got["data"]["status"] == "completed" and got["data"]["escrow_status"] == "holding"
    assert got["data"]["key_ready"] is True and got["data"]["step"] is None
    listed = await buyer_sock.call("/purchases", "list_purchases", {})
    assert [p["id"] for p in listed["data"]["items"]] == [purchase_id]
    # The purchase-count trigger counted the completion once.
    assert await db.fetchval("SELECT purchase_count FROM datapods WHERE id = $1", pod) == 1
    assert await db.fetchval("SELECT total_sales FROM users WHERE id = $1", seller_id) == 1
    assert await db.fetchval("SELECT total_purchases FROM users WHERE id = $1", buyer_id) == 1
    receipt = await db.fetchrow("SELECT * FROM payment_receipts WHERE payment_tx_digest = $1", digest)
    assert receipt["purchase_id"] == uuid.UUID(purchase_id) and receipt["amount_sui"] == PRICE
    stored_key = await db.fetchval("SELECT decryption_key FROM purchases WHERE id = $1", uuid.UUID(purchase_id))
    assert stored_key.startswith(delivery.MASTER_PREFIX)  # wrapped, never the raw key

    # Download: decrypted, checked, byte for byte the upload, logged.
    response = await hub.get(f"/api/v1/purchases/{purchase_id}/download", headers=auth(buyer))
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/csv")
    assert response.headers["Content-Disposition"] == 'attachment; filename="Weather-Berlin-Lagos.csv"'
    assert int(response.headers["Content-Length"]) == len(DATASET)
    assert await response.read() == DATASET
    assert await db.fetchval("SELECT count(*) FROM download_logs WHERE purchase_id = $1", uuid.UUID(purchase_id)) == 1

    # Confirming releases the escrow to the seller, once.
    confirmed = await buyer_sock.call("/purchases", "confirm_download", {"purchase_id": purchase_id})
    assert confirmed["data"] == {"purchase_id": purchase_id, "released": True, "escrow_status": "released"}
    released = await seller_sock.wait_for("escrow_released")
    assert released["data"]["reason"] == "buyer_confirmed"
    again = await buyer_sock.call("/purchases", "confirm_download", {"purchase_id": purchase_id})
    assert again["data"]["released"] is False and again["data"]["escrow_status"] == "released"


async def test_rest_purchase_list_and_get(hub, db):
    seller, buyer, seller_id, buyer_id, pod = await people(hub, db)
    purchase_id = await buy(hub, db, buyer, buyer_id, seller_id, pod)
    body = await (await hub.get("/api/v1/purchases?limit=1", headers=auth(buyer))).json()
    assert [p["id"] for p in body["data"]["items"]] == [purchase_id] and body["data"]["next_cursor"] is None
    one = await (await hub.get(f"/api/v1/purchases/{purchase_id}", headers=auth(buyer))).json()
    assert one["data"]["status"] == "completed"
    bad = await hub.get("/api/v1/purchases?limit=1000", headers=auth(buyer))
    assert bad.status == 400
    assert (await hub.get("/api/v1/purchases")).status == 401
    # Filtered by DataPod: this one's purchase, none of another's, and a non-uuid refused.
    of_pod = await (await hub.get(f"/api/v1/purchases?datapod_id={pod}", headers=auth(buyer))).json()
    assert [p["id"] for p in of_pod["data"]["items"]] == [purchase_id]
    other = await (await hub.get(f"/api/v1/purchases?datapod_id={uuid.uuid4()}", headers=auth(buyer))).json()
    assert other["data"]["items"] == []
    assert (await hub.get("/api/v1/purchases?datapod_id=nope", headers=auth(buyer))).status == 400


# --- payments that must not pass -------------------------------------------------------------------

async def start(hub, user, pod, digest):
    response = await hub.post("/api/v1/purchases", json={"datapod_id": str(pod), "payment_tx_digest": digest},
                              headers=auth(user))
    return response.status, await response.json()


async def wait_final(db, purchase_id) -> str:
    async def final():
        return await status_of(db, purchase_id) in ("completed", "failed", "refunded")
    await wait_until(final)
    return await status_of(db, purchase_id)


async def test_forged_digest_fails_then_a_real_payment_succeeds(hub, db, sockets):
    seller, buyer, seller_id, buyer_id, pod = await people(hub, db)
    sock = sockets()
    await sock.connect(server_url(hub), "/purchases", buyer["token"])
    await sock.call("/purchases", "subscribe", {"channel": f"user:{buyer_id}"})
    code, body = await start(hub, buyer, pod, "forged" + uuid.uuid4().hex)
    assert code == 202
    assert await wait_final(db, body["data"]["id"]) == "failed"

    async def failed() -> list[dict]:
        return [e["data"] for e in received(sock, "purchase_progressed") if e["data"]["status"] == "failed"]

    await wait_until(failed)  # the event follows the commit through the outbox relay
    assert "not confirmed in time" in (await failed())[-1]["reason"]
    assert await db.fetchval("SELECT count(*) FROM escrow_transactions") == 0
    assert await db.fetchval("SELECT count(*) FROM payment_receipts") == 0
    assert await db.fetchval("SELECT count(*) FROM purchase_jobs") == 0
    # The failed row is retried with a real payment (one row per buyer and pod).
    code, again = await start(hub, buyer, pod, await pay(hub, db, buyer_id))
    assert code == 202 and again["data"]["id"] == body["data"]["id"]
    assert await wait_final(db, again["data"]["id"]) == "completed"


async def test_someone_elses_digest_submitted_first_does_not_block_its_payer(hub, db):
    seller, buyer, seller_id, buyer_id, pod = await people(hub, db)
    intruder = await register(hub)
    digest = await pay(hub, db, buyer_id)
    code, stolen = await start(hub, intruder, pod, digest)
    assert code == 202
    assert await wait_final(db, stolen["data"]["id"]) == "failed"  # the sender is not the intruder
    code, real = await start(hub, buyer, pod, digest)
    assert code == 202 and real["data"]["id"] != stolen["data"]["id"]
    assert await wait_final(db, real["data"]["id"]) == "completed"
    # Once it has paid, the digest cannot be taken over again.
    code, again = await start(hub, intruder, pod, digest)
    assert code == 409


@pytest.mark.parametrize("case", ["low_amount", "wrong_sender", "wrong_receiver", "rejected_tx", "too_old"])
async def test_payment_that_does_not_match_fails(hub, db, case):
    seller, buyer, seller_id, buyer_id, pod = await people(hub, db)
    stranger_id = uuid.UUID((await register(hub))["user"]["id"])
    seller_address = (await wallet_of(db, seller_id)).address
    digest = {
        "low_amount": lambda: pay(hub, db, buyer_id, PRICE - Decimal("0.00000001")),
        "wrong_sender": lambda: pay(hub, db, stranger_id),
        "wrong_receiver": lambda: pay(hub, db, buyer_id, receiver=seller_address),
        "rejected_tx": lambda: pay(hub, db, buyer_id, status="rejected"),
        "too_old": lambda: pay(hub, db, buyer_id, created_at=dt.datetime.now(dt.timezone.utc)
                               - dt.timedelta(days=2)),
    }[case]
    code, body = await start(hub, buyer, pod, await digest())
    assert code == 202
    # Money the buyer put into the escrow for nothing (too little, too late) goes back to them.
    refunded = case in ("low_amount", "too_old")
    assert await wait_final(db, body["data"]["id"]) == ("refunded" if refunded else "failed")
    assert await db.fetchval("SELECT purchase_count FROM datapods WHERE id = $1", pod) == 0
    assert await db.fetchval("SELECT decryption_key FROM purchases") is None
    if refunded:
        paid = await db.fetchval("SELECT amount FROM transactions WHERE transaction_hash = $1",
                                 body["data"]["payment_tx_digest"])
        await settle(hub, db)
        assert await balance(db, buyer_id) == paid and await escrow_balance(hub, db) == 0


async def test_reused_digest_own_pod_and_double_purchase_are_refused(hub, db):
    seller, buyer, seller_id, buyer_id, pod = await people(hub, db)
    other_pod = await make_pod(db, hub.app[BLOBS], hub.app[MASTER_KEY], seller_id, b"a\n1\n", title="other")
    digest = await pay(hub, db, buyer_id)
    code, body = await start(hub, buyer, pod, digest)
    assert code == 202
    code, reused = await start(hub, buyer, other_pod, digest)
    assert code == 409 and reused["error"]["field"] == "payment_tx_digest"
    other_buyer = await register(hub)
    code, reused = await start(hub, other_buyer, pod, digest)
    assert code == 409
    code, twice = await start(hub, buyer, pod, await pay(hub, db, buyer_id))
    assert code == 409 and twice["error"]["field"] == "datapod_id"
    code, own = await start(hub, seller, pod, await pay(hub, db, seller_id))
    assert code == 403
    code, missing = await start(hub, buyer, uuid.uuid4(), digest)
    assert code == 404
    code, invalid = await start(hub, buyer, pod, "bad digest!")
    assert code == 400 and invalid["error"]["field"] == "payment_tx_digest"
    assert await wait_final(db, body["data"]["id"]) == "completed"
    # Even after a refund frees the row, the verified digest can never pay again.
    code, after = await start(hub, buyer, other_pod, digest)
    assert code == 409


# --- authorisation ---------------------------------------------------------------------------------

async def test_another_user_cannot_read_join_download_or_review(hub, db, sockets):
    seller, buyer, seller_id, buyer_id, pod = await people(hub, db)
    purchase_id = await buy(hub, db, buyer, buyer_id, seller_id, pod)
    eve = await register(hub)
    for method, path in [("GET", ""), ("GET", "/download"), ("GET", "/key"), ("GET", "/blob"),
                         ("POST", "/confirm")]:
        response = await hub.request(method, f"/api/v1/purchases/{purchase_id}{path}", headers=auth(eve))
        assert response.status == 404, path
    review = await hub.post(f"/api/v1/purchases/{purchase_id}/review", json={"rating": 1}, headers=auth(eve))
    assert review.status == 404
    refund = await hub.post(f"/api/v1/admin/purchases/{purchase_id}/refund", json={}, headers=auth(eve))
    assert refund.status == 403
    sock = sockets()
    await sock.connect(server_url(hub), "/purchases", eve["token"])
    got = await sock.call("/purchases", "get_purchase", {"purchase_id": purchase_id})
    assert got["error"]["code"] == "not_found"
    joined = await sock.call("/purchases", "subscribe", {"channel": f"user:{buyer_id}"})
    assert joined["error"]["code"] == "forbidden"
    confirm = await sock.call("/purchases", "confirm_download", {"purchase_id": purchase_id})
    assert confirm["error"]["code"] == "not_found"
    assert [p for p in (await sock.call("/purchases", "list_purchases"))["data"]["items"]] == []
    assert await db.fetchval("SELECT count(*) FROM download_logs") == 0
    anonymous = sockets()
    with pytest.raises(Exception):
        await anonymous.connect(server_url(hub), "/purchases")


async def test_download_refuses_unfinished_and_tampered_blobs(hub, db, fast):
    seller, buyer, seller_id, buyer_id, pod = await people(hub, db)
    code, body = await start(hub, buyer, pod, "never-paid-" + uuid.uuid4().hex)
    response = await hub.get(f"/api/v1/purchases/{body['data']['id']}/download", headers=auth(buyer))
    assert response.status == 409
    await wait_final(db, body["data"]["id"])
    # A completed purchase whose blob was tampered with is refused, never served.
    other = await make_pod(db, hub.app[BLOBS], hub.app[MASTER_KEY], seller_id, b"x,y\n1,2\n", title="tampered")
    purchase_id = await buy(hub, db, buyer, buyer_id, seller_id, other)
    blob_id = await db.fetchval("SELECT walrus_blob_id FROM datapods WHERE id = $1", other)
    path = fast.data_dir / "blobs" / blob_id[:2] / blob_id
    data = bytearray(path.read_bytes())
    data[0] ^= 1
    path.write_bytes(bytes(data))
    response = await hub.get(f"/api/v1/purchases/{purchase_id}/download", headers=auth(buyer))
    assert response.status == 500
    assert "integrity" in (await response.json())["error"]["message"]
    assert await db.fetchval("SELECT count(*) FROM download_logs") == 0


# --- the X25519 key envelope ----------------------------------------------------------------------

def keypair() -> tuple[bytes, bytes]:
    private = X25519PrivateKey.generate()
    raw = private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                serialization.NoEncryption())
    public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return raw, public


async def test_wrapped_key_opens_with_the_buyers_private_key_only(hub, db, tmp_path):
    seller, buyer, seller_id, buyer_id, pod = await people(hub, db)
    private, public = keypair()
    response = await hub.put("/api/v1/me/x25519-key", json={"public_key": delivery.b64(public)}, headers=auth(buyer))
    assert response.status == 200
    bad = await hub.put("/api/v1/me/x25519-key", json={"public_key": delivery.b64(b"x" * 31) + "AAAA"},
                        headers=auth(buyer))
    assert bad.status == 400
    purchase_id = await buy(hub, db, buyer, buyer_id, seller_id, pod)
    stored = await db.fetchval("SELECT decryption_key FROM purchases WHERE id = $1", uuid.UUID(purchase_id))
    assert delivery.is_envelope(stored)
    envelope = (await (await hub.get(f"/api/v1/purchases/{purchase_id}/key", headers=auth(buyer))).json())["data"]
    assert envelope == json.loads(stored)
    ciphertext = await (await hub.get(f"/api/v1/purchases/{purchase_id}/blob", headers=auth(buyer))).read()

    key = delivery.open_envelope(envelope, private)
    assert hashlib.sha256(key).hexdigest() == await db.fetchval(
        "SELECT encryption_key_hash FROM datapods WHERE id = $1", pod)
    with pytest.raises(InvalidTag):
        delivery.open_envelope(envelope, keypair()[0])
    tampered = {**envelope, "purchase_id": str(uuid.uuid4())}
    with pytest.raises(InvalidTag):
        delivery.open_envelope(tampered, private)

    # The documented script decrypts it, and refuses another private key.
    (tmp_path / "buyer.key").write_text(delivery.b64(private))
    (tmp_path / "eve.key").write_text(delivery.b64(keypair()[0]))
    (tmp_path / "envelope.json").write_text(json.dumps(envelope))
    (tmp_path / "blob.bin").write_bytes(ciphertext)
    script = ROOT / "docs" / "decrypt_datapod.py"
    ok = subprocess.run([sys.executable, str(script), "decrypt", "--private-key", str(tmp_path / "buyer.key"),
                         "--envelope", str(tmp_path / "envelope.json"), "--blob", str(tmp_path / "blob.bin"),
                         "--out", str(tmp_path / "out.csv")], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "out.csv").read_bytes() == DATASET
    refused = subprocess.run([sys.executable, str(script), "decrypt", "--private-key", str(tmp_path / "eve.key"),
                              "--envelope", str(tmp_path / "envelope.json"), "--blob", str(tmp_path / "blob.bin"),
                              "--out", str(tmp_path / "eve.csv")], capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and not (tmp_path / "eve.csv").exists()

    # A key registered after the purchase gets a fresh envelope sealed to it.
    private2, public2 = keypair()
    await hub.put("/api/v1/me/x25519-key", json={"public_key": delivery.b64(public2)}, headers=auth(buyer))
    fresh = (await (await hub.get(f"/api/v1/purchases/{purchase_id}/key", headers=auth(buyer))).json())["data"]
    assert delivery.open_envelope(fresh, private2) == key
    await hub.delete("/api/v1/me/x25519-key", headers=auth(buyer))
    assert (await hub.get(f"/api/v1/purchases/{purchase_id}/key", headers=auth(buyer))).status == 409


# --- reviews ---------------------------------------------------------------------------------------

async def test_review_once_updates_ratings_and_is_announced(hub, db, sockets):
    seller, buyer, seller_id, buyer_id, pod = await people(hub, db)
    watcher = sockets()
    await watcher.connect(server_url(hub), "/marketplace")
    await watcher.call("/marketplace", "subscribe", {"channel": f"datapod:{pod}"})
    purchase_id = await buy(hub, db, buyer, buyer_id, seller_id, pod)
    url = f"/api/v1/purchases/{purchase_id}/review"
    for body in ({"rating": 6}, {"rating": 0}, {"rating": 3, "comment": "x" * 2001}, {}):
        assert (await hub.post(url, json=body, headers=auth(buyer))).status == 400
    response = await hub.post(url, json={"rating": 4, "comment": "clean data"}, headers=auth(buyer))
    body = await response.json()
    assert response.status == 201 and body["data"]["rating"] == 4 and body["data"]["average_rating"] == "4.00"
    assert (await hub.post(url, json={"rating": 5}, headers=auth(buyer))).status == 409
    # A second buyer's review moves both averages (the seed's triggers, rebuilt).
    buyer2 = await register(hub)
    second = await buy(hub, db, buyer2, uuid.UUID(buyer2["user"]["id"]), seller_id, pod)
    await hub.post(f"/api/v1/purchases/{second}/review", json={"rating": 1}, headers=auth(buyer2))
    assert await db.fetchval("SELECT average_rating FROM datapods WHERE id = $1", pod) == Decimal("2.50")
    assert await db.fetchval("SELECT average_rating FROM users WHERE id = $1", seller_id) == Decimal("2.50")
    assert await db.fetchval("SELECT purchase_count FROM datapods WHERE id = $1", pod) == 2

    async def announced():
        return len(received(watcher, "review_added")) == 2
    await wait_until(announced)
    events = [e["data"] for e in received(watcher, "review_added")]
    assert events[0] == {"datapod_id": str(pod), "rating": 4, "average_rating": "4.00", "review_count": 1}
    assert events[1]["average_rating"] == "2.50"
    sold = [e["data"] for e in received(watcher, "datapod_sold")]
    assert [e["purchase_count"] for e in sold] == [1, 2]


async def test_review_needs_a_completed_purchase(hub, db):
    seller, buyer, seller_id, buyer_id, pod = await people(hub, db)
    code, body = await start(hub, buyer, pod, "unpaid-" + uuid.uuid4().hex)
    await wait_final(db, body["data"]["id"])
    response = await hub.post(f"/api/v1/purchases/{body['data']['id']}/review", json={"rating": 5}, headers=auth(buyer))
    assert response.status == 409


# --- escrow ----------------------------------------------------------------------------------------

async def make_admin(hub, db) -> dict:
    admin = await register(hub)
    user_id = uuid.UUID(admin["user"]["id"])
    await user_queries.upsert_admin(db, user_id, username=admin["user"]["username"], email=admin["user"]["email"],
                                    password_hash="x")
    return admin


async def test_admin_refund_reverses_counts_and_happens_once(hub, db, sockets):
    seller, buyer, seller_id, buyer_id, pod = await people(hub, db)
    purchase_id = await buy(hub, db, buyer, buyer_id, seller_id, pod)
    admin = await make_admin(hub, db)
    sock = sockets()
    await sock.connect(server_url(hub), "/purchases", buyer["token"])
    await sock.call("/purchases", "subscribe", {"channel": f"user:{buyer_id}"})
    url = f"/api/v1/admin/purchases/{purchase_id}/refund"
    assert (await hub.post(url, json={}, headers=auth(buyer))).status == 403
    response = await hub.post(url, json={"reason": "dataset not as described"}, headers=auth(admin))
    assert response.status == 200, await response.text()
    assert (await hub.post(url, json={}, headers=auth(admin))).status == 409
    refunded = await sock.wait_for("escrow_refunded")
    assert refunded["data"]["reason"] == "dataset not as described"
    assert await status_of(db, purchase_id) == "refunded"
    assert await db.fetchval("SELECT purchase_count FROM datapods WHERE id = $1", pod) == 0
    assert await db.fetchval("SELECT total_sales FROM users WHERE id = $1", seller_id) == 0
    assert (await hub.get(f"/api/v1/purchases/{purchase_id}/download", headers=auth(buyer))).status == 409
    confirm = await hub.post(f"/api/v1/purchases/{purchase_id}/confirm", headers=auth(buyer))
    assert confirm.status == 409
    # The refund is paid back from the escrow wallet by a transfer it signs, sealed in a block.
    await settle(hub, db)
    assert await balance(db, buyer_id) == PRICE and await escrow_balance(hub, db) == 0
    escrow = await (await hub.get(f"/api/v1/purchases/{purchase_id}/escrow", headers=auth(buyer))).json()
    assert [step["step"] for step in escrow["data"]["steps"]] == ["holding", "refunded", "settled"]
    refund_tx = await chain_queries.get_transaction(db, escrow["data"]["settlement_tx_hash"])
    assert refund_tx.status == "confirmed" and refund_tx.sender == escrow_address(hub)
    # After a refund the buyer may buy again, with a new payment.
    code, again = await start(hub, buyer, pod, await pay(hub, db, buyer_id))
    assert code == 202 and again["data"]["id"] == purchase_id
    assert await wait_final(db, purchase_id) == "completed"
    assert await db.fetchval("SELECT status FROM escrow_transactions WHERE purchase_id = $1",
                             uuid.UUID(purchase_id)) == "holding"
    assert await db.fetchval("SELECT purchase_count FROM datapods WHERE id = $1", pod) == 1


async def test_escrow_transitions_happen_exactly_once_under_concurrency(hub, db, pool):
    seller, buyer, seller_id, buyer_id, pod = await people(hub, db)
    purchase_id = uuid.UUID(await buy(hub, db, buyer, buyer_id, seller_id, pod))
    before = await db.fetchval("SELECT count(*) FROM event_outbox WHERE type LIKE 'escrow_%'")

    async def attempt(n: int):
        async with pool.acquire() as conn, conn.transaction():
            if n % 2:
                return "released" if await release_escrow(conn, purchase_id, "race", Decimal(0)) else None
            return "refunded" if await refund_purchase(conn, purchase_id, "race") else None

    outcomes = [o for o in await asyncio.gather(*(attempt(n) for n in range(20))) if o]
    assert len(outcomes) == 1
    status = await db.fetchval("SELECT status FROM escrow_transactions WHERE purchase_id = $1", purchase_id)
    assert status == outcomes[0]
    assert await status_of(db, purchase_id) == ("refunded" if status == "refunded" else "completed")
    # Two events (buyer and seller), whichever won; possibly already relayed, so count both places.
    relayed_or_pending = await db.fetchval("SELECT count(*) FROM event_outbox WHERE type LIKE 'escrow_%'")
    assert relayed_or_pending - before in (0, 2)


# --- durability: crash and resume, racing workers ---------------------------------------------------

class SlowVerifier:
    """Delegates to a real verifier after a pause (or forever), so tests can crash or race it."""

    chain = "kvp"

    def __init__(self, inner, delay: float | None) -> None:
        self.inner, self.delay, self.calls = inner, delay, 0

    async def verify(self, claim):
        self.calls += 1
        if self.delay is None:
            await asyncio.Event().wait()
        await asyncio.sleep(self.delay)
        return await self.inner.verify(claim)


async def pending_purchase(db, master_key: bytes, blobs) -> tuple[uuid.UUID, uuid.UUID]:
    seller = await user_queries.create_user(db, username=f"s{uuid.uuid4().hex[:8]}", email=f"{uuid.uuid4().hex}@x.org",
                                            password_hash="x")
    buyer = await user_queries.create_user(db, username=f"b{uuid.uuid4().hex[:8]}", email=f"{uuid.uuid4().hex}@x.org",
                                           password_hash="x")
    pod_id = await make_pod(db, blobs, master_key, seller.id)
    digest = await synthetic_payment(db, buyer.id, seller.id)
    async with db.transaction():
        purchase_id = await queries.create_purchase(db, buyer.id, await queries.get_pod(db, pod_id), digest)
        await queries.enqueue_job(db, purchase_id)
    return purchase_id, pod_id


async def outbox_steps(db, purchase_id) -> list[str]:
    rows = await db.fetch("SELECT data FROM event_outbox WHERE type = 'purchase_progressed' ORDER BY id")
    return [r["data"]["step"] for r in rows if r["data"]["purchase_id"] == str(purchase_id)]


def short_lease(settings):
    """A lease a test can outlast, renewed often enough to survive a busy machine's pauses."""
    return settings.replace(purchase_job_lease=0.8, purchase_job_heartbeat=0.2)


async def test_a_step_longer_than_the_lease_keeps_it_by_heartbeat(db, pool, fast, tmp_path):
    from server.adapters.blobs import LocalBlobStore

    master_key = b"k" * 32
    purchase_id, _ = await pending_purchase(db, master_key, LocalBlobStore(tmp_path / "blobs"))
    settings = short_lease(fast)
    kvp = KvpChainVerifier(pool)
    slow = PurchaseWorker(pool, SlowVerifier(kvp, 3 * settings.purchase_job_lease), master_key, settings,
                          worker_id="slow")
    other = PurchaseWorker(pool, kvp, master_key, settings, worker_id="other")
    task = asyncio.create_task(slow.run_once())

    async def verifying():
        return await status_of(db, purchase_id) == "processing"
    await wait_until(verifying)
    while not task.done():  # the verification outlasts the lease several times over
        assert await other.run_once() is False
        await asyncio.sleep(settings.purchase_job_heartbeat)
    assert await task is True
    assert await status_of(db, purchase_id) == "completed"
    assert await outbox_steps(db, purchase_id) == ["payment_verifying", "payment_verified", "key_wrapping",
                                                   "escrow_holding", "completed"]


async def test_a_crashed_worker_is_resumed_after_its_lease(db, pool, fast, tmp_path):
    from server.adapters.blobs import LocalBlobStore

    master_key = b"k" * 32
    purchase_id, _ = await pending_purchase(db, master_key, LocalBlobStore(tmp_path / "blobs"))
    settings = short_lease(fast)
    kvp = KvpChainVerifier(pool)
    crashed = PurchaseWorker(pool, SlowVerifier(kvp, None), master_key, settings, worker_id="crashed")
    survivor = PurchaseWorker(pool, kvp, master_key, settings, worker_id="survivor")
    task = asyncio.create_task(crashed.run_once())

    async def verifying():
        return await status_of(db, purchase_id) == "processing"
    await wait_until(verifying)
    await asyncio.sleep(2 * settings.purchase_job_lease)
    assert await survivor.run_once() is False  # alive past its first lease: the heartbeat holds it
    task.cancel()  # the process dies mid-step: its heartbeat stops, its lease stays in the table
    await asyncio.gather(task, return_exceptions=True)
    job = await db.fetchrow("SELECT * FROM purchase_jobs WHERE purchase_id = $1", purchase_id)
    assert job["locked_by"] == "crashed" and job["step"] == "verify"

    loop = asyncio.get_running_loop()
    died = loop.time()
    await wait_until(survivor.run_once, timeout=10 * settings.purchase_job_lease,
                     interval=settings.purchase_job_heartbeat)
    assert loop.time() - died >= settings.purchase_job_lease / 2  # not before its last renewal ran out
    assert await status_of(db, purchase_id) == "completed"
    assert await outbox_steps(db, purchase_id) == ["payment_verifying", "payment_verified", "key_wrapping",
                                                   "escrow_holding", "completed"]
    assert await db.fetchval("SELECT count(*) FROM purchase_jobs") == 0


async def test_a_worker_whose_lease_was_taken_over_commits_nothing(db, pool, fast, tmp_path):
    from server.adapters.blobs import LocalBlobStore

    master_key = b"k" * 32
    purchase_id, _ = await pending_purchase(db, master_key, LocalBlobStore(tmp_path / "blobs"))
    settings = short_lease(fast)
    stalled = PurchaseWorker(pool, SlowVerifier(KvpChainVerifier(pool), 3 * settings.purchase_job_heartbeat),
                             master_key, settings, worker_id="stalled")
    task = asyncio.create_task(stalled.run_once())

    async def verifying():
        return await status_of(db, purchase_id) == "processing"
    await wait_until(verifying)
    # Another node claimed the job meanwhile (as after a pause longer than the lease).
    await db.execute("UPDATE purchase_jobs SET locked_by = 'other' WHERE purchase_id = $1", purchase_id)
    assert await task is True
    job = await db.fetchrow("SELECT * FROM purchase_jobs WHERE purchase_id = $1", purchase_id)
    assert job["locked_by"] == "other" and job["step"] == "verify"  # the heartbeat did not take it back
    assert await outbox_steps(db, purchase_id) == ["payment_verifying"]
    assert await db.fetchval("SELECT count(*) FROM payment_receipts WHERE purchase_id = $1", purchase_id) == 0


async def test_a_job_left_mid_way_resumes_at_its_step(db, pool, fast, tmp_path):
    from server.adapters.blobs import LocalBlobStore

    master_key = b"k" * 32
    purchase_id, _ = await pending_purchase(db, master_key, LocalBlobStore(tmp_path / "blobs"))
    worker = PurchaseWorker(pool, KvpChainVerifier(pool), master_key, fast, worker_id="w")
    # Pretend a previous process got as far as escrow and died before completing.
    async with db.transaction():
        await db.execute("UPDATE purchases SET status = 'processing' WHERE id = $1", purchase_id)
    async with pool.acquire() as conn:
        await queries.claim_job(conn, "old", 60, purchase_id)
        await conn.execute("UPDATE purchase_jobs SET step = 'complete', locked_until = now() - interval '1 second' "
                           "WHERE purchase_id = $1", purchase_id)
    assert await worker.run_once() is True
    assert await status_of(db, purchase_id) == "completed"
    assert await outbox_steps(db, purchase_id) == ["completed"]


async def test_two_workers_racing_for_one_purchase_process_it_once(db, pool, fast, tmp_path):
    from server.adapters.blobs import LocalBlobStore

    master_key = b"k" * 32
    purchase_id, pod = await pending_purchase(db, master_key, LocalBlobStore(tmp_path / "blobs"))
    kvp = KvpChainVerifier(pool)
    verifiers = [SlowVerifier(kvp, 0.2) for _ in range(8)]
    workers = [PurchaseWorker(pool, v, master_key, fast, worker_id=f"w{n}") for n, v in enumerate(verifiers)]
    claimed = await asyncio.gather(*(w.run_once() for w in workers))
    assert claimed.count(True) == 1
    assert sum(v.calls for v in verifiers) == 1
    assert await status_of(db, purchase_id) == "completed"
    assert await outbox_steps(db, purchase_id) == ["payment_verifying", "payment_verified", "key_wrapping",
                                                   "escrow_holding", "completed"]
    assert await db.fetchval("SELECT count(*) FROM escrow_transactions") == 1
    assert await db.fetchval("SELECT purchase_count FROM datapods WHERE id = $1", pod) == 1


async def test_verified_payment_then_failure_is_refunded(db, pool, fast, tmp_path):
    from server.adapters.blobs import LocalBlobStore

    master_key = b"k" * 32
    purchase_id, pod = await pending_purchase(db, master_key, LocalBlobStore(tmp_path / "blobs"))
    # The pod's key cannot be unwrapped (wrong MASTER_KEY): the step is retried, then the paid purchase is refunded.
    worker = PurchaseWorker(pool, KvpChainVerifier(pool), b"w" * 32, fast, worker_id="w")
    assert await worker.run_once() is True  # payment verified, key wrapping fails: retry scheduled
    assert await status_of(db, purchase_id) == "processing"
    assert await db.fetchval("SELECT step FROM purchase_jobs") == "wrap"
    await db.execute("UPDATE purchase_jobs SET run_after = now(), attempts = $1", MAX_ATTEMPTS)
    assert await worker.run_once() is True
    assert await status_of(db, purchase_id) == "refunded"
    assert await db.fetchval("SELECT status FROM escrow_transactions WHERE purchase_id = $1", purchase_id) == "refunded"
    assert (await outbox_steps(db, purchase_id))[-1] == "refunded"
    assert await db.fetchval("SELECT count(*) FROM purchase_jobs") == 0


# --- the Sui verifier against pysui's own result types ---------------------------------------------

class FakeSuiClient:
    """Answers GetTransaction like pysui's GrpcProtocolClient, from a prepared ExecutedTransaction."""

    def __init__(self, answer) -> None:
        self.answer = answer
        self.requests = []

    async def execute_grpc_request(self, *, request, **_):
        from pysui import SuiRpcResult

        self.requests.append(request)
        if isinstance(self.answer, Exception):
            raise self.answer
        if isinstance(self.answer, SuiRpcResult):
            return self.answer
        return SuiRpcResult(True, None, self.answer)


BUYER_SUI = "0x" + "ab" * 32
SELLER_SUI = "0x" + "cd" * 32
ESCROW_SUI = "0x" + "ef" * 32


def executed(*, success=True, sender=BUYER_SUI, credit=(SELLER_SUI, 1_500_000_000), coin="0x2::sui::SUI",
             when=None, digest="9xQeWvG816bUx9EPjHmaT23yvVM2ZWbrrpZb9PusVFin"):
    import pysui.sui.sui_grpc.suimsgs.sui.rpc.v2 as sui

    return sui.ExecutedTransaction(
        digest=digest, transaction=sui.Transaction(sender=sender),
        effects=sui.TransactionEffects(status=sui.ExecutionStatus(success=success)),
        balance_changes=[sui.BalanceChange(address=sender, coin_type=coin, amount=str(-credit[1] - 2_000_000)),
                         sui.BalanceChange(address=credit[0], coin_type=coin, amount=str(credit[1]))],
        timestamp=when or dt.datetime.now(dt.timezone.utc), checkpoint=12345)


def claim(price=PRICE, buyer=BUYER_SUI) -> PaymentClaim:
    return PaymentClaim(digest="9xQeWvG816bUx9EPjHmaT23yvVM2ZWbrrpZb9PusVFin", buyer_id=uuid.uuid4(),
                        buyer_sui_address=buyer, seller_id=uuid.uuid4(), seller_sui_address=SELLER_SUI,
                        price_sui=price, started_at=dt.datetime.now(dt.timezone.utc))


@pytest.mark.parametrize("answer, expected, reason", [
    (executed(), Outcome.VERIFIED, ""),
    (executed(credit=(ESCROW_SUI, 2_000_000_000)), Outcome.VERIFIED, ""),
    (executed(credit=(SELLER_SUI, 1_499_999_999)), Outcome.REJECTED, "less than the price"),
    (executed(success=False), Outcome.REJECTED, "failed on chain"),
    (executed(sender="0x" + "11" * 32), Outcome.REJECTED, "not sent by the buyer"),
    (executed(credit=("0x" + "22" * 32, 9_000_000_000)), Outcome.REJECTED, "less than the price"),
    (executed(coin="0x5d4b::coin::USDC"), Outcome.REJECTED, "less than the price"),
    (executed(when=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=1)), Outcome.REJECTED, "older"),
    (executed(digest="other"), Outcome.REJECTED, "another digest"),
    (None, Outcome.PENDING, "no transaction"),
    (ConnectionError("down"), Outcome.PENDING, "did not answer"),
])
async def test_sui_verifier_with_pysui_result_types(answer, expected, reason):
    client = FakeSuiClient(answer)
    verdict = await SuiChainVerifier(client, escrow_address=ESCROW_SUI).verify(claim())
    assert verdict.outcome is expected, verdict
    assert reason in verdict.reason
    request = client.requests[0]
    assert request.digest == claim().digest and "balance_changes" in request.field_mask.paths
    if expected is Outcome.VERIFIED:
        assert verdict.sender == BUYER_SUI and verdict.amount_sui >= PRICE


async def test_sui_verifier_refuses_buyers_without_an_address_and_node_errors_are_pending():
    from pysui import SuiRpcResult

    assert (await SuiChainVerifier(FakeSuiClient(executed())).verify(claim(buyer=None))).outcome is Outcome.REJECTED
    refused = FakeSuiClient(SuiRpcResult(False, "UNAVAILABLE"))
    assert (await SuiChainVerifier(refused).verify(claim())).outcome is Outcome.PENDING
    # Addresses written without leading zeros are the same address.
    padded_seller = "0x" + "00" * 2 + "cd" * 30
    answer = executed(credit=(padded_seller, 1_500_000_000))
    verdict = await SuiChainVerifier(FakeSuiClient(answer)).verify(
        dataclasses.replace(claim(), seller_sui_address="0x" + "cd" * 30))
    assert verdict.outcome is Outcome.VERIFIED, verdict


async def test_a_payment_sealed_while_its_job_waits_out_a_backoff_is_checked_at_once(db, aiohttp_client, fast):
    """A job that found its payment not sealed yet waits out a backoff, then the workers' poll (30 s
    here); the block that seals the payment wakes it instead."""
    from server.services.block_producer import wake_payment_checks

    hub = await aiohttp_client(create_app(fast.replace(purchase_poll_interval=30, payment_verify_timeout=60)))
    seller, buyer, seller_id, buyer_id, pod = await people(hub, db)
    digest = await pay(hub, db, buyer_id, status="pending")  # signed and submitted, in no block yet
    code, body = await start(hub, buyer, pod, digest)
    assert code == 202
    purchase_id = uuid.UUID(body["data"]["id"])

    async def backing_off() -> bool:
        return await db.fetchval("SELECT last_error IS NOT NULL AND locked_by IS NULL FROM purchase_jobs "
                                 "WHERE purchase_id = $1", purchase_id) is True
    await wait_until(backing_off, timeout=10)
    sealed = await chain_service.seal_block(db, chain_service.SealConfig())
    assert digest in [tx.hash for tx in sealed.confirmed]
    await wake_payment_checks(db, sealed)

    async def completed() -> bool:
        return await status_of(db, purchase_id) == "completed"
    await wait_until(completed, timeout=5)  # not the 30 s poll
