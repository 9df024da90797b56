"""Purchase rules: start, the job's steps, confirm, refund, escrow release, downloads, key envelopes, reviews.

Starting a purchase only records it (`pending_payment`) and queues its durable job; the worker
(server/services/purchase_jobs.py) leases the job and runs its steps, each of which is one of the
functions here, committed with its events. A buyer only ever sees their own purchases: another
user's purchase answers not_found, never its contents (an administrator may read any).

Money rules: a purchase is `failed` when its payment was never verified; once verified, any
failure refunds it (escrow `refunded`, purchase `refunded`). The escrow is released to the seller
when the buyer confirms delivery or when the release window has passed. Every transition is a
compare-and-set, and every event goes through the outbox in the transaction that makes its change.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import unicodedata
import uuid
from typing import Any, AsyncIterator, Callable

import asyncpg
import structlog
from aiohttp import web

from db import escrow as escrow_queries
from db import outbox
from db import purchases as queries
from db.pool import POOL
from server.adapters.blobs import BLOBS, BlobStore
from server.adapters.payments import PaymentClaim, Verdict
from server.core import jsonutil
from server.core.crypto import MASTER_KEY, unwrap_key
from server.core.cursors import decode_time_cursor, encode_time_cursor
from server.core.errors import Conflict, ErrorCode, Forbidden, HubError, InvalidPayload, NotFound, Unavailable
from server.core.identity import Identity
from server.core.protocol import DEFAULT_PAGE
from server.realtime.hub import user_channel
from server.services import delivery, escrow, marketplace

log = structlog.get_logger(__name__)

# Events on the buyer's and the seller's `user_channel`.
PURCHASE_PROGRESSED = "purchase_progressed"
SALE_COMPLETED = "sale_completed"

STATUSES = ("pending_payment", "processing", "completed", "failed", "refunded")
PROGRESS = {  # purchase_progressed step -> percent
    "payment_pending": 0, "payment_verifying": 10, "payment_verified": 30, "key_wrapping": 55,
    "escrow_holding": 80, "completed": 100,
}
EXTENSIONS = {"text/csv": ".csv", "application/x-ndjson": ".jsonl", "application/json": ".json",
              "application/vnd.apache.parquet": ".parquet"}


class IntegrityFailed(HubError):
    """The stored blob does not decrypt to the uploaded dataset (reported, never served)."""

    code = ErrorCode.INTERNAL_ERROR


# --- events ------------------------------------------------------------------------------------

async def progressed(conn: asyncpg.Connection, purchase: queries.Purchase, status: str, step: str,
                     percent: int | None = None, reason: str | None = None) -> None:
    """purchase_progressed on the buyer's channel, committed with the state change."""
    data: dict[str, Any] = {"purchase_id": str(purchase.id), "datapod_id": str(purchase.datapod_id),
                            "status": status, "step": step,
                            "percent": PROGRESS.get(step, 100) if percent is None else percent}
    if reason:
        data["reason"] = reason
    await outbox.enqueue(conn, user_channel(purchase.buyer_id), PURCHASE_PROGRESSED, data)


async def _announce_refund(conn: asyncpg.Connection, purchase: queries.Purchase, reason: str) -> None:
    await progressed(conn, purchase, "refunded", "refunded", 100, reason)


# --- authorisation -----------------------------------------------------------------------------

async def _own_purchase(conn: asyncpg.Connection, identity: Identity, purchase_id: uuid.UUID,
                        *, completed: bool = False) -> queries.Purchase:
    """The caller's purchase; not_found for anyone else's (existence is not revealed)."""
    purchase = await queries.get_purchase(conn, purchase_id)
    if purchase is None or (purchase.buyer_id != identity.user_id and not identity.is_admin):
        raise NotFound("no such purchase", field="purchase_id")
    if completed and purchase.status != "completed":
        raise Conflict(f"the purchase is {purchase.status}, not completed", field="purchase_id")
    return purchase


async def _bought_purchase(conn: asyncpg.Connection, identity: Identity, purchase_id: uuid.UUID,
                           action: str) -> queries.Purchase:
    """The caller's completed purchase, for what only its buyer does (an administrator reads, never acts)."""
    purchase = await _own_purchase(conn, identity, purchase_id, completed=True)
    if purchase.buyer_id != identity.user_id:
        raise Forbidden(f"only the buyer {action} a purchase", field="purchase_id")
    return purchase


