"""Marketplace: DataPod upload, publishing, search and analytics (REST), and the /marketplace namespace.

Live events (`datapod_published`, `datapod_updated`, `datapod_unpublished`) go on `market`,
`market:category:<category>` and `datapod:<id>` through the outbox, in the same transaction as
the change they announce, so a committed change is always announced.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import uuid
from decimal import Decimal, InvalidOperation
from typing import Any, Mapping

import asyncpg
import structlog
from aiohttp import web

from db import datapods as datapod_queries
from db.pool import POOL
from server.adapters.blobs import BLOBS
from server.core import jsonutil
from server.core.crypto import MASTER_KEY
from server.core.errors import Forbidden, InvalidPayload, NotFound, PayloadTooLarge
from server.core.identity import Identity
from server.core.settings import SETTINGS
from server.edge.namespace import Ctx, HubNamespace, command
from server.edge.rest import FORM_OVERHEAD_BYTES, endpoint, form_parts, ok_response, optional_identity, query_payload
from server.edge.schemas import UUID, compile_schema, obj, string, validate
from server.realtime.hub import ChannelRule
from server.services.datasets import CHUNK_BYTES, DatasetSpool, detect_format, seal, upload_dir
from server.services.kyc import require_verified
from server.services.marketplace import DATAPOD_PUBLISHED, DATAPOD_UNPUBLISHED, DATAPOD_UPDATED, enqueue_datapod_event

log = structlog.get_logger(__name__)
routes = web.RouteTableDef()

MAX_PAGE = 100
DEFAULT_PAGE = 20
MAX_TAGS = 20

# Categories name channels (`market:category:<c>`), so they keep to the channel alphabet.
CATEGORY = string(1, 50, pattern="^[A-Za-z0-9_.-]+$")
PRICE_TEXT = string(1, 32, pattern=r"^\d{1,11}(\.\d{1,9})?$")  # NUMERIC(20,9)
PRICE = {"anyOf": [PRICE_TEXT, {"type": "number", "minimum": 0, "maximum": 99_999_999_999}]}
TAG = string(1, 40, pattern="^[^,\\s][^,]*$")
UPLOAD_SCHEMA = obj({"title": string(1, 255), "description": string(0, 10_000), "category": CATEGORY,
                     "price_sui": PRICE_TEXT,
                     "tags": {"type": "array", "items": TAG, "maxItems": MAX_TAGS, "uniqueItems": True}},
                    required=("title", "category", "price_sui"))
UPDATE_SCHEMA = obj({"title": string(1, 255), "description": string(0, 10_000), "price_sui": PRICE},
                    minProperties=1)
SORTS = ("newest", "price", "rating", "sales")
DEFAULT_DESCENDING = {"newest": True, "price": False, "rating": True, "sales": True}
SEARCH_SCHEMA = obj({"category": CATEGORY, "min_price": PRICE, "max_price": PRICE, "q": string(1, 200),
                     "sort": {"enum": list(SORTS)}, "order": {"enum": ["asc", "desc"]},
                     "cursor": string(1, 512), "limit": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE}})
PAGE_SCHEMA = obj({"cursor": string(1, 512), "limit": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE}})
GET_SCHEMA = obj({"datapod_id": UUID}, required=("datapod_id",))
_UPLOAD = compile_schema(UPLOAD_SCHEMA)
_SEARCH = compile_schema(SEARCH_SCHEMA)
_PAGE = compile_schema(PAGE_SCHEMA)


# --- helpers ----------------------------------------------------------------------------------


def _price(value: Any, field: str) -> Decimal:
    try:
        price = Decimal(str(value))
    except InvalidOperation:
        raise InvalidPayload("not a price", field=field) from None
    if not price.is_finite() or price < 0 or price.as_tuple().exponent < -9:  # type: ignore[operator]
        raise InvalidPayload("a price is a non-negative amount with at most 9 decimals", field=field)
    return price


def _datapod_id(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise NotFound("no such DataPod", field="datapod_id") from None


def _visible(pod: datapod_queries.DatapodSummary, identity: Identity | None) -> bool:
    return pod.published or (identity is not None and pod.seller_id == identity.user_id)


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


def search_filter(payload: Mapping[str, Any], *, seller_id: uuid.UUID | None = None) -> datapod_queries.SearchFilter:
    """A validated search payload (REST query or socket command) as a query filter."""
    sort = payload.get("sort", "newest")
    descending = DEFAULT_DESCENDING[sort] if "order" not in payload else payload["order"] == "desc"
    min_price = _price(payload["min_price"], "min_price") if "min_price" in payload else None
    max_price = _price(payload["max_price"], "max_price") if "max_price" in payload else None
    if min_price is not None and max_price is not None and min_price > max_price:
        raise InvalidPayload("min_price is above max_price", field="min_price")
    after = _decode_cursor(payload["cursor"], sort, descending) if "cursor" in payload else None
    return datapod_queries.SearchFilter(
        category=payload["category"].lower() if "category" in payload else None, min_price=min_price, max_price=max_price, q=payload.get("q"),
        seller_id=seller_id, published_only=seller_id is None, sort=sort, descending=descending, after=after,
        limit=_page_size(payload) + 1)


async def run_search(conn: asyncpg.Connection, search: datapod_queries.SearchFilter) -> dict[str, Any]:
    """One page of results and the cursor of the next page (null on the last page)."""
    found = await datapod_queries.search_datapods(conn, search)
    page = found[:search.limit - 1]
    next_cursor = None
    if len(found) >= search.limit:
        last = page[-1]
        value = getattr(last, datapod_queries.SORT_FIELDS[search.sort])
        next_cursor = _encode_cursor(search.sort, search.descending, value, last.id)
    return {"items": [pod.to_public() for pod in page], "next_cursor": next_cursor}




async def get_visible_datapod(conn: asyncpg.Connection, datapod_id: uuid.UUID,
                              identity: Identity | None) -> datapod_queries.Datapod:
    """A pod the caller may see (published, or their own); NotFound otherwise."""
    pod = await datapod_queries.get_datapod(conn, datapod_id)
    if pod is None or not _visible(pod, identity):
        raise NotFound("no such DataPod", field="datapod_id")
    return pod


async def _lock_own(conn: asyncpg.Connection, datapod_id: uuid.UUID,
                    identity: Identity) -> datapod_queries.DatapodAccess:
    access = await datapod_queries.lock_datapod(conn, datapod_id)
    mine = access is not None and access.seller_id == identity.user_id
    if access is None or (not access.published and not mine):
        raise NotFound("no such DataPod", field="datapod_id")  # drafts stay invisible to others
    if not mine:
        raise Forbidden("only the seller may change this DataPod")
    return access


# --- upload -----------------------------------------------------------------------------------


async def _read_upload(request: web.Request, pod_id: uuid.UUID) -> tuple[dict[str, Any], DatasetSpool, str]:
    """Stream the multipart body: the file into an encrypted spool, the other parts as metadata."""
    settings = request.app[SETTINGS]
    fields: dict[str, Any] = {}
    tags: list[str] = []
    spool: DatasetSpool | None = None
    fmt = ""
    try:
        async for name, part in form_parts(request, UPLOAD_SCHEMA["properties"],
                                           "a 'file' part and the metadata fields"):
            if name == "file":
                if spool is not None:
                    raise InvalidPayload("send one file", field="file")
                fmt = detect_format(part.filename, part.headers.get("Content-Type"))
                spool = DatasetSpool(upload_dir(settings.data_dir), pod_id, settings.max_upload_bytes)
                # read_chunk is not bounded by client_max_size (part.read() is): our own limit applies.
                while chunk := await part.read_chunk(CHUNK_BYTES):
                    await asyncio.to_thread(spool.write, chunk)
                await asyncio.to_thread(spool.finish)
            else:
                value = await part.text()  # small fields: bounded by MAX_PAYLOAD_BYTES
                if name == "tags":
                    tags.extend(tag.strip() for tag in value.split(",") if tag.strip())
                elif name in fields:
                    raise InvalidPayload(f"'{name}' is given twice", field=name)
                else:
                    fields[name] = value.strip() if name != "description" else value
        if spool is None:
            raise InvalidPayload("'file' is required", field="file")
    except BaseException:
        if spool is not None:
            spool.discard()
        raise
    if tags:
        fields["tags"] = list(dict.fromkeys(tags))
    return fields, spool, fmt


@routes.post("/api/v1/datapods")
@endpoint(auth="user")
async def handle_upload_datapod(request: web.Request, identity: Identity) -> web.Response:
    """Upload a dataset (multipart: file + title, description, category, price_sui, tags) as a draft DataPod."""
    limit = request.app[SETTINGS].max_upload_bytes
    if request.content_length is not None and request.content_length > limit + FORM_OVERHEAD_BYTES:
        raise PayloadTooLarge(f"the file exceeds the upload limit of {limit} bytes", field="file")
    pod_id = uuid.uuid4()
    fields, spool, fmt = await _read_upload(request, pod_id)
    try:
        metadata = validate(_UPLOAD, fields)  # before anything is stored
        sealed = await seal(spool, fmt, request.app[BLOBS], request.app[MASTER_KEY])
    finally:
        spool.discard()
    async with request.app[POOL].acquire() as conn, conn.transaction():
        pod = await datapod_queries.insert_datapod(
            conn, sealed, seller_id=identity.user_id, title=metadata["title"],
            description=metadata.get("description") or None, category=metadata["category"].lower(),
            price_sui=_price(metadata["price_sui"], "price_sui"), tags=metadata.get("tags", []))
    log.info("datapod_uploaded", datapod_id=str(pod.id), seller_id=str(identity.user_id), size=sealed.file_size)
    return ok_response(pod.to_public(), status=201)


# --- publishing and updates -------------------------------------------------------------------


async def _set_published(request: web.Request, identity: Identity, published: bool) -> web.Response:
    datapod_id = _datapod_id(request.match_info["datapod_id"])
    async with request.app[POOL].acquire() as conn, conn.transaction():
        access = await _lock_own(conn, datapod_id, identity)
        if access.published == published:  # a retry: nothing changes, nothing is announced
            pod = await datapod_queries.get_datapod(conn, datapod_id)
        else:
            if published:
                await require_verified(conn, identity.user_id)  # only verified sellers offer DataPods for sale
            pod = await datapod_queries.set_published(conn, datapod_id, published)
            if published:
                data = datapod_queries.DatapodSummary.to_public(pod)
                await enqueue_datapod_event(conn, pod.id, pod.category, DATAPOD_PUBLISHED, data)
            else:
                await enqueue_datapod_event(conn, pod.id, pod.category, DATAPOD_UNPUBLISHED,
                                            {"datapod_id": str(pod.id), "category": pod.category})
    return ok_response(pod.to_public())  # type: ignore[union-attr]


@routes.post("/api/v1/datapods/{datapod_id}/publish")
@endpoint(auth="user")
async def handle_publish_datapod(request: web.Request, identity: Identity) -> web.Response:
    """Publish the caller's DataPod: it appears in searches and on `market`."""
    return await _set_published(request, identity, True)


