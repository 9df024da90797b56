"""The seller's REST routes: figures, charts and payouts of their own DataPods, a DataPod's version
history, and deleting a DataPod.

Uploading a new version is POST /api/v1/datapods/{id}/versions in handlers/marketplace.py (it shares
the upload's multipart reader); the rules of all of them are in server/services/seller.py. Live
changes reach the seller on `user:<seller>` (sale_completed, escrow_*) through /purchases.
"""

from __future__ import annotations

import uuid

from aiohttp import web

from db.pool import POOL
from server.core.identity import Identity
from server.edge.rest import endpoint, ok_response, optional_identity, path_uuid, query_payload
from server.edge.schemas import PAGE_LIMIT, UUID, compile_schema, obj, string
from server.services import seller

routes = web.RouteTableDef()

DATE = string(10, 10, pattern="^[0-9]{4}-[0-9]{2}-[0-9]{2}$")
CURSOR = string(1, 512)
PAGE_SCHEMA = obj({"cursor": CURSOR, "limit": PAGE_LIMIT})
SERIES_SCHEMA = obj({"bucket": {"enum": list(seller.BUCKETS)}, "from": DATE, "to": DATE, "datapod_id": UUID})
VERSIONS_SCHEMA = obj({"before": string(1, 9, pattern="^[1-9][0-9]{0,8}$"), "limit": PAGE_LIMIT})
DATAPOD_PATH = {"datapod_id": UUID}
_PAGE = compile_schema(PAGE_SCHEMA)
_SERIES = compile_schema(SERIES_SCHEMA)
_VERSIONS = compile_schema(VERSIONS_SCHEMA)


def _datapod_id(request: web.Request) -> uuid.UUID:
    return path_uuid(request, "datapod_id", "no such DataPod")


@routes.get("/api/v1/me/sales")
@endpoint(auth="user")
async def handle_sales_figures(request: web.Request, identity: Identity) -> web.Response:
    """The caller's figures over all their DataPods: sales, revenue, escrow, payouts, downloads, views, rating."""
    return ok_response(await seller.figures(request.app[POOL], identity.user_id))


@routes.get("/api/v1/me/sales/datapods")
@endpoint(auth="user", query=PAGE_SCHEMA)
async def handle_sales_by_datapod(request: web.Request, identity: Identity) -> web.Response:
    """The caller's DataPods, newest first, each with its figures (keyset cursor, limit <= 100)."""
    params = query_payload(request, _PAGE)
    return ok_response(await seller.datapod_figures_page(request.app[POOL], identity.user_id, params))


@routes.get("/api/v1/me/sales/datapods/{datapod_id}")
@endpoint(auth="user", path=DATAPOD_PATH)
async def handle_sales_of_datapod(request: web.Request, identity: Identity) -> web.Response:
    """One of the caller's DataPods with its figures."""
    return ok_response(await seller.datapod_figures(request.app[POOL], identity.user_id, _datapod_id(request)))


@routes.get("/api/v1/me/sales/series")
@endpoint(auth="user", query=SERIES_SCHEMA)
async def handle_sales_series(request: web.Request, identity: Identity) -> web.Response:
    """The caller's figures per day or week (UTC) from `from` to `to` (at most 366 buckets), for charts."""
    params = query_payload(request, _SERIES)
    return ok_response(await seller.series(request.app[POOL], identity.user_id, params))


@routes.get("/api/v1/me/sales/payouts")
@endpoint(auth="user", query=PAGE_SCHEMA)
async def handle_sales_payouts(request: web.Request, identity: Identity) -> web.Response:
    """The caller's settled payouts, newest first, with their settlement transaction hashes."""
    params = query_payload(request, _PAGE)
    return ok_response(await seller.payouts(request.app[POOL], identity.user_id, params))


@routes.get("/api/v1/datapods/{datapod_id}/versions")
@endpoint(path=DATAPOD_PATH, query=VERSIONS_SCHEMA)
async def handle_datapod_versions(request: web.Request) -> web.Response:
    """A DataPod's version history, newest first (anyone while it is on the market; else its seller and buyers)."""
    datapod_id = _datapod_id(request)
    params = query_payload(request, _VERSIONS)
    identity = await optional_identity(request)
    return ok_response(await seller.list_versions(request.app[POOL], identity, datapod_id, params))


@routes.delete("/api/v1/datapods/{datapod_id}")
@endpoint(auth="user", path=DATAPOD_PATH)
async def handle_delete_datapod(request: web.Request, identity: Identity) -> web.Response:
    """Delete the caller's DataPod from the market (409 while purchases of it are being paid or in escrow)."""
    return ok_response(await seller.delete_datapod(request.app[POOL], identity.user_id, _datapod_id(request)))