async def _delivery_material(conn: asyncpg.Connection, identity: Identity,
                             purchase_id: uuid.UUID) -> tuple[queries.Purchase, queries.PodForSale]:
    purchase = await _bought_purchase(conn, identity, purchase_id, "downloads")
    pod = await queries.get_pod(conn, purchase.datapod_id)
    if pod is None:
        raise NotFound("the DataPod no longer exists", field="purchase_id")
    return purchase, pod


# --- the buyer's commands and reads --------------------------------------------------------------

async def start_purchase(app: web.Application, buyer_id: uuid.UUID, datapod_id: uuid.UUID, digest: str) -> dict:
    """Record a pending purchase and queue its job (one transaction); the buyer's view of it."""
    async with app[POOL].acquire() as conn, conn.transaction():
        pod = await queries.get_pod(conn, datapod_id)
        if pod is None or not pod.published:
            raise NotFound("no such DataPod", field="datapod_id")
        if pod.seller_id == buyer_id:
            raise Forbidden("you cannot buy your own DataPod", field="datapod_id")
        if await escrow_queries.refund_unsettled(conn, buyer_id, datapod_id):
            # Its single escrow row still owes the last payment back: reopening it would forget that.
            raise Conflict("your refund for this DataPod is still being paid back; try again after the next block",
                           field="datapod_id")
        if await queries.digest_already_paid(conn, digest):
            raise Conflict("this payment already paid for a purchase", field="payment_tx_digest")
        await queries.release_unpaid_digest(conn, digest)
        try:
            async with conn.transaction():  # a savepoint, so the unique violation does not end ours
                purchase_id = await queries.create_purchase(conn, buyer_id, pod, digest)
        except asyncpg.UniqueViolationError:
            raise Conflict("this payment digest is already used by another purchase",
                           field="payment_tx_digest") from None
        if purchase_id is None:
            raise Conflict("you already bought this DataPod (or the purchase is in progress)", field="datapod_id")
        await queries.enqueue_job(conn, purchase_id)
        purchase = await queries.get_purchase(conn, purchase_id)
        assert purchase is not None
        await progressed(conn, purchase, "pending_payment", "payment_pending")
    log.info("purchase_started", purchase_id=str(purchase_id), datapod_id=str(datapod_id))
    return purchase.to_public()


async def get_purchase(app: web.Application, identity: Identity, purchase_id: uuid.UUID) -> dict:
    """One of the caller's purchases (any, for an administrator)."""
    async with app[POOL].acquire() as conn:
        return (await _own_purchase(conn, identity, purchase_id)).to_public()


async def list_purchases(app: web.Application, buyer_id: uuid.UUID, params: dict) -> dict:
    """A page of the buyer's purchases, newest first, with a keyset cursor."""
    limit = params.get("limit", DEFAULT_PAGE)
    before = decode_time_cursor(params["cursor"]) if params.get("cursor") else None
    async with app[POOL].acquire() as conn:
        found = await queries.list_purchases(
            conn, buyer_id, limit=limit + 1, before=before, status=params.get("status"),
            datapod_id=uuid.UUID(params["datapod_id"]) if params.get("datapod_id") else None)
    page = found[:limit]
    return {"items": [purchase.to_public() for purchase in page],
            "next_cursor": encode_time_cursor(page[-1].created_at, page[-1].id) if len(found) > limit else None}


async def confirm_download(app: web.Application, identity: Identity, purchase_id: uuid.UUID) -> dict:
    """The buyer confirms delivery: the escrow is released to the seller (once; later calls say so)."""
    async with app[POOL].acquire() as conn:
        await _bought_purchase(conn, identity, purchase_id, "confirms")
    return await escrow.confirm_receipt(app, identity, purchase_id)