@routes.post("/api/v1/datapods/{datapod_id}/unpublish")
@endpoint(auth="user")
async def handle_unpublish_datapod(request: web.Request, identity: Identity) -> web.Response:
    """Withdraw the caller's DataPod from the marketplace (buyers keep what they bought)."""
    return await _set_published(request, identity, False)


@routes.patch("/api/v1/datapods/{datapod_id}")
@endpoint(auth="user", body=UPDATE_SCHEMA)
async def handle_update_datapod(request: web.Request, identity: Identity, body: dict) -> web.Response:
    """Change the title, description or price of the caller's DataPod."""
    datapod_id = _datapod_id(request.match_info["datapod_id"])
    price = _price(body["price_sui"], "price_sui") if "price_sui" in body else None
    async with request.app[POOL].acquire() as conn, conn.transaction():
        access = await _lock_own(conn, datapod_id, identity)
        before = await datapod_queries.get_datapod(conn, datapod_id)
        pod = await datapod_queries.update_datapod(conn, datapod_id, title=body.get("title"),
                                                   description=body.get("description"), price_sui=price)
        changes = {field: getattr(pod, field) for field in ("title", "description", "price_sui")
                   if getattr(pod, field) != getattr(before, field)}
        if access.published and changes:  # drafts are private: nothing to announce
            await enqueue_datapod_event(conn, pod.id, pod.category, DATAPOD_UPDATED, {
                "datapod_id": str(pod.id), "changes": changes, "updated_at": pod.updated_at.isoformat()})
    return ok_response(pod.to_public())


