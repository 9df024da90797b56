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
import datetime as dt
import hashlib
import re
import secrets
import time
import unicodedata
import uuid
from decimal import Decimal
from typing import Any, AsyncIterator, Callable

import asyncpg
import jwt
import structlog
from aiohttp import web
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from db import auth as auth_queries
from db import escrow as escrow_queries
from db import outbox
from db import purchases as queries
from db.pool import POOL
from server.adapters.blobs import BLOBS, BlobStore
from server.adapters.payments import PaymentClaim, Verdict
from server.core import jsonutil
from server.core.crypto import MASTER_KEY, unwrap_key
from server.core.cursors import decode_time_cursor, encode_time_cursor
from server.core.errors import (
    Conflict,
    ErrorCode,
    Forbidden,
    HubError,
    InvalidPayload,
    NotFound,
    Unauthorized,
    Unavailable,
)
from server.core.identity import Identity
from server.core.protocol import DEFAULT_PAGE
from server.core.settings import SETTINGS
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
        # Shared-locked until the purchase row exists, so a concurrent delete or new version either
        # waits for it (and then sees it) or wins first (and the purchase sees the change).
        pod = await queries.get_pod(conn, datapod_id, share_lock=True)
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


def _instant(params: dict, name: str) -> dt.datetime | None:
    """A `from`/`to` filter: an ISO 8601 date or date-time (a bare date is midnight UTC, so is a naive time)."""
    raw = params.get(name)
    if not raw:
        return None
    try:
        at = dt.datetime.fromisoformat(raw)
    except ValueError:
        raise InvalidPayload(f"{name} is not an ISO 8601 date or date-time", field=name) from None
    return at if at.tzinfo is not None else at.replace(tzinfo=dt.timezone.utc)


async def list_purchases(app: web.Application, buyer_id: uuid.UUID, params: dict) -> dict:
    """A page of the buyer's purchases, newest first, with a keyset cursor (filters: status, DataPod,
    category, created in [from, to))."""
    limit = params.get("limit", DEFAULT_PAGE)
    before = decode_time_cursor(params["cursor"]) if params.get("cursor") else None
    since, until = _instant(params, "from"), _instant(params, "to")
    async with app[POOL].acquire() as conn:
        found = await queries.list_purchases(
            conn, buyer_id, limit=limit + 1, before=before, status=params.get("status"),
            datapod_id=uuid.UUID(params["datapod_id"]) if params.get("datapod_id") else None,
            category=params.get("category"), since=since, until=until)
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


async def update_review(app: web.Application, identity: Identity, purchase_id: uuid.UUID,
                        changes: dict[str, Any]) -> dict:
    """The buyer edits their review's rating and/or comment; the pod's viewers hear the new average."""
    async with app[POOL].acquire() as conn, conn.transaction():
        purchase = await _bought_purchase(conn, identity, purchase_id, "reviews")
        before = await queries.get_review(conn, purchase.id)
        if before is None:
            raise NotFound("this purchase has no review yet", field="purchase_id")
        review = await queries.update_review(conn, purchase.id, rating=changes.get("rating"),
                                             comment=changes.get("comment") or None,
                                             set_comment="comment" in changes)
        if review is None:  # deleted by a concurrent request since it was read
            raise NotFound("this purchase has no review", field="purchase_id")
        average, count = await queries.datapod_rating(conn, purchase.datapod_id)
        event = {"datapod_id": str(purchase.datapod_id), "rating": review.rating, "previous_rating": before.rating,
                 "average_rating": average, "review_count": count}
        await marketplace.enqueue_datapod_event(conn, purchase.datapod_id, None, marketplace.REVIEW_UPDATED, event)
    return {**review.to_public(), "average_rating": average}


