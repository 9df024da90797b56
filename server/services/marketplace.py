"""The marketplace's rules: DataPods, their channels and the events that tell browsers of changes.

A seller uploads a dataset as a draft DataPod (sealed by server/services/datasets.py), publishes
it once their KYC is Approved, changes it, and withdraws it. Live events (`datapod_published`,
`datapod_updated`, `datapod_unpublished`) go on `market`, `market:category:<category>` and
`datapod:<id>` through the outbox, in the same transaction as the change they announce, so a
committed change is always announced. Drafts are visible to their seller only.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime as dt
import uuid
from decimal import Decimal, InvalidOperation
from typing import Any, Awaitable, Callable, Mapping, TypeVar

import asyncpg
import structlog

from db import marketplace as queries
from db import outbox
from db import seller as seller_queries
from server.adapters.blobs import BlobStore
from server.core import jsonutil
from server.core.errors import Forbidden, InvalidPayload, NotFound
from server.core.identity import Identity
from server.core.protocol import DEFAULT_PAGE
from server.services.datasets import DatasetSpool, seal
from server.services.kyc import require_verified

log = structlog.get_logger(__name__)

Found = TypeVar("Found")

MARKET_CHANNEL = "market"
DATAPOD_CHANNEL = "datapod:{datapod_id}"
CATEGORY_CHANNEL = "market:category:{category}"

DATAPOD_PUBLISHED = "datapod_published"
DATAPOD_UPDATED = "datapod_updated"
DATAPOD_UNPUBLISHED = "datapod_unpublished"
DATAPOD_SOLD = "datapod_sold"
REVIEW_ADDED = "review_added"
REVIEW_UPDATED = "review_updated"
REVIEW_REMOVED = "review_removed"

# The search's sort keys, and the direction each takes when the client names none.
DEFAULT_DESCENDING = {"newest": True, "price": False, "rating": True, "sales": True}
SORTS = tuple(DEFAULT_DESCENDING)

# Column types as server/services/datasets.py infers them (the `column_type` search filter).
COLUMN_TYPES = ("integer", "number", "boolean", "string", "null", "array", "object", "mixed")
SIMILAR_DEFAULT = 6
SIMILAR_MAX = 20


def datapod_channel(datapod_id: uuid.UUID | str) -> str:
    """The channel of one DataPod's events (and of its viewers' presence)."""
    return DATAPOD_CHANNEL.format(datapod_id=datapod_id)


def datapod_channels(datapod_id: uuid.UUID | str, category: str | None = None) -> list[str]:
    """The channels that carry a DataPod's events: the market, its category, the pod itself."""
    channels = [MARKET_CHANNEL, datapod_channel(datapod_id)]
    if category:
        channels.insert(1, CATEGORY_CHANNEL.format(category=category))
    return channels


async def enqueue_datapod_event(conn: asyncpg.Connection, datapod_id: uuid.UUID, category: str | None,
                                type: str, data: dict[str, Any]) -> None:
    """Queue a DataPod event on all of its channels inside the caller's transaction."""
    for channel in datapod_channels(datapod_id, category):
        await outbox.enqueue(conn, channel, type, data)


# --- payload values ---------------------------------------------------------------------------


def parse_price(value: Any, field: str) -> Decimal:
    """A price from a payload (text or number); InvalidPayload naming `field` unless it fits NUMERIC(20,9)."""
    try:
        price = Decimal(str(value))
    except InvalidOperation:
        raise InvalidPayload("not a price", field=field) from None
    if not price.is_finite() or price < 0 or price.as_tuple().exponent < -9:  # type: ignore[operator]
        raise InvalidPayload("a price is a non-negative amount with at most 9 decimals", field=field)
    return price


