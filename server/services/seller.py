"""The seller's side of the marketplace: their figures, charts and payouts, new versions of a
DataPod's dataset, and deleting a DataPod.

Figures are aggregates of the rows they summarise (db/seller.py), read for the caller's own
DataPods only. A new version seals the uploaded file under a fresh key and points the DataPod at
it; in the same transaction every earlier buyer's sealed key is resealed for the new key (so their
download decrypts the new blob) and each buyer hears `datapod_version_published` on their
`user:<buyer>` channel. A deleted DataPod leaves the market but stays as a row, so its buyers keep
their purchases and downloads; deleting is refused while money for it is still moving.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any, Mapping

import asyncpg
import structlog

from db import outbox
from db import seller as queries
from server.adapters.blobs import BlobStore
from server.core.cursors import decode_time_cursor, encode_time_cursor
from server.core.errors import Conflict, Forbidden, InvalidPayload, NotFound
from server.core.identity import Identity
from server.core.protocol import DEFAULT_PAGE
from server.realtime.hub import user_channel
from server.services import marketplace, purchases
from server.services.datasets import DatasetSpool, seal

log = structlog.get_logger(__name__)

# On the buyer's user:<id> channel: the DataPod they bought has a new dataset file.
DATAPOD_VERSION_PUBLISHED = "datapod_version_published"

BUCKETS = {"day": dt.timedelta(days=1), "week": dt.timedelta(weeks=1)}
DEFAULT_BUCKETS = 30  # a chart without `from` shows the last 30 days or weeks
MAX_BUCKETS = 366     # a chart is at most a year of days (or seven years of weeks)


# --- figures ---------------------------------------------------------------------------------------

async def figures(pool: asyncpg.Pool, seller_id: uuid.UUID) -> dict[str, Any]:
    """The seller's figures over all their DataPods."""
    async with pool.acquire() as conn:
        return (await queries.seller_figures(conn, seller_id)).to_public()


async def datapod_figures_page(pool: asyncpg.Pool, seller_id: uuid.UUID, params: Mapping[str, Any]) -> dict[str, Any]:
    """A page of the seller's DataPods (deleted ones included, marked), newest first, each with its figures."""
    limit = params.get("limit", DEFAULT_PAGE)
    after = decode_time_cursor(params["cursor"]) if params.get("cursor") else None
    async with pool.acquire() as conn:
        found = await queries.pod_figures(conn, seller_id, after=after, limit=limit + 1)
    page = found[:limit]
    return {"items": [pod.to_public() for pod in page],
            "next_cursor": encode_time_cursor(page[-1].created_at, page[-1].id) if len(found) > limit else None}


async def _own_figures(conn: asyncpg.Connection, seller_id: uuid.UUID, datapod_id: uuid.UUID) -> queries.PodFigures:
    found = await queries.pod_figures(conn, seller_id, after=None, limit=1, datapod_id=datapod_id)
    if not found:
        pod = await queries.get_pod(conn, datapod_id)
        if pod is not None and pod.published and pod.deleted_at is None:
            raise Forbidden("only the seller may read this DataPod's figures", field="datapod_id")
        raise NotFound("no such DataPod", field="datapod_id")
    return found[0]


async def datapod_figures(pool: asyncpg.Pool, seller_id: uuid.UUID, datapod_id: uuid.UUID) -> dict[str, Any]:
    """One of the seller's DataPods with its figures; another's answers forbidden (or not_found if unseen)."""
    async with pool.acquire() as conn:
        return (await _own_figures(conn, seller_id, datapod_id)).to_public()


def _parse_day(params: Mapping[str, Any], name: str) -> dt.date | None:
    if name not in params:
        return None
    try:
        return dt.date.fromisoformat(params[name])
    except ValueError:
        raise InvalidPayload(f"'{name}' is a date, YYYY-MM-DD", field=name) from None


