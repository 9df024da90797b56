"""Purchases: start, follow, confirm, download, key envelope, review (REST and the /purchases namespace).

Starting a purchase only records it (`pending_payment`) and queues its durable job; the worker
(server/purchase_jobs.py) verifies the payment and reports progress on `user:<buyer>`. A buyer only
ever sees their own purchases: another user's purchase answers not_found, never its contents.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import re
import unicodedata
import uuid

import asyncpg
import structlog
from aiohttp import web

from db import escrow as escrow_queries
from db import outbox
from db import purchases as queries
from db.pool import POOL
from server.adapters.blobs import BLOBS
from server.core import jsonutil
from server.core.crypto import MASTER_KEY, unwrap_key
from server.core.errors import Conflict, ErrorCode, Forbidden, HubError, InvalidPayload, NotFound, Unavailable
from server.core.identity import Identity
from server.edge.namespace import Ctx, HubNamespace, command
from server.edge.rest import endpoint, ok_response, query_payload
from server.edge.schemas import UUID, compile_schema, obj, string
from server.realtime.hub import ChannelRule, own_user, user_channel
from server.services import delivery, marketplace
from server.services.purchase_jobs import refund_purchase, release_escrow

log = structlog.get_logger(__name__)
routes = web.RouteTableDef()

MAX_PAGE = 100
DEFAULT_PAGE = 20
STATUSES = ["pending_payment", "processing", "completed", "failed", "refunded"]
# Sui digests are base58 (43-44 chars); KVP hashes hex. Both fit this, and nothing else is needed.
DIGEST = string(8, 100, pattern="^[A-Za-z0-9_:-]+$")
START_SCHEMA = obj({"datapod_id": UUID, "payment_tx_digest": DIGEST}, required=("datapod_id", "payment_tx_digest"))
PURCHASE_ID_SCHEMA = obj({"purchase_id": UUID}, required=("purchase_id",))
LIST_SCHEMA = {**obj({"limit": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE},
                     "cursor": string(1, 200), "status": {"enum": STATUSES}, "datapod_id": UUID}),
               "type": ["object", "null"]}
LIST_VALIDATOR = compile_schema(LIST_SCHEMA)
REVIEW_SCHEMA = obj({"rating": {"type": "integer", "minimum": 1, "maximum": 5},
                     "comment": string(0, 2000)}, required=("rating",))
REFUND_SCHEMA = obj({"reason": string(1, 500)})
X25519_SCHEMA = obj({"public_key": string(43, 64)}, required=("public_key",))
EXTENSIONS = {"text/csv": ".csv", "application/x-ndjson": ".jsonl", "application/json": ".json",
              "application/vnd.apache.parquet": ".parquet"}


class IntegrityFailed(HubError):
    """The stored blob does not decrypt to the uploaded dataset (reported, never served)."""

    code = ErrorCode.INTERNAL_ERROR


# --- shared logic ----------------------------------------------------------------------------------

async def start_purchase(app: web.Application, buyer_id: uuid.UUID, datapod_id: uuid.UUID, digest: str) -> dict:
    """Record a pending purchase and queue its job (one transaction); the buyer's view of it."""
    async with app[POOL].acquire() as conn, conn.transaction():
        pod = await queries.get_pod(conn, datapod_id)
        if pod is None or not pod.published:
            raise NotFound("no such DataPod", field="datapod_id")
        if pod.seller_id == buyer_id:
            raise Forbidden("you cannot buy your own DataPod", field="datapod_id")
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
        await outbox.enqueue(conn, user_channel(buyer_id), "purchase_progressed", {
            "purchase_id": str(purchase_id), "datapod_id": str(datapod_id), "status": "pending_payment",
            "step": "payment_pending", "percent": 0})
    log.info("purchase_started", purchase_id=str(purchase_id), datapod_id=str(datapod_id))
    return purchase.to_public()  # type: ignore[union-attr]


async def own_purchase(conn: asyncpg.Connection, identity: Identity, purchase_id: uuid.UUID,
                       *, completed: bool = False) -> queries.Purchase:
    """The caller's purchase; not_found for anyone else's (existence is not revealed)."""
    purchase = await queries.get_purchase(conn, purchase_id)
    if purchase is None or (purchase.buyer_id != identity.user_id and not identity.is_admin):
        raise NotFound("no such purchase", field="purchase_id")
    if completed and purchase.status != "completed":
        raise Conflict(f"the purchase is {purchase.status}, not completed", field="purchase_id")
    return purchase


