"""Marketplace: DataPod upload, publishing, search and analytics (REST), and the /marketplace namespace.

The rules, and the live events on `market`, `market:category:<category>` and `datapod:<id>`,
are in server/services/marketplace.py.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from aiohttp import web

from db.pool import POOL
from server.adapters.blobs import BLOBS
from server.core.crypto import MASTER_KEY
from server.core.errors import InvalidPayload, PayloadTooLarge
from server.core.identity import Identity
from server.core.settings import SETTINGS
from server.edge.namespace import Ctx, HubNamespace, command
from server.edge.rest import (
    FORM_OVERHEAD_BYTES,
    endpoint,
    form_parts,
    ok_response,
    optional_identity,
    path_uuid,
    query_payload,
)
from server.edge.schemas import PAGE_LIMIT, UUID, compile_schema, obj, string, text, update_schema, validate
from server.realtime.hub import ChannelRule
from server.services import marketplace, nfts, seller
from server.services.datasets import CHUNK_BYTES, DatasetSpool, detect_format, upload_dir

routes = web.RouteTableDef()

MAX_TAGS = 20

# Categories name channels (`market:category:<c>`), so they keep to the channel alphabet.
CATEGORY = string(1, 50, pattern="^[A-Za-z0-9_.-]+$")
PRICE_TEXT = string(1, 32, pattern=r"^\d{1,11}(\.\d{1,9})?$")  # NUMERIC(20,9)
PRICE = {"anyOf": [PRICE_TEXT, {"type": "number", "minimum": 0, "maximum": 99_999_999_999}]}
TAG = string(1, 40, pattern="^[^,\\s][^,]*$")
CURSOR = string(1, 512)
UPLOAD_SCHEMA = obj({"title": string(1, 255), "description": string(0, 10_000), "category": CATEGORY,
                     "price_sui": PRICE_TEXT,
                     "tags": {"type": "array", "items": TAG, "maxItems": MAX_TAGS, "uniqueItems": True}},
                    required=("title", "category", "price_sui"))
UPDATE_SCHEMA = update_schema({"title": string(1, 255), "description": string(0, 10_000), "price_sui": PRICE,
                               "category": CATEGORY,
                               "tags": {"type": "array", "items": TAG, "maxItems": MAX_TAGS, "uniqueItems": True}})
# The filters the search and its facets share; `column` and `column_type` describe one column together.
FILTERS = {"category": CATEGORY, "min_price": PRICE, "max_price": PRICE, "q": string(1, 200),
           "column": text(200), "column_type": {"enum": list(marketplace.COLUMN_TYPES)}}
SEARCH_SCHEMA = obj({**FILTERS, "sort": {"enum": list(marketplace.SORTS)}, "order": {"enum": ["asc", "desc"]},
                     "cursor": CURSOR, "limit": PAGE_LIMIT})
FACETS_SCHEMA = obj(FILTERS)
SIMILAR_LIMIT = {"type": "integer", "minimum": 1, "maximum": marketplace.SIMILAR_MAX}
SIMILAR_QUERY = obj({"limit": SIMILAR_LIMIT})
SIMILAR_SCHEMA = obj({"datapod_id": UUID, "limit": SIMILAR_LIMIT}, required=("datapod_id",))
PAGE_SCHEMA = obj({"cursor": CURSOR, "limit": PAGE_LIMIT})
GET_SCHEMA = obj({"datapod_id": UUID}, required=("datapod_id",))
DATAPOD_PATH = {"datapod_id": UUID}
_UPLOAD = compile_schema(UPLOAD_SCHEMA)
VERSION_SCHEMA = obj({})  # the multipart body is just the 'file' part
_VERSION = compile_schema(VERSION_SCHEMA)
_SEARCH = compile_schema(SEARCH_SCHEMA)
_FACETS = compile_schema(FACETS_SCHEMA)
_SIMILAR = compile_schema(SIMILAR_QUERY)
_PAGE = compile_schema(PAGE_SCHEMA)


def _datapod_id(request: web.Request) -> uuid.UUID:
    return path_uuid(request, "datapod_id", "no such DataPod")


# --- upload -----------------------------------------------------------------------------------


async def _read_upload(request: web.Request, pod_id: uuid.UUID, schema: dict[str, Any] = UPLOAD_SCHEMA,
                       validator: Any = _UPLOAD) -> tuple[dict[str, Any], DatasetSpool, str]:
    """Stream the multipart body: the file into an encrypted spool, the other parts as checked metadata."""
    settings = request.app[SETTINGS]
    fields: dict[str, Any] = {}
    tags: list[str] = []
    spool: DatasetSpool | None = None
    fmt = ""
    try:
        async for name, part in form_parts(request, schema["properties"], "a 'file' part and the metadata fields"):
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
        if tags:
            fields["tags"] = list(dict.fromkeys(tags))
        return validate(validator, fields), spool, fmt  # before anything is stored
    except BaseException:
        if spool is not None:
            spool.discard()
        raise


@routes.post("/api/v1/datapods")
@endpoint(auth="user", form=UPLOAD_SCHEMA)
async def handle_upload_datapod(request: web.Request, identity: Identity) -> web.Response:
    """Upload a dataset (multipart: file + title, description, category, price_sui, tags) as a draft DataPod."""
    limit = request.app[SETTINGS].max_upload_bytes
    if request.content_length is not None and request.content_length > limit + FORM_OVERHEAD_BYTES:
        raise PayloadTooLarge(f"the file exceeds the upload limit of {limit} bytes", field="file")
    metadata, spool, fmt = await _read_upload(request, uuid.uuid4())
    pod = await marketplace.upload_datapod(request.app[POOL], request.app[BLOBS], request.app[MASTER_KEY],
                                           identity.user_id, spool, fmt, metadata)
    return ok_response(pod.to_public(), status=201)


@routes.post("/api/v1/datapods/{datapod_id}/versions")
@endpoint(auth="user", path=DATAPOD_PATH, form=VERSION_SCHEMA)
async def handle_upload_version(request: web.Request, identity: Identity) -> web.Response:
    """Publish a new version of the caller's DataPod's file (multipart: file); earlier buyers get it."""
    datapod_id = _datapod_id(request)
    limit = request.app[SETTINGS].max_upload_bytes
    if request.content_length is not None and request.content_length > limit + FORM_OVERHEAD_BYTES:
        raise PayloadTooLarge(f"the file exceeds the upload limit of {limit} bytes", field="file")
    await seller.check_version_allowed(request.app[POOL], identity.user_id, datapod_id)  # before the body
    _, spool, fmt = await _read_upload(request, datapod_id, VERSION_SCHEMA, _VERSION)  # sealed with the pod's id
    version = await seller.publish_version(request.app[POOL], request.app[BLOBS], request.app[MASTER_KEY],
                                           identity.user_id, datapod_id, spool, fmt)
    return ok_response(version, status=201)


# --- publishing and updates -------------------------------------------------------------------


@routes.post("/api/v1/datapods/{datapod_id}/publish")
@endpoint(auth="user", path=DATAPOD_PATH)
async def handle_publish_datapod(request: web.Request, identity: Identity) -> web.Response:
    """Publish the caller's DataPod: it appears in searches and on `market`."""
    pod = await marketplace.set_published(request.app[POOL], identity.user_id, _datapod_id(request), True)
    return ok_response(pod.to_public())