def chart_range(params: Mapping[str, Any], today: dt.date) -> tuple[str, dt.datetime, dt.datetime]:
    """The bucket kind and the whole-bucket range [start, end) (naive UTC) a chart query asks for."""
    bucket = params.get("bucket", "day")
    step = BUCKETS[bucket]
    last = _parse_day(params, "to") or today
    first = _parse_day(params, "from") or last - step * (DEFAULT_BUCKETS - 1)
    if first > last:
        raise InvalidPayload("'from' is after 'to'", field="from")
    if bucket == "week":  # date_trunc('week') starts weeks on Monday
        first, last = first - dt.timedelta(days=first.weekday()), last - dt.timedelta(days=last.weekday())
    start = dt.datetime.combine(first, dt.time())
    end = dt.datetime.combine(last, dt.time()) + step
    if (end - start) / step > MAX_BUCKETS:
        raise InvalidPayload(f"a chart has at most {MAX_BUCKETS} buckets; narrow 'from'..'to'", field="from")
    return bucket, start, end


async def series(pool: asyncpg.Pool, seller_id: uuid.UUID, params: Mapping[str, Any]) -> dict[str, Any]:
    """The seller's figures per day or week (UTC) for charts, over all their DataPods or one."""
    bucket, start, end = chart_range(params, dt.datetime.now(dt.timezone.utc).date())
    datapod_id = uuid.UUID(params["datapod_id"]) if params.get("datapod_id") else None
    async with pool.acquire() as conn:
        if datapod_id is not None:
            await _own_figures(conn, seller_id, datapod_id)  # authorises the pod
        buckets = await queries.series(conn, seller_id, bucket=bucket, start=start, end=end, step=BUCKETS[bucket],
                                       datapod_id=datapod_id)
    return {"bucket": bucket, "from": start.date().isoformat(), "to": (end - BUCKETS[bucket]).date().isoformat(),
            "datapod_id": str(datapod_id) if datapod_id else None,
            "items": [entry.to_public() for entry in buckets]}


async def payouts(pool: asyncpg.Pool, seller_id: uuid.UUID, params: Mapping[str, Any]) -> dict[str, Any]:
    """The seller's settled payouts (newest first) with their settlement transaction hashes."""
    limit = params.get("limit", DEFAULT_PAGE)
    before = decode_time_cursor(params["cursor"]) if params.get("cursor") else None
    async with pool.acquire() as conn:
        found = await queries.payouts(conn, seller_id, before=before, limit=limit + 1)
    page = found[:limit]
    return {"items": [payout.to_public() for payout in page],
            "next_cursor": encode_time_cursor(page[-1].settled_at, page[-1].escrow_id) if len(found) > limit else None}


# --- versions --------------------------------------------------------------------------------------

def _check_own(pod: queries.OwnedPod | None, user_id: uuid.UUID) -> queries.OwnedPod:
    """The caller's live DataPod; not_found for a deleted one or another's draft, forbidden for another's."""
    if pod is None or pod.deleted_at is not None or (not pod.published and pod.seller_id != user_id):
        raise NotFound("no such DataPod", field="datapod_id")
    if pod.seller_id != user_id:
        raise Forbidden("only the seller may change this DataPod", field="datapod_id")
    return pod


async def check_version_allowed(pool: asyncpg.Pool, user_id: uuid.UUID, datapod_id: uuid.UUID) -> None:
    """Refuse a new version before its file is received: only the seller, of a live DataPod."""
    async with pool.acquire() as conn:
        _check_own(await queries.get_pod(conn, datapod_id), user_id)