def _encode_cursor(purchase: queries.Purchase) -> str:
    raw = jsonutil.dumpb([purchase.created_at.isoformat(), str(purchase.id)])
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _decode_cursor(cursor: str) -> tuple[dt.datetime, uuid.UUID]:
    try:
        created_at, last_id = jsonutil.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        return dt.datetime.fromisoformat(created_at), uuid.UUID(last_id)
    except (ValueError, TypeError, binascii.Error):
        raise InvalidPayload("not a cursor from this list", field="cursor") from None


async def list_purchases(app: web.Application, buyer_id: uuid.UUID, params: dict) -> dict:
    """A page of the buyer's purchases, newest first, with a keyset cursor."""
    limit = params.get("limit", DEFAULT_PAGE)
    before = _decode_cursor(params["cursor"]) if params.get("cursor") else None
    async with app[POOL].acquire() as conn:
        found = await queries.list_purchases(
            conn, buyer_id, limit=limit + 1, before=before, status=params.get("status"),
            datapod_id=uuid.UUID(params["datapod_id"]) if params.get("datapod_id") else None)
    page = found[:limit]
    return {"items": [purchase.to_public() for purchase in page],
            "next_cursor": _encode_cursor(page[-1]) if len(found) > limit else None}


async def confirm_download(app: web.Application, identity: Identity, purchase_id: uuid.UUID) -> dict:
    """The buyer confirms delivery: the escrow is released to the seller (once; later calls say so)."""
    async with app[POOL].acquire() as conn, conn.transaction():
        purchase = await own_purchase(conn, identity, purchase_id, completed=True)
        if purchase.buyer_id != identity.user_id:
            raise Forbidden("only the buyer confirms a purchase", field="purchase_id")
        released = await release_escrow(conn, purchase_id, "buyer_confirmed")
        current = released or await escrow_queries.get(conn, purchase_id)
    return {"purchase_id": str(purchase_id), "released": released is not None,
            "escrow_status": current.status if current else None}


def _parse_id(request: web.Request, name: str = "purchase_id") -> uuid.UUID:
    try:
        return uuid.UUID(request.match_info[name])
    except ValueError:
        raise NotFound("no such purchase", field=name) from None


def download_filename(title: str, file_type: str | None) -> str:
    """An ASCII file name from the title, with the extension of the content type."""
    ascii_title = unicodedata.normalize("NFKD", title).encode("ascii", "ignore").decode()
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", ascii_title).strip("-._")[:80] or "datapod"
    return stem + EXTENSIONS.get((file_type or "").split(";")[0].strip(), ".bin")


# --- REST ------------------------------------------------------------------------------------------

@routes.post("/api/v1/purchases")
@endpoint(body=START_SCHEMA, auth="user")
async def handle_start_purchase(request: web.Request, identity: Identity, body: dict) -> web.Response:
    """Start buying a DataPod with a payment digest; progress follows on user:<id>."""
    purchase = await start_purchase(request.app, identity.user_id, uuid.UUID(body["datapod_id"]),
                                    body["payment_tx_digest"])
    return ok_response(purchase, status=202)


@routes.get("/api/v1/purchases")
@endpoint(auth="user")
async def handle_list_purchases(request: web.Request, identity: Identity) -> web.Response:
    """The caller's purchases (?limit, ?cursor, ?status, ?datapod_id)."""
    return ok_response(await list_purchases(request.app, identity.user_id, query_payload(request, LIST_VALIDATOR)))


@routes.get("/api/v1/purchases/{purchase_id}")
@endpoint(auth="user")
async def handle_get_purchase(request: web.Request, identity: Identity) -> web.Response:
    """One of the caller's purchases."""
    async with request.app[POOL].acquire() as conn:
        return ok_response((await own_purchase(conn, identity, _parse_id(request))).to_public())


@routes.post("/api/v1/purchases/{purchase_id}/confirm")
@endpoint(auth="user")
async def handle_confirm(request: web.Request, identity: Identity) -> web.Response:
    """The buyer confirms the download; the escrow goes to the seller."""
    return ok_response(await confirm_download(request.app, identity, _parse_id(request)))


async def _delivery_material(request: web.Request, identity: Identity) -> tuple[queries.Purchase, queries.PodForSale]:
    async with request.app[POOL].acquire() as conn:
        purchase = await own_purchase(conn, identity, _parse_id(request), completed=True)
        if purchase.buyer_id != identity.user_id:
            raise Forbidden("only the buyer downloads a purchase", field="purchase_id")
        pod = await queries.get_pod(conn, purchase.datapod_id)
    if pod is None:
        raise NotFound("the DataPod no longer exists", field="purchase_id")
    return purchase, pod