# --- reads ------------------------------------------------------------------------------------


@routes.get("/api/v1/datapods")
async def handle_search_datapods(request: web.Request) -> web.Response:
    """Published DataPods: category, min_price/max_price, full-text q, sort, keyset cursor, limit <= 100."""
    search = search_filter(query_payload(request, _SEARCH))
    async with request.app[POOL].acquire() as conn:
        return ok_response(await run_search(conn, search))


@routes.get("/api/v1/datapods/{datapod_id}")
async def handle_get_datapod(request: web.Request) -> web.Response:
    """One DataPod: published, or the caller's own draft."""
    datapod_id = _datapod_id(request.match_info["datapod_id"])
    identity = await optional_identity(request)
    async with request.app[POOL].acquire() as conn:
        pod = await get_visible_datapod(conn, datapod_id, identity)
    return ok_response(pod.to_public())


@routes.get("/api/v1/datapods/{datapod_id}/reviews")
async def handle_datapod_reviews(request: web.Request) -> web.Response:
    """A visible DataPod's reviews, newest first, with a keyset cursor."""
    datapod_id = _datapod_id(request.match_info["datapod_id"])
    page = query_payload(request, _PAGE)
    limit = _page_size(page)
    after = None
    if "cursor" in page:
        after = _decode_cursor(page["cursor"], "newest", True)
    identity = await optional_identity(request)
    async with request.app[POOL].acquire() as conn:
        await get_visible_datapod(conn, datapod_id, identity)
        found = await datapod_queries.list_reviews(conn, datapod_id, after=after, limit=limit + 1)
    reviews = found[:limit]
    next_cursor = (_encode_cursor("newest", True, reviews[-1].created_at, reviews[-1].id)
                   if len(found) > limit else None)
    return ok_response({"items": [review.to_public() for review in reviews], "next_cursor": next_cursor})