async def publish_version(pool: asyncpg.Pool, blobs: BlobStore, master_key: bytes, user_id: uuid.UUID,
                          datapod_id: uuid.UUID, spool: DatasetSpool, fmt: str) -> dict[str, Any]:
    """Seal a received file as the DataPod's next version (the spool is discarded either way), reseal every
    buyer's key for it and tell them, in one transaction."""
    try:
        sealed = await seal(spool, fmt, blobs, master_key)
    finally:
        spool.discard()
    async with pool.acquire() as conn, conn.transaction():
        pod = _check_own(await queries.lock_pod(conn, datapod_id), user_id)
        if await queries.purchases_in_flight(conn, datapod_id):
            # Their keys are being sealed from the current key right now: a switch would strand them.
            raise Conflict("a purchase of this DataPod is being paid; try again in a moment", field="datapod_id")
        tags = (pod.schema or {}).get("tags", [])
        version = await queries.set_dataset(
            conn, datapod_id, blob_id=sealed.blob_id, storage_size=sealed.storage_size, key_hash=sealed.key_hash,
            iv_hex=sealed.iv_hex, wrapped_key=sealed.wrapped_key, file_type=sealed.file_type,
            file_size=sealed.file_size, data_hash=sealed.data_hash, schema={**sealed.schema, "tags": tags},
            sample=sealed.sample)
        holders = await queries.key_holders(conn, datapod_id)
        for holder in holders:
            key = await purchases.seal_key(conn, master_key, holder.purchase_id)  # reads the pod as just updated
            assert key is not None
            await queries.reseal(conn, holder.purchase_id, decryption_key=key.decryption_key,
                                 decryption_iv=key.decryption_iv, encrypted_blob_id=key.encrypted_blob_id)
            await outbox.enqueue(conn, user_channel(holder.buyer_id), DATAPOD_VERSION_PUBLISHED, {
                "purchase_id": str(holder.purchase_id), "datapod_id": str(datapod_id), "datapod_title": pod.title,
                "version": version.version, "data_hash": version.data_hash, "file_size": version.file_size,
                "file_type": version.file_type})
        if pod.published:
            await marketplace.enqueue_datapod_event(conn, datapod_id, pod.category, marketplace.DATAPOD_UPDATED, {
                "datapod_id": str(datapod_id), "changes": {
                    "version": version.version, "file_type": version.file_type, "file_size": version.file_size,
                    "data_hash": version.data_hash},
                "updated_at": version.created_at.isoformat()})
    log.info("datapod_version_published", datapod_id=str(datapod_id), version=version.version,
             buyers=len(holders), size=sealed.file_size)
    return {"datapod_id": str(datapod_id), **version.to_public(), "buyers_notified": len(holders)}


async def list_versions(pool: asyncpg.Pool, identity: Identity | None, datapod_id: uuid.UUID,
                        params: Mapping[str, Any]) -> dict[str, Any]:
    """A DataPod's version history, newest first: for anyone while it is on the market, else its seller
    and its buyers."""
    limit = params.get("limit", DEFAULT_PAGE)
    before = int(params["before"]) if params.get("before") else None
    async with pool.acquire() as conn:
        pod = await queries.get_pod(conn, datapod_id)
        if pod is None or not await _may_read_versions(conn, pod, identity):
            raise NotFound("no such DataPod", field="datapod_id")
        found = await queries.versions(conn, datapod_id, limit=limit + 1, before=before)
    page = found[:limit]
    return {"items": [version.to_public() for version in page],
            "next_before": page[-1].version if len(found) > limit else None}


async def _may_read_versions(conn: asyncpg.Connection, pod: queries.OwnedPod, identity: Identity | None) -> bool:
    if pod.published and pod.deleted_at is None:
        return True
    if identity is None:
        return False
    if pod.seller_id == identity.user_id:
        return pod.deleted_at is None
    return any(holder.buyer_id == identity.user_id for holder in await queries.key_holders(conn, pod.id))


# --- deletion --------------------------------------------------------------------------------------

async def delete_datapod(pool: asyncpg.Pool, user_id: uuid.UUID, datapod_id: uuid.UUID) -> dict[str, Any]:
    """Remove the seller's DataPod from the market for good (conflict while money for it is moving);
    buyers keep their purchases and downloads."""
    async with pool.acquire() as conn, conn.transaction():
        pod = _check_own(await queries.lock_pod(conn, datapod_id), user_id)
        moving = await queries.money_in_flight(conn, datapod_id)
        if moving:
            raise Conflict(f"{moving} purchase(s) of this DataPod are being paid or in escrow; delete it once "
                           "they are settled (unpublish it meanwhile)", field="datapod_id")
        deleted_at = await queries.soft_delete(conn, datapod_id)
        if pod.published:
            await marketplace.enqueue_datapod_event(conn, datapod_id, pod.category, marketplace.DATAPOD_UNPUBLISHED,
                                                    {"datapod_id": str(datapod_id), "category": pod.category})
    log.info("datapod_deleted", datapod_id=str(datapod_id), seller_id=str(user_id))
    return {"datapod_id": str(datapod_id), "deleted": True, "deleted_at": deleted_at.isoformat()}