@routes.get("/api/v1/purchases/{purchase_id}/download")
@endpoint(auth="user")
async def handle_download(request: web.Request, identity: Identity) -> web.StreamResponse:
    """The decrypted dataset, checked (GCM tag and data_hash) before the first byte is sent."""
    purchase, pod = await _delivery_material(request, identity)
    key = unwrap_key(request.app[MASTER_KEY], pod.wrapped_key, str(pod.id).encode())
    blobs, nonce, aad = request.app[BLOBS], bytes.fromhex(pod.encryption_iv), str(pod.id).encode()

    def stream():
        return blobs.stream(pod.walrus_blob_id)

    try:
        _, size = await delivery.verify_blob(stream, key, nonce, aad, pod.data_hash)
    except KeyError:
        raise Unavailable("the dataset's blob is not available right now") from None
    except delivery.IntegrityError as exc:
        log.error("download_integrity_failed", purchase_id=str(purchase.id), datapod_id=str(pod.id), error=str(exc))
        raise IntegrityFailed("the stored dataset failed its integrity check; it was not served") from None
    async with request.app[POOL].acquire() as conn:
        await queries.log_download(conn, purchase)
    filename = download_filename(pod.title, pod.file_type)
    response = web.StreamResponse(headers={
        "Content-Type": pod.file_type or "application/octet-stream",
        "Content-Disposition": f'attachment; filename="{filename}"',
        "X-Content-SHA256": pod.data_hash or "", "Cache-Control": "no-store"})
    response.content_length = size
    await response.prepare(request)
    try:
        await delivery.decrypt_to(stream, key, nonce, aad, pod.data_hash, response.write)
    except (delivery.IntegrityError, KeyError, HubError) as exc:
        # Headers are out: the only honest signal left is an incomplete body (Content-Length).
        log.error("download_aborted", purchase_id=str(purchase.id), error=str(exc))
        if request.transport is not None:
            request.transport.close()
        return response
    await response.write_eof()
    log.info("purchase_downloaded", purchase_id=str(purchase.id), bytes=size)
    return response


@routes.get("/api/v1/purchases/{purchase_id}/blob")
@endpoint(auth="user")
async def handle_blob(request: web.Request, identity: Identity) -> web.StreamResponse:
    """The encrypted blob as stored, for client-side decryption with the key envelope."""
    purchase, pod = await _delivery_material(request, identity)
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream", "Cache-Control": "no-store",
                                           "Content-Disposition": f'attachment; filename="{pod.walrus_blob_id}.bin"'})
    started = False
    try:
        async for chunk in request.app[BLOBS].stream(pod.walrus_blob_id):
            if not started:
                await response.prepare(request)
                started = True
            await response.write(chunk)
    except KeyError:
        raise Unavailable("the dataset's blob is not available right now") from None
    if not started:
        await response.prepare(request)
    await response.write_eof()
    return response


@routes.get("/api/v1/purchases/{purchase_id}/key")
@endpoint(auth="user")
async def handle_key(request: web.Request, identity: Identity) -> web.Response:
    """The dataset key sealed to the caller's registered X25519 public key (docs/decrypt.md)."""
    purchase, pod = await _delivery_material(request, identity)
    async with request.app[POOL].acquire() as conn:
        public_key = await queries.get_x25519_key(conn, identity.user_id)
    if public_key is None:
        raise Conflict("register an X25519 public key first (PUT /api/v1/me/x25519-key)", field="x25519_public_key")
    public_key = bytes(public_key)
    if delivery.is_envelope(purchase.decryption_key):
        stored = jsonutil.loads(purchase.decryption_key)  # type: ignore[arg-type]
        if delivery.unb64(stored["recipient_public_key"]) == public_key:
            return ok_response(stored)
    # Registered (or changed) after the purchase: seal for the key registered now.
    dataset_key = unwrap_key(request.app[MASTER_KEY], pod.wrapped_key, str(pod.id).encode())
    return ok_response(delivery.seal_for_buyer(
        dataset_key, public_key, purchase_id=purchase.id, datapod_id=pod.id, dataset_nonce_hex=pod.encryption_iv,
        blob_id=pod.walrus_blob_id, data_hash=pod.data_hash))