def _encode_cursor(sort: str, descending: bool, value: Any, last_id: uuid.UUID) -> str:
    raw = jsonutil.dumpb([sort, descending, value.isoformat() if isinstance(value, dt.datetime) else str(value),
                          str(last_id)])
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _decode_cursor(cursor: str, sort: str, descending: bool) -> tuple[Any, uuid.UUID]:
    """The keyset position in a cursor made for the same order; InvalidPayload otherwise."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        cursor_sort, cursor_descending, value, last_id = jsonutil.loads(raw)
        if (cursor_sort, cursor_descending) != (sort, descending):
            raise InvalidPayload("the cursor belongs to another sort order", field="cursor")
        if sort == "newest":
            position: Any = dt.datetime.fromisoformat(value)
        elif sort == "sales":
            position = int(value)
        else:
            position = Decimal(value)
        return position, uuid.UUID(last_id)
    except InvalidPayload:
        raise
    except (ValueError, TypeError, InvalidOperation, binascii.Error):
        raise InvalidPayload("the cursor is not valid", field="cursor") from None


def _page_size(payload: Mapping[str, Any]) -> int:
    return payload.get("limit", DEFAULT_PAGE)


def search_filter(payload: Mapping[str, Any], *, seller_id: uuid.UUID | None = None) -> queries.SearchFilter:
    """A validated search payload (REST query or socket command) as a query filter."""
    sort = payload.get("sort", "newest")
    descending = DEFAULT_DESCENDING[sort] if "order" not in payload else payload["order"] == "desc"
    min_price = parse_price(payload["min_price"], "min_price") if "min_price" in payload else None
    max_price = parse_price(payload["max_price"], "max_price") if "max_price" in payload else None
    if min_price is not None and max_price is not None and min_price > max_price:
        raise InvalidPayload("min_price is above max_price", field="min_price")
    after = _decode_cursor(payload["cursor"], sort, descending) if "cursor" in payload else None
    return queries.SearchFilter(
        category=payload["category"].lower() if "category" in payload else None, min_price=min_price,
        max_price=max_price, q=payload.get("q"), seller_id=seller_id, published_only=seller_id is None, sort=sort,
        descending=descending, after=after, limit=_page_size(payload) + 1, column=payload.get("column"),
        column_type=payload.get("column_type"))


@dataclasses.dataclass(frozen=True, slots=True)
class ReviewPage:
    """Which reviews a page holds: at most `limit`, newest first, after the keyset position `after`."""

    limit: int
    after: tuple[dt.datetime, uuid.UUID] | None


def review_page(payload: Mapping[str, Any]) -> ReviewPage:
    """A validated page payload (`limit`, `cursor`) of reviews; InvalidPayload for a bad cursor."""
    after = _decode_cursor(payload["cursor"], "newest", True) if "cursor" in payload else None
    return ReviewPage(limit=_page_size(payload), after=after)


# --- reads ------------------------------------------------------------------------------------


def _visible(pod: queries.DatapodSummary, identity: Identity | None) -> bool:
    return pod.published or (identity is not None and pod.seller_id == identity.user_id)


async def _get_visible(conn: asyncpg.Connection, datapod_id: uuid.UUID, identity: Identity | None) -> queries.Datapod:
    pod = await queries.get_datapod(conn, datapod_id)
    if pod is None or not _visible(pod, identity):
        raise NotFound("no such DataPod", field="datapod_id")
    return pod


async def get_datapod(pool: asyncpg.Pool, datapod_id: uuid.UUID, identity: Identity | None) -> queries.Datapod:
    """A pod the caller may see (published, or their own); NotFound otherwise. Counts a view unless its seller looks."""
    async with pool.acquire() as conn:
        pod = await _get_visible(conn, datapod_id, identity)
        if identity is None or identity.user_id != pod.seller_id:
            await seller_queries.count_view(conn, datapod_id)  # the seller's "views" figure
        return pod


async def find(conn: asyncpg.Connection, query: queries.SearchFilter
               ) -> tuple[list[queries.DatapodSummary], queries.SearchFilter]:
    """A search's rows (one more than the page, when there is a next page) and the query that found
    them: full text, or titles by similarity when full text finds nothing (then `fuzzy`)."""
    return await _full_text_or_similar(conn, query, queries.search_datapods, bool)


async def _full_text_or_similar(conn: asyncpg.Connection, query: queries.SearchFilter,
                                run: Callable[[asyncpg.Connection, queries.SearchFilter], Awaitable[Found]],
                                matched: Callable[[Found], bool]) -> tuple[Found, queries.SearchFilter]:
    """`run` on full text, again on titles by similarity when full text matches nothing (see
    _similarity_instead); its result and the query it ran last."""
    found = await run(conn, query)
    if await _similarity_instead(conn, query, matched(found)):
        query = dataclasses.replace(query, fuzzy=True)
        async with conn.transaction():  # the threshold holds for this transaction only
            await queries.set_similarity_threshold(conn)
            found = await run(conn, query)
    return found, query


async def search(pool: asyncpg.Pool, payload: Mapping[str, Any], *,
                 seller_id: uuid.UUID | None = None) -> dict[str, Any]:
    """One page of a validated search (published pods, or all of `seller_id`'s) and the next page's cursor."""
    query = search_filter(payload, seller_id=seller_id)
    async with pool.acquire() as conn:
        found, query = await find(conn, query)
    page = found[:query.limit - 1]
    next_cursor = None
    if len(found) >= query.limit:
        last = page[-1]
        value = getattr(last, queries.SORT_FIELDS[query.sort])
        next_cursor = _encode_cursor(query.sort, query.descending, value, last.id)
    return {"items": [pod.to_public() for pod in page], "next_cursor": next_cursor, "fuzzy": query.fuzzy}


async def _similarity_instead(conn: asyncpg.Connection, query: queries.SearchFilter, found_any: bool) -> bool:
    """Whether `q` should match titles by trigram similarity: full text matches nothing under these filters.

    The decision ignores the cursor, so every page of one search takes the same mode and the
    cursor needs no flag; without pg_trgm the search stays full text (and finds nothing).
    """
    if query.q is None or found_any or query.fuzzy:
        return False
    if query.after is not None and await queries.search_datapods(
            conn, dataclasses.replace(query, after=None, limit=1)):
        return False  # full text does match: this page is just past its end
    return await queries.trigram_available(conn)


async def count_facets(conn: asyncpg.Connection, query: queries.SearchFilter
                       ) -> tuple[queries.Facets, queries.SearchFilter]:
    """The facets of a search's filters and the query that counted them (`fuzzy` as the search would be)."""
    return await _full_text_or_similar(conn, query, queries.search_facets, lambda facets: facets.total > 0)


async def facets(pool: asyncpg.Pool, payload: Mapping[str, Any]) -> dict[str, Any]:
    """Counts per category and price band of the published DataPods a validated search payload matches
    (estimated from a sample when they are large: `"estimated": true`, db/marketplace.py)."""
    query = search_filter(payload)
    async with pool.acquire() as conn:
        found, query = await count_facets(conn, query)
    return {**found.to_public(), "fuzzy": query.fuzzy}


async def similar(pool: asyncpg.Pool, datapod_id: uuid.UUID, identity: Identity | None,
                  limit: int = SIMILAR_DEFAULT) -> dict[str, Any]:
    """Published DataPods most like a visible one (published, or the caller's draft), best first, scored."""
    async with pool.acquire() as conn:
        await _get_visible(conn, datapod_id, identity)
        found = await queries.similar_datapods(conn, datapod_id, limit)
    return {"items": [{**pod.to_public(), "score": round(score, 4)} for pod, score in found]}


async def list_reviews(pool: asyncpg.Pool, datapod_id: uuid.UUID, identity: Identity | None,
                       page: ReviewPage) -> dict[str, Any]:
    """A visible DataPod's reviews, newest first, and the next page's cursor (null on the last page)."""
    async with pool.acquire() as conn:
        await _get_visible(conn, datapod_id, identity)
        found = await queries.list_reviews(conn, datapod_id, after=page.after, limit=page.limit + 1)
    reviews = found[:page.limit]
    next_cursor = (_encode_cursor("newest", True, reviews[-1].created_at, reviews[-1].id)
                   if len(found) > page.limit else None)
    return {"items": [review.to_public() for review in reviews], "next_cursor": next_cursor}


async def seller_stats(pool: asyncpg.Pool, seller_id: uuid.UUID) -> queries.SellerStats:
    """A seller's analytics: pods, published pods, sales, revenue, average rating."""
    async with pool.acquire() as conn:
        return await queries.seller_stats(conn, seller_id)


# --- changes ----------------------------------------------------------------------------------


async def upload_datapod(pool: asyncpg.Pool, blobs: BlobStore, master_key: bytes, seller_id: uuid.UUID,
                         spool: DatasetSpool, fmt: str, metadata: Mapping[str, Any]) -> queries.Datapod:
    """Seal a received dataset (the spool is discarded either way) and record it as the seller's draft DataPod."""
    try:
        sealed = await seal(spool, fmt, blobs, master_key)
    finally:
        spool.discard()
    async with pool.acquire() as conn, conn.transaction():
        pod = await queries.insert_datapod(
            conn, sealed, seller_id=seller_id, title=metadata["title"],
            description=metadata.get("description") or None, category=metadata["category"].lower(),
            price_sui=parse_price(metadata["price_sui"], "price_sui"), tags=metadata.get("tags", []))
    log.info("datapod_uploaded", datapod_id=str(pod.id), seller_id=str(seller_id), size=sealed.file_size)
    return pod


async def _lock_own(conn: asyncpg.Connection, datapod_id: uuid.UUID, user_id: uuid.UUID) -> queries.DatapodAccess:
    access = await queries.lock_datapod(conn, datapod_id)
    mine = access is not None and access.seller_id == user_id
    if access is None or (not access.published and not mine):
        raise NotFound("no such DataPod", field="datapod_id")  # drafts stay invisible to others
    if not mine:
        raise Forbidden("only the seller may change this DataPod")
    return access


async def set_published(pool: asyncpg.Pool, user_id: uuid.UUID, datapod_id: uuid.UUID,
                        published: bool) -> queries.Datapod:
    """Publish (verified sellers only) or withdraw the seller's DataPod, and announce the change."""
    async with pool.acquire() as conn, conn.transaction():
        access = await _lock_own(conn, datapod_id, user_id)
        if access.published == published:  # a retry: nothing changes, nothing is announced
            return await queries.get_datapod(conn, datapod_id)  # type: ignore[return-value]
        if published:
            await require_verified(conn, user_id)  # only verified sellers offer DataPods for sale
        pod = await queries.set_published(conn, datapod_id, published)
        if published:
            await enqueue_datapod_event(conn, pod.id, pod.category, DATAPOD_PUBLISHED,
                                        queries.DatapodSummary.to_public(pod))
        else:
            await enqueue_datapod_event(conn, pod.id, pod.category, DATAPOD_UNPUBLISHED,
                                        {"datapod_id": str(pod.id), "category": pod.category})
    return pod


async def update_datapod(pool: asyncpg.Pool, user_id: uuid.UUID, datapod_id: uuid.UUID,
                         changes: Mapping[str, Any]) -> queries.Datapod:
    """Change the title, description, price, category or tags of the seller's DataPod; a published pod's
    changes are announced (a new category's channel and the old one both hear it)."""
    price = parse_price(changes["price_sui"], "price_sui") if "price_sui" in changes else None
    category = changes["category"].lower() if "category" in changes else None
    tags = list(dict.fromkeys(tag.strip() for tag in changes["tags"])) if "tags" in changes else None
    async with pool.acquire() as conn, conn.transaction():
        access = await _lock_own(conn, datapod_id, user_id)
        before = await queries.get_datapod(conn, datapod_id)
        pod = await queries.update_datapod(conn, datapod_id, title=changes.get("title"),
                                           description=changes.get("description"), price_sui=price,
                                           category=category, tags=tags)
        changed = {field: getattr(pod, field) for field in ("title", "description", "price_sui", "category", "tags")
                   if getattr(pod, field) != getattr(before, field)}
        if access.published and changed:  # drafts are private: nothing to announce
            event = {"datapod_id": str(pod.id), "changes": changed, "updated_at": pod.updated_at.isoformat()}
            await enqueue_datapod_event(conn, pod.id, pod.category, DATAPOD_UPDATED, event)
            if before is not None and before.category and before.category != pod.category:
                await outbox.enqueue(conn, CATEGORY_CHANNEL.format(category=before.category), DATAPOD_UPDATED, event)
    return pod