async def add_review(app: web.Application, identity: Identity, purchase_id: uuid.UUID, rating: int,
                     comment: str | None) -> dict:
    """Review a completed purchase (once, its buyer only); the pod's viewers hear the new average."""
    async with app[POOL].acquire() as conn, conn.transaction():
        purchase = await _bought_purchase(conn, identity, purchase_id, "reviews")
        try:
            async with conn.transaction():  # a savepoint, so the unique violation does not end ours
                review = await queries.add_review(conn, purchase, rating, comment or None)
        except asyncpg.UniqueViolationError:
            raise Conflict("this purchase is already reviewed", field="purchase_id") from None
        average, count = await queries.datapod_rating(conn, purchase.datapod_id)
        event = {"datapod_id": str(purchase.datapod_id), "rating": review.rating, "average_rating": average,
                 "review_count": count}
        await marketplace.enqueue_datapod_event(conn, purchase.datapod_id, None, marketplace.REVIEW_ADDED, event)
    return {**review.to_public(), "average_rating": average}


# --- delivery ------------------------------------------------------------------------------------

def download_filename(title: str, file_type: str | None) -> str:
    """An ASCII file name from the title, with the extension of the content type."""
    ascii_title = unicodedata.normalize("NFKD", title).encode("ascii", "ignore").decode()
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", ascii_title).strip("-._")[:80] or "datapod"
    return stem + EXTENSIONS.get((file_type or "").split(";")[0].strip(), ".bin")


@dataclasses.dataclass(frozen=True, slots=True)
class Download:
    """A purchased dataset whose blob passed its integrity check, ready to be decrypted to the buyer."""

    purchase_id: uuid.UUID
    filename: str
    content_type: str
    data_hash: str
    size: int
    stream: Callable[[], AsyncIterator[bytes]]
    key: bytes
    nonce: bytes
    aad: bytes
    expected_hash: str | None

    async def write_to(self, write: Callable[[bytes], Any]) -> bool:
        """Decrypt into `write` (pass two); False, logged, when the blob failed part way."""
        try:
            await delivery.decrypt_to(self.stream, self.key, self.nonce, self.aad, self.expected_hash, write)
        except (delivery.IntegrityError, KeyError, HubError) as exc:
            log.error("download_aborted", purchase_id=str(self.purchase_id), error=str(exc))
            return False
        log.info("purchase_downloaded", purchase_id=str(self.purchase_id), bytes=self.size)
        return True


async def open_download(app: web.Application, identity: Identity, purchase_id: uuid.UUID) -> Download:
    """The buyer's dataset checked (GCM tag and data_hash) before any byte is released; logs the download."""
    async with app[POOL].acquire() as conn:
        purchase, pod = await _delivery_material(conn, identity, purchase_id)
    key = unwrap_key(app[MASTER_KEY], pod.wrapped_key, str(pod.id).encode())
    blobs, nonce, aad = app[BLOBS], bytes.fromhex(pod.encryption_iv), str(pod.id).encode()

    def stream() -> AsyncIterator[bytes]:
        return blobs.stream(pod.walrus_blob_id)

    try:
        _, size = await delivery.verify_blob(stream, key, nonce, aad, pod.data_hash)
    except KeyError:
        raise Unavailable("the dataset's blob is not available right now") from None
    except delivery.IntegrityError as exc:
        log.error("download_integrity_failed", purchase_id=str(purchase.id), datapod_id=str(pod.id), error=str(exc))
        raise IntegrityFailed("the stored dataset failed its integrity check; it was not served") from None
    async with app[POOL].acquire() as conn:
        await queries.log_download(conn, purchase)
    return Download(purchase_id=purchase.id, filename=download_filename(pod.title, pod.file_type),
                    content_type=pod.file_type or "application/octet-stream", data_hash=pod.data_hash or "",
                    size=size, stream=stream, key=key, nonce=nonce, aad=aad, expected_hash=pod.data_hash)


@dataclasses.dataclass(frozen=True, slots=True)
class EncryptedBlob:
    """A purchased dataset's blob as stored, for client-side decryption with the key envelope."""

    blob_id: str
    blobs: BlobStore

    async def chunks(self) -> AsyncIterator[bytes]:
        """The stored ciphertext; Unavailable when the blob store cannot serve it."""
        try:
            async for chunk in self.blobs.stream(self.blob_id):
                yield chunk
        except KeyError:
            raise Unavailable("the dataset's blob is not available right now") from None