@routes.post("/api/v1/purchases/{purchase_id}/review")
@endpoint(body=REVIEW_SCHEMA, auth="user")
async def handle_review(request: web.Request, identity: Identity, body: dict) -> web.Response:
    """Review a completed purchase (once); the rating triggers update the pod and seller averages."""
    async with request.app[POOL].acquire() as conn, conn.transaction():
        purchase = await own_purchase(conn, identity, _parse_id(request), completed=True)
        if purchase.buyer_id != identity.user_id:
            raise Forbidden("only the buyer reviews a purchase", field="purchase_id")
        try:
            async with conn.transaction():
                review = await queries.add_review(conn, purchase, body["rating"], body.get("comment") or None)
        except asyncpg.UniqueViolationError:
            raise Conflict("this purchase is already reviewed", field="purchase_id") from None
        average, count = await queries.datapod_rating(conn, purchase.datapod_id)
        event = {"datapod_id": str(purchase.datapod_id), "rating": review.rating, "average_rating": average,
                 "review_count": count}
        await marketplace.enqueue_datapod_event(conn, purchase.datapod_id, None, marketplace.REVIEW_ADDED, event)
    return ok_response({**review.to_public(), "average_rating": average}, status=201)


@routes.put("/api/v1/me/x25519-key")
@endpoint(body=X25519_SCHEMA, auth="user")
async def handle_set_x25519_key(request: web.Request, identity: Identity, body: dict) -> web.Response:
    """Register the caller's X25519 public key (32 bytes, base64url) for sealed dataset keys."""
    try:
        raw = delivery.parse_public_key(body["public_key"])
    except ValueError as exc:
        raise InvalidPayload(str(exc), field="public_key") from None
    async with request.app[POOL].acquire() as conn:
        await queries.set_x25519_key(conn, identity.user_id, raw)
    return ok_response({"public_key": delivery.b64(raw)})


@routes.delete("/api/v1/me/x25519-key")
@endpoint(auth="user")
async def handle_delete_x25519_key(request: web.Request, identity: Identity) -> web.Response:
    """Forget the caller's X25519 public key (downloads are then decrypted by the server)."""
    async with request.app[POOL].acquire() as conn:
        await queries.set_x25519_key(conn, identity.user_id, None)
    return ok_response({"public_key": None})


@routes.post("/api/v1/admin/purchases/{purchase_id}/refund")
@endpoint(body=REFUND_SCHEMA, auth="admin")
async def handle_admin_refund(request: web.Request, identity: Identity, body: dict) -> web.Response:
    """Refund a purchase whose escrow still holds the payment (exactly once)."""
    purchase_id = _parse_id(request)
    async with request.app[POOL].acquire() as conn, conn.transaction():
        if await queries.get_purchase(conn, purchase_id) is None:
            raise NotFound("no such purchase", field="purchase_id")
        refunded = await refund_purchase(conn, purchase_id, body.get("reason") or "refunded_by_admin")
        if refunded is None:
            raise Conflict("the escrow is not holding this payment (already released or refunded)",
                           field="purchase_id")
    log.info("purchase_refunded", purchase_id=str(purchase_id), admin=str(identity.user_id))
    return ok_response({"purchase_id": str(purchase_id), "status": "refunded", "escrow_status": refunded.status})


# --- Socket.IO -------------------------------------------------------------------------------------

class PurchasesNamespace(HubNamespace):
    """Purchases and their live progress (a signed-in user only)."""

    name = "/purchases"
    allow_anonymous = False
    channels = (ChannelRule("user:{user_id}", own_user),)

    @command(START_SCHEMA)
    async def on_start_purchase(self, ctx: Ctx, payload: dict) -> dict:
        """Start a purchase; subscribe to user:<id> for purchase_progressed."""
        return await start_purchase(self.app, ctx.user_id, uuid.UUID(payload["datapod_id"]),
                                    payload["payment_tx_digest"])

    @command(LIST_SCHEMA)
    async def on_list_purchases(self, ctx: Ctx, payload: dict) -> dict:
        """A page of the caller's purchases."""
        return await list_purchases(self.app, ctx.user_id, payload or {})

    @command(PURCHASE_ID_SCHEMA)
    async def on_get_purchase(self, ctx: Ctx, payload: dict) -> dict:
        """One of the caller's purchases."""
        async with self.app[POOL].acquire() as conn:
            return (await own_purchase(conn, ctx.identity, uuid.UUID(payload["purchase_id"]))).to_public()  # type: ignore[arg-type]

    @command(PURCHASE_ID_SCHEMA)
    async def on_confirm_download(self, ctx: Ctx, payload: dict) -> dict:
        """Confirm delivery: the escrow is released to the seller."""
        return await confirm_download(self.app, ctx.identity, uuid.UUID(payload["purchase_id"]))  # type: ignore[arg-type]