@routes.post("/api/v1/datapods/{datapod_id}/unpublish")
@endpoint(auth="user", path=DATAPOD_PATH)
async def handle_unpublish_datapod(request: web.Request, identity: Identity) -> web.Response:
    """Withdraw the caller's DataPod from the marketplace (buyers keep what they bought)."""
    pod = await marketplace.set_published(request.app[POOL], identity.user_id, _datapod_id(request), False)
    return ok_response(pod.to_public())


@routes.patch("/api/v1/datapods/{datapod_id}")
@endpoint(auth="user", body=UPDATE_SCHEMA, path=DATAPOD_PATH)
async def handle_update_datapod(request: web.Request, identity: Identity, body: dict) -> web.Response:
    """Change the title, description, price, category or tags of the caller's DataPod."""
    pod = await marketplace.update_datapod(request.app[POOL], identity.user_id, _datapod_id(request), body)
    return ok_response(pod.to_public())


# --- reads ------------------------------------------------------------------------------------


@routes.get("/api/v1/datapods")
@endpoint(query=SEARCH_SCHEMA)
async def handle_search_datapods(request: web.Request) -> web.Response:
    """Published DataPods: category, min_price/max_price, full-text q, sort, keyset cursor, limit <= 100."""
    return ok_response(await marketplace.search(request.app[POOL], query_payload(request, _SEARCH)))


# Before /api/v1/datapods/{datapod_id}: the router tries routes in the order they are added.
@routes.get("/api/v1/datapods/facets")
@endpoint(query=FACETS_SCHEMA)
async def handle_datapod_facets(request: web.Request) -> web.Response:
    """Counts per category and price band of the published DataPods the search filters match."""
    return ok_response(await marketplace.facets(request.app[POOL], query_payload(request, _FACETS)))