async def delete_review(app: web.Application, identity: Identity, purchase_id: uuid.UUID) -> dict:
    """The buyer deletes their review (whatever the purchase's status); the pod's viewers hear the new average."""
    async with app[POOL].acquire() as conn, conn.transaction():
        purchase = await _own_purchase(conn, identity, purchase_id)
        if purchase.buyer_id != identity.user_id:
            raise Forbidden("only the buyer deletes a purchase's review", field="purchase_id")
        removed = await queries.delete_review(conn, purchase.id)
        if removed is None:
            raise NotFound("this purchase has no review", field="purchase_id")
        average, count = await queries.datapod_rating(conn, purchase.datapod_id)
        event = {"datapod_id": str(purchase.datapod_id), "rating": removed.rating, "average_rating": average,
                 "review_count": count}
        await marketplace.enqueue_datapod_event(conn, purchase.datapod_id, None, marketplace.REVIEW_REMOVED, event)
    return {"purchase_id": str(purchase.id), "datapod_id": str(purchase.datapod_id), "deleted": True,
            "average_rating": average, "review_count": count}


# --- delivery ------------------------------------------------------------------------------------

def download_filename(title: str, file_type: str | None) -> str:
    """An ASCII file name from the title, with the extension of the content type."""
    ascii_title = unicodedata.normalize("NFKD", title).encode("ascii", "ignore").decode()
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", ascii_title).strip("-._")[:80] or "datapod"
    return stem + EXTENSIONS.get((file_type or "").split(";")[0].strip(), ".bin")


@dataclasses.dataclass(frozen=True, slots=True)
class Download:
    """A purchased dataset whose blob passed its integrity check, ready to be decrypted to the buyer."""

    purchase_id: uuid.UUID | None  # None: the seller's own dataset (dataset_query.py)
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
        """Decrypt the whole file into `write` (pass two); False, logged, when the blob failed part way."""
        return await self.write_range(write, 0, self.size - 1)

    async def write_range(self, write: Callable[[bytes], Any], start: int, end: int) -> bool:
        """Decrypt bytes start..end (inclusive) into `write`; False, logged, when the blob failed part way.

        GCM's counter mode could seek, but the blob store streams from the start, so the stream is
        decrypted from byte 0 and the bytes before `start` are dropped (CPU, no memory). A range that
        ends before the last byte stops early: pass one has already checked the tag over the whole blob.
        """
        position = 0

        async def sink(plain: bytes) -> None:
            nonlocal position
            low, high = max(start - position, 0), min(end + 1 - position, len(plain))
            position += len(plain)
            if low < high:
                await write(plain[low:high])
            if position > end and end < self.size - 1:
                raise _RangeServed

        try:
            await delivery.decrypt_to(self.stream, self.key, self.nonce, self.aad, self.expected_hash, sink)
        except _RangeServed:
            pass
        except (delivery.IntegrityError, KeyError, HubError) as exc:
            log.error("download_aborted", purchase_id=str(self.purchase_id), error=str(exc))
            return False
        log.info("purchase_downloaded", purchase_id=str(self.purchase_id), bytes=end - start + 1, start=start)
        return True


class _RangeServed(Exception):
    """The requested range is written: stop decrypting."""


async def open_download(app: web.Application, identity: Identity, purchase_id: uuid.UUID) -> Download:
    """The buyer's dataset checked (GCM tag and data_hash) before any byte is released; logs the download."""
    async with app[POOL].acquire() as conn:
        purchase, pod = await _delivery_material(conn, identity, purchase_id)
    download = await _verified_download(app, purchase, pod)
    async with app[POOL].acquire() as conn:
        await queries.log_download(conn, purchase)
    return download


async def _verified_download(app: web.Application, purchase: queries.Purchase,
                             pod: queries.PodForSale) -> Download:
    """The purchase's dataset after pass one (GCM tag and data_hash) succeeded; nothing is logged."""
    return await verified_dataset(app, pod, purchase.id)