async def open_blob(app: web.Application, identity: Identity, purchase_id: uuid.UUID) -> EncryptedBlob:
    """The buyer's encrypted blob."""
    async with app[POOL].acquire() as conn:
        _, pod = await _delivery_material(conn, identity, purchase_id)
    return EncryptedBlob(pod.walrus_blob_id, app[BLOBS])


async def key_envelope(app: web.Application, identity: Identity, purchase_id: uuid.UUID) -> dict[str, Any]:
    """The dataset key sealed to the buyer's registered X25519 public key (docs/decrypt.md)."""
    async with app[POOL].acquire() as conn:
        purchase, pod = await _delivery_material(conn, identity, purchase_id)
        public_key = await queries.get_x25519_key(conn, identity.user_id)
    if public_key is None:
        raise Conflict("register an X25519 public key first (PUT /api/v1/me/x25519-key)", field="x25519_public_key")
    public_key = bytes(public_key)
    if delivery.is_envelope(purchase.decryption_key):
        stored = jsonutil.loads(purchase.decryption_key)  # type: ignore[arg-type]
        if delivery.unb64(stored["recipient_public_key"]) == public_key:
            return stored
    # Registered (or changed) after the purchase: seal for the key registered now.
    dataset_key = unwrap_key(app[MASTER_KEY], pod.wrapped_key, str(pod.id).encode())
    return delivery.seal_for_buyer(
        dataset_key, public_key, purchase_id=purchase.id, datapod_id=pod.id, dataset_nonce_hex=pod.encryption_iv,
        blob_id=pod.walrus_blob_id, data_hash=pod.data_hash)


async def register_x25519_key(app: web.Application, user_id: uuid.UUID, public_key: str) -> dict[str, Any]:
    """Register the user's X25519 public key (32 bytes, base64url), to which dataset keys are sealed."""
    try:
        raw = delivery.parse_public_key(public_key)
    except ValueError as exc:
        raise InvalidPayload(str(exc), field="public_key") from None
    async with app[POOL].acquire() as conn:
        await queries.set_x25519_key(conn, user_id, raw)
    return {"public_key": delivery.b64(raw)}


async def forget_x25519_key(app: web.Application, user_id: uuid.UUID) -> dict[str, Any]:
    """Forget the user's X25519 public key (dataset keys are then wrapped under MASTER_KEY)."""
    async with app[POOL].acquire() as conn:
        await queries.set_x25519_key(conn, user_id, None)
    return {"public_key": None}


# --- escrow and refunds ------------------------------------------------------------------------

async def release_escrow(conn: asyncpg.Connection, purchase_id: uuid.UUID, reason: str) -> escrow_queries.Escrow | None:
    """holding -> released (buyer confirmed, or the window passed); None if it was not holding."""
    return await escrow.release(conn, purchase_id, reason)


async def refund_purchase(
        conn: asyncpg.Connection, purchase_id: uuid.UUID, reason: str, *, actor_id: uuid.UUID | None = None,
        from_statuses: tuple[str, ...] = escrow_queries.OPEN_STATUSES) -> escrow_queries.Escrow | None:
    """Refund a paid purchase whose escrow still holds the money: escrow and purchase become refunded,
    and the settlement sweep pays the buyer back. None when the escrow was not in `from_statuses`."""
    purchase = await queries.lock_purchase(conn, purchase_id)
    if purchase is None:
        return None
    refunded = await escrow_queries.refund(conn, purchase_id, from_statuses=from_statuses, resolved_by=actor_id,
                                           note=reason if actor_id else None)
    if refunded is None:
        return None
    await queries.set_status(conn, purchase_id, ("processing", "completed"), "refunded")
    await queries.finish_job(conn, purchase_id)  # a job at its last step must not complete it
    await escrow.announce_decision(conn, refunded, reason, actor_id)
    await _announce_refund(conn, purchase, reason)
    return refunded