@routes.get("/api/v1/seller/datapods")
@endpoint(auth="user")
async def handle_seller_datapods(request: web.Request, identity: Identity) -> web.Response:
    """The caller's DataPods, drafts included, with the same filters, sorts and cursor as the search."""
    search = search_filter(query_payload(request, _SEARCH), seller_id=identity.user_id)
    async with request.app[POOL].acquire() as conn:
        return ok_response(await run_search(conn, search))


@routes.get("/api/v1/seller/stats")
@endpoint(auth="user")
async def handle_seller_stats(request: web.Request, identity: Identity) -> web.Response:
    """The caller's seller analytics: pods, published pods, sales, revenue, average rating."""
    async with request.app[POOL].acquire() as conn:
        stats = await datapod_queries.seller_stats(conn, identity.user_id)
    return ok_response(stats.to_public())


# --- the namespace ----------------------------------------------------------------------------


class MarketplaceNamespace(HubNamespace):
    """Live marketplace: DataPods, sales, reviews, NFT listings (anyone may watch)."""

    name = "/marketplace"
    allow_anonymous = True
    channels = (
        ChannelRule("market"),
        ChannelRule("market:category:{category}"),
        ChannelRule("datapod:{datapod_id}", presence=True),
        ChannelRule("market:nfts"),
    )

    @command(SEARCH_SCHEMA, user=False)
    async def on_search_datapods(self, ctx: Ctx, payload: dict) -> dict:
        """Search published DataPods (the same filters and cursor as GET /api/v1/datapods)."""
        search = search_filter(payload)
        async with self.app[POOL].acquire() as conn:
            return await run_search(conn, search)

    @command(GET_SCHEMA, user=False)
    async def on_get_datapod(self, ctx: Ctx, payload: dict) -> dict:
        """One DataPod: published, or the caller's own draft."""
        async with self.app[POOL].acquire() as conn:
            pod = await get_visible_datapod(conn, uuid.UUID(payload["datapod_id"]), ctx.identity)
        return pod.to_public()