@routes.get("/api/v1/datapods/{datapod_id}/similar")
@endpoint(path=DATAPOD_PATH, query=SIMILAR_QUERY)
async def handle_similar_datapods(request: web.Request) -> web.Response:
    """Published DataPods most like a visible one (category, tags, columns, words), best first."""
    datapod_id = _datapod_id(request)
    payload = query_payload(request, _SIMILAR)
    identity = await optional_identity(request)
    return ok_response(await marketplace.similar(request.app[POOL], datapod_id, identity,
                                                 payload.get("limit", marketplace.SIMILAR_DEFAULT)))


@routes.get("/api/v1/datapods/{datapod_id}")
@endpoint(path=DATAPOD_PATH)
async def handle_get_datapod(request: web.Request) -> web.Response:
    """One DataPod: published, or the caller's own draft."""
    datapod_id = _datapod_id(request)
    pod = await marketplace.get_datapod(request.app[POOL], datapod_id, await optional_identity(request))
    return ok_response(pod.to_public())


@routes.get("/api/v1/datapods/{datapod_id}/reviews")
@endpoint(path=DATAPOD_PATH, query=PAGE_SCHEMA)
async def handle_datapod_reviews(request: web.Request) -> web.Response:
    """A visible DataPod's reviews, newest first, with a keyset cursor."""
    datapod_id = _datapod_id(request)
    page = marketplace.review_page(query_payload(request, _PAGE))  # a bad cursor is refused before the token
    identity = await optional_identity(request)
    return ok_response(await marketplace.list_reviews(request.app[POOL], datapod_id, identity, page))


@routes.get("/api/v1/seller/datapods")
@endpoint(auth="user", query=SEARCH_SCHEMA)
async def handle_seller_datapods(request: web.Request, identity: Identity) -> web.Response:
    """The caller's DataPods, drafts included, with the same filters, sorts and cursor as the search."""
    payload = query_payload(request, _SEARCH)
    return ok_response(await marketplace.search(request.app[POOL], payload, seller_id=identity.user_id))


@routes.get("/api/v1/seller/stats")
@endpoint(auth="user")
async def handle_seller_stats(request: web.Request, identity: Identity) -> web.Response:
    """The caller's seller analytics: pods, published pods, sales, revenue, average rating."""
    return ok_response((await marketplace.seller_stats(request.app[POOL], identity.user_id)).to_public())


# --- the namespace ----------------------------------------------------------------------------


class MarketplaceNamespace(HubNamespace):
    """Live marketplace: DataPods, sales, reviews, NFT listings (anyone may watch)."""

    name = "/marketplace"
    allow_anonymous = True
    channels = (
        ChannelRule(marketplace.MARKET_CHANNEL),
        ChannelRule(marketplace.CATEGORY_CHANNEL),
        ChannelRule(marketplace.DATAPOD_CHANNEL, presence=True),
        ChannelRule(nfts.CHANNEL),
    )
    events = (marketplace.DATAPOD_PUBLISHED, marketplace.DATAPOD_UPDATED, marketplace.DATAPOD_UNPUBLISHED,
              marketplace.DATAPOD_SOLD, marketplace.REVIEW_ADDED, marketplace.REVIEW_UPDATED,
              marketplace.REVIEW_REMOVED,
              nfts.NFT_MINTED, nfts.NFT_LISTED, nfts.NFT_SOLD, nfts.NFT_LISTING_CANCELLED)

    @command(SEARCH_SCHEMA, user=False)
    async def on_search_datapods(self, ctx: Ctx, payload: dict) -> dict:
        """Search published DataPods (the same filters and cursor as GET /api/v1/datapods)."""
        return await marketplace.search(self.app[POOL], payload)

    @command(FACETS_SCHEMA, user=False)
    async def on_datapod_facets(self, ctx: Ctx, payload: dict) -> dict:
        """Counts per category and price band (the same filters as search_datapods)."""
        return await marketplace.facets(self.app[POOL], payload)

    @command(SIMILAR_SCHEMA, user=False)
    async def on_similar_datapods(self, ctx: Ctx, payload: dict) -> dict:
        """Published DataPods most like a visible one (GET /api/v1/datapods/{id}/similar)."""
        return await marketplace.similar(self.app[POOL], uuid.UUID(payload["datapod_id"]), ctx.identity,
                                         payload.get("limit", marketplace.SIMILAR_DEFAULT))

    @command(GET_SCHEMA, user=False)
    async def on_get_datapod(self, ctx: Ctx, payload: dict) -> dict:
        """One DataPod: published, or the caller's own draft."""
        pod = await marketplace.get_datapod(self.app[POOL], uuid.UUID(payload["datapod_id"]), ctx.identity)
        return pod.to_public()