async def refund_as_admin(app: web.Application, admin: Identity, purchase_id: uuid.UUID,
                          reason: str | None) -> dict[str, Any]:
    """An administrator refunds a purchase whose escrow still holds the payment (exactly once)."""
    async with app[POOL].acquire() as conn, conn.transaction():
        if await queries.get_purchase(conn, purchase_id) is None:
            raise NotFound("no such purchase", field="purchase_id")
        refunded = await refund_purchase(conn, purchase_id, reason or "refunded_by_admin", actor_id=admin.user_id)
        if refunded is None:
            raise Conflict("the escrow is not holding this payment (already released or refunded)",
                           field="purchase_id")
    log.info("purchase_refunded", purchase_id=str(purchase_id), admin=str(admin.user_id))
    return {"purchase_id": str(purchase_id), "status": "refunded", "escrow_status": refunded.status}


async def resolve_dispute(app: web.Application, admin: Identity, purchase_id: uuid.UUID, outcome: str,
                          note: str) -> dict[str, Any]:
    """An administrator ends a dispute: release to the seller or refund the buyer (exactly once)."""
    async with app[POOL].acquire() as conn, conn.transaction():
        if outcome == "release":
            decided = await escrow_queries.release(conn, purchase_id, from_statuses=(escrow_queries.DISPUTED,),
                                                   resolved_by=admin.user_id, note=note)
            await escrow.announce_decision(conn, decided, note, admin.user_id)
        else:
            decided = await refund_purchase(conn, purchase_id, note, actor_id=admin.user_id,
                                            from_statuses=(escrow_queries.DISPUTED,))
        if decided is None:
            current = await escrow_queries.get(conn, purchase_id)
            if current is None:
                raise NotFound("no escrow for that purchase", field="purchase_id")
            raise Conflict(f"the escrow is {current.status}, not disputed", field="purchase_id")
    log.info("escrow_dispute_resolved", purchase_id=str(purchase_id), outcome=outcome, admin=str(admin.user_id))
    return decided.to_public()


# --- the job's steps (each inside the worker's leased transaction) ---------------------------------

async def begin_verification(conn: asyncpg.Connection, purchase: queries.Purchase) -> PaymentClaim:
    """pending_payment -> processing (announced once); the claim the chain verifier checks."""
    if await queries.set_status(conn, purchase.id, ("pending_payment",), "processing"):
        await progressed(conn, purchase, "processing", "payment_verifying")
    addresses = await queries.sui_addresses(conn, purchase.buyer_id, purchase.seller_id)
    return PaymentClaim(
        digest=purchase.payment_tx_digest, buyer_id=purchase.buyer_id,
        buyer_sui_address=addresses.get(purchase.buyer_id), seller_id=purchase.seller_id,
        seller_sui_address=addresses.get(purchase.seller_id), price_sui=purchase.amount_sui,
        started_at=purchase.created_at)


async def record_payment(conn: asyncpg.Connection, purchase: queries.Purchase, verdict: Verdict) -> bool:
    """Record the verified payment; False when its digest already paid for another purchase."""
    recorded = await queries.record_receipt(
        conn, digest=purchase.payment_tx_digest, purchase_id=purchase.id, chain=verdict.chain,
        sender=verdict.sender, receiver=verdict.receiver, amount_sui=verdict.amount_sui or purchase.amount_sui)
    if recorded:
        await progressed(conn, purchase, "processing", "payment_verified")
    return recorded


async def keep_refused_payment(conn: asyncpg.Connection, purchase: queries.Purchase, verdict: Verdict) -> bool:
    """A payment refused (too small, too old) that still reached the escrow from the buyer is recorded,
    so failing the purchase pays it back; False when the digest already paid for something else."""
    return await queries.record_receipt(
        conn, digest=purchase.payment_tx_digest, purchase_id=purchase.id, chain=verdict.chain,
        sender=verdict.sender, receiver=verdict.receiver, amount_sui=verdict.amount_sui or purchase.amount_sui)


@dataclasses.dataclass(frozen=True, slots=True)
class SealedKey:
    """The dataset key sealed for one buyer, with what decrypting the blob needs."""

    decryption_key: str
    decryption_iv: str
    encrypted_blob_id: str