async def verified_dataset(app: web.Application, pod: queries.PodForSale,
                           purchase_id: uuid.UUID | None = None) -> Download:
    """A pod's dataset after pass one succeeded: a purchase's, or (purchase_id None) its seller's own."""
    key = unwrap_key(app[MASTER_KEY], pod.wrapped_key, str(pod.id).encode())
    blobs, nonce, aad = app[BLOBS], bytes.fromhex(pod.encryption_iv), str(pod.id).encode()

    def stream() -> AsyncIterator[bytes]:
        return blobs.stream(pod.walrus_blob_id)

    try:
        digest, size = await delivery.verify_blob(stream, key, nonce, aad, pod.data_hash)
    except KeyError:
        raise Unavailable("the dataset's blob is not available right now") from None
    except delivery.IntegrityError as exc:
        log.error("download_integrity_failed", purchase_id=str(purchase_id), datapod_id=str(pod.id), error=str(exc))
        raise IntegrityFailed("the stored dataset failed its integrity check; it was not served") from None
    return Download(purchase_id=purchase_id, filename=download_filename(pod.title, pod.file_type),
                    content_type=pod.file_type or "application/octet-stream", data_hash=pod.data_hash or digest,
                    size=size, stream=stream, key=key, nonce=nonce, aad=aad, expected_hash=pod.data_hash)


# --- signed download links -----------------------------------------------------------------------
#
# A link is a JWT (HS256) under its own key, derived by HKDF from MASTER_KEY for this one purpose,
# with its own audience and type: an access token (signed with JWT_SECRET, no audience) never
# passes as a link, and a link never passes as an access token. It names the buyer, the session
# that made it and the purchase; each use re-checks all three against the database, so a refund,
# a sign-out or a suspension ends it. It is a bearer link: whoever holds the URL gets that one
# purchase's file, nothing else, until it expires.

LINK_AUDIENCE = "sourcenet-hub:download"
LINK_TYPE = "download_link"
LINK_KEY_INFO = b"sourcenet-hub download-link signing key v1"
LINK_PATH = "/api/v1/downloads/"
MAX_LINK_TOKEN = 1000  # a link's token is ~400 characters; anything much longer is refused unread
_RANGE = re.compile(r"bytes=(\d{0,19})-(\d{0,19})")


def _link_key(master_key: bytes) -> bytes:
    """The links' signing key: HKDF-SHA256 of the current MASTER_KEY (rotating the master key ends old links)."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=LINK_KEY_INFO).derive(bytes(master_key))


async def create_download_link(app: web.Application, identity: Identity, purchase_id: uuid.UUID) -> dict[str, Any]:
    """A URL that downloads the buyer's completed purchase without a header, for DOWNLOAD_LINK_TTL seconds."""
    async with app[POOL].acquire() as conn:
        purchase, _ = await _delivery_material(conn, identity, purchase_id)
    issued = time.time()
    expires = int(issued) + app[SETTINGS].download_link_ttl
    # iat keeps milliseconds: the one-log-row-per-link rule compares it with download_logs times.
    claims = {"typ": LINK_TYPE, "aud": LINK_AUDIENCE, "sub": str(identity.user_id), "sid": identity.session_id,
              "pid": str(purchase.id), "jti": secrets.token_urlsafe(12), "iat": round(issued, 3), "exp": expires}
    token = jwt.encode(claims, _link_key(app[MASTER_KEY]), algorithm="HS256")
    log.info("download_link_created", purchase_id=str(purchase.id), expires=expires)
    return {"url": LINK_PATH + token, "purchase_id": str(purchase.id),
            "expires_at": dt.datetime.fromtimestamp(expires, dt.timezone.utc).isoformat()}


def _link_claims(app: web.Application, token: str) -> dict[str, Any]:
    """The verified claims of a link's token; Unauthorized for anything that is not a live link of ours."""
    if not token or len(token) > MAX_LINK_TOKEN:
        raise Unauthorized("not a download link")
    try:
        claims = jwt.decode(token, _link_key(app[MASTER_KEY]), algorithms=["HS256"], audience=LINK_AUDIENCE,
                            options={"require": ["typ", "aud", "sub", "sid", "pid", "iat", "exp"]})
        if claims["typ"] != LINK_TYPE:
            raise jwt.InvalidTokenError("not a download link")
        claims["sub"], claims["pid"] = uuid.UUID(claims["sub"]), uuid.UUID(claims["pid"])
        claims["sid"], claims["iat"] = int(claims["sid"]), float(claims["iat"])
    except jwt.ExpiredSignatureError:
        raise Unauthorized("the download link has expired; ask for a new one") from None
    except (jwt.InvalidTokenError, ValueError, TypeError, OverflowError):
        raise Unauthorized("not a valid download link") from None
    return claims


@dataclasses.dataclass(frozen=True, slots=True)
class ByteRange:
    """The bytes a response carries: first and last (inclusive), and whether it answers a Range (206)."""

    start: int
    end: int
    partial: bool

    def content_range(self, size: int) -> str:
        """The Content-Range header of a 206."""
        return f"bytes {self.start}-{self.end}/{size}"


class RangeNotSatisfiable(HubError):
    """The Range asks for bytes the file does not have (HTTP 416, with `Content-Range: bytes */<size>`)."""

    code = ErrorCode.INVALID_PAYLOAD


def byte_range(header: str | None, if_range: str | None, etag: str, size: int) -> ByteRange:
    """The range to serve for a Range header (RFC 9110): one range, or the whole file.

    The whole file is served (200) without a Range, when If-Range names another version, and for
    what this server does not do: several ranges, another unit, or a malformed header (which the RFC
    lets a server ignore). A single range that starts past the end is RangeNotSatisfiable (416).
    """
    whole = ByteRange(0, size - 1, False)
    if header is None or (if_range is not None and if_range.strip() != etag):
        return whole
    match = _RANGE.fullmatch(header.strip()[:100])
    if match is None or match.group(1) == match.group(2) == "":
        return whole
    first, last = match.group(1), match.group(2)
    if first == "":  # the last N bytes
        if int(last) == 0 or size == 0:
            raise RangeNotSatisfiable(f"the file has {size} bytes", field="Range", size=size)
        return ByteRange(max(size - int(last), 0), size - 1, True)
    if last != "" and int(last) < int(first):
        return whole  # an invalid range: ignored, as the RFC allows
    if int(first) >= size:
        raise RangeNotSatisfiable(f"the file has {size} bytes", field="Range", size=size)
    return ByteRange(int(first), size - 1 if last == "" else min(int(last), size - 1), True)


@dataclasses.dataclass(frozen=True, slots=True)
class LinkDownload:
    """A verified dataset and the bytes of it that one request through a link gets."""

    download: Download
    range: ByteRange
    etag: str

    async def write_to(self, write: Callable[[bytes], Any]) -> bool:
        """Decrypt the served bytes into `write`; False when the blob failed part way."""
        if not self.range.partial:
            return await self.download.write_to(write)
        return await self.download.write_range(write, self.range.start, self.range.end)


async def open_link_download(app: web.Application, token: str, *, range_header: str | None = None,
                             if_range: str | None = None, head: bool = False) -> LinkDownload:
    """What a signed link serves, after re-checking it (session, buyer, completed purchase) and the blob.

    The first GET through a link that starts at byte 0 writes the download_logs row; resumed ranges,
    repeats and HEAD do not (one row per link).
    """
    claims = _link_claims(app, token)
    async with app[POOL].acquire() as conn:
        session = await auth_queries.get_session_state(conn, claims["sid"])
        if session is None or not session.active or session.user_id != claims["sub"]:
            raise Unauthorized("the session that made this download link has ended")
        buyer = Identity(user_id=claims["sub"], session_id=claims["sid"])
        purchase, pod = await _delivery_material(conn, buyer, claims["pid"])
    download = await _verified_download(app, purchase, pod)
    etag = f'"{download.data_hash}"'
    served = byte_range(range_header, if_range, etag, download.size)
    if served.start == 0 and not head:
        issued = dt.datetime.fromtimestamp(claims["iat"], dt.timezone.utc)
        async with app[POOL].acquire() as conn, conn.transaction():
            await queries.log_link_download(conn, purchase, issued)
    return LinkDownload(download, served, etag)


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

async def release_escrow(conn: asyncpg.Connection, purchase_id: uuid.UUID, reason: str,
                         fee_rate: Decimal) -> escrow_queries.Escrow | None:
    """holding -> released with the platform fee at `fee_rate`; None if it was not holding."""
    return await escrow.release(conn, purchase_id, reason, fee_rate=fee_rate)


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
            decided = await escrow_queries.release(conn, purchase_id, fee_rate=escrow.fee_rate(app[SETTINGS]),
                                                   from_statuses=(escrow_queries.DISPUTED,),
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