async def seal_key(conn: asyncpg.Connection, master_key: bytes, purchase_id: uuid.UUID) -> SealedKey | None:
    """The dataset key sealed to the buyer's X25519 key (else under MASTER_KEY); None if the purchase is gone."""
    purchase = await queries.get_purchase(conn, purchase_id)
    if purchase is None:
        return None
    pod = await queries.get_pod(conn, purchase.datapod_id)
    public_key = await queries.get_x25519_key(conn, purchase.buyer_id)
    assert pod is not None
    dataset_key = unwrap_key(master_key, pod.wrapped_key, str(pod.id).encode())
    if hashlib.sha256(dataset_key).hexdigest() != pod.encryption_key_hash:
        raise ValueError("the DataPod's key does not match its encryption_key_hash")
    if public_key is not None:
        wrapped = delivery.envelope_json(delivery.seal_for_buyer(
            dataset_key, bytes(public_key), purchase_id=purchase_id, datapod_id=pod.id,
            dataset_nonce_hex=pod.encryption_iv, blob_id=pod.walrus_blob_id, data_hash=pod.data_hash))
    else:
        wrapped = delivery.seal_for_server(master_key, dataset_key, purchase_id)
    return SealedKey(wrapped, pod.encryption_iv, pod.walrus_blob_id)


async def store_key(conn: asyncpg.Connection, purchase: queries.Purchase, sealed: SealedKey) -> bool:
    """Give the processing purchase its sealed key; False when it is no longer processing."""
    if not await queries.set_key(conn, purchase.id, decryption_key=sealed.decryption_key,
                                 decryption_iv=sealed.decryption_iv, encrypted_blob_id=sealed.encrypted_blob_id):
        return False
    await progressed(conn, purchase, "processing", "key_wrapping")
    return True


class EscrowBusy(HubError):
    """The buyer's earlier refund of this DataPod is not paid back yet: the job retries."""

    code = ErrorCode.UNAVAILABLE


async def hold_escrow(conn: asyncpg.Connection, purchase: queries.Purchase) -> None:
    """Open the purchase's escrow holding the amount paid."""
    paid = await queries.receipt_amount(conn, purchase.id, purchase.payment_tx_digest)
    held = await escrow_queries.hold(conn, purchase.id, purchase.seller_id, paid or purchase.amount_sui)
    if held is None:
        raise EscrowBusy("the previous refund of this purchase is not settled yet")
    await escrow.record_hold(conn, held)
    await progressed(conn, purchase, "processing", "escrow_holding")


async def complete_purchase(conn: asyncpg.Connection, purchase: queries.Purchase) -> bool:
    """processing -> completed: the buyer, the seller and the market hear of it; False if refunded meanwhile."""
    if not await queries.set_status(conn, purchase.id, ("processing",), "completed"):
        return False
    await progressed(conn, purchase, "completed", "completed")
    await outbox.enqueue(conn, user_channel(purchase.seller_id), SALE_COMPLETED, {
        "purchase_id": str(purchase.id), "datapod_id": str(purchase.datapod_id),
        "datapod_title": purchase.datapod_title, "amount_sui": purchase.amount_sui})
    sold = {"datapod_id": str(purchase.datapod_id),
            "purchase_count": await queries.purchase_count(conn, purchase.datapod_id)}
    await marketplace.enqueue_datapod_event(conn, purchase.datapod_id, None, marketplace.DATAPOD_SOLD, sold)
    return True


async def fail_purchase(conn: asyncpg.Connection, purchase: queries.Purchase, reason: str) -> None:
    """End a purchase that cannot go on: `failed` if its payment was never verified, else refunded."""
    paid = await queries.receipt_amount(conn, purchase.id, purchase.payment_tx_digest)
    if paid is None:
        if await queries.set_status(conn, purchase.id, ("pending_payment", "processing"), "failed"):
            await progressed(conn, purchase, "failed", "failed", 100, reason)
        return
    # Paid: refund the holding escrow, or, if none was opened yet, record the money owed back in one row.
    refunded = await escrow_queries.refund(conn, purchase.id)
    if refunded is not None:
        await escrow.announce_decision(conn, refunded, reason, None)
    else:
        await escrow.refund_unheld(conn, purchase.id, purchase.seller_id, paid, reason)
    if await queries.set_status(conn, purchase.id, ("pending_payment", "processing"), "refunded"):
        await _announce_refund(conn, purchase, reason)
