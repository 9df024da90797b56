"""Purchases: start, follow, confirm, dispute, download (and signed links), key envelope, reviews
(REST and the /purchases namespace).

Each route and command validates its payload and calls one function of server/services/purchases.py,
which holds the rules. Starting a purchase only records it; the worker
(server/services/purchase_jobs.py) verifies the payment and reports progress on `user:<buyer>`.
"""

from __future__ import annotations

import uuid

from aiohttp import web

from server.core.identity import Identity
from server.core.settings import SETTINGS
from server.edge.namespace import Ctx, HubNamespace, command
from server.edge.rest import endpoint, error_response, ok_response, path_uuid, query_payload
from server.edge.schemas import DEFAULT_PAGE, MAX_PAGE, UUID, compile_schema, obj, string
from server.realtime.hub import USER_CHANNEL, ChannelRule, own_user
from server.services import escrow, kyc, seller
from server.services import purchases as service

routes = web.RouteTableDef()

# Sui digests are base58 (43-44 chars); KVP hashes hex. Both fit this, and nothing else is needed.
DIGEST = string(8, 100, pattern="^[A-Za-z0-9_:-]+$")
START_SCHEMA = obj({"datapod_id": UUID, "payment_tx_digest": DIGEST}, required=("datapod_id", "payment_tx_digest"))
PURCHASE_ID_SCHEMA = obj({"purchase_id": UUID}, required=("purchase_id",))
# from/to: an ISO 8601 date or date-time (parsed by the service; `+` must be sent as %2B in a query).
INSTANT = string(10, 40, pattern="^[0-9]{4}-[0-9]{2}-[0-9]{2}([T ][0-9:.]+(Z|[+-][0-9:]+)?)?$")
LIST_SCHEMA = {**obj({"limit": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE},
                     "cursor": string(1, 200), "status": {"enum": list(service.STATUSES)}, "datapod_id": UUID,
                     "category": string(1, 50), "from": INSTANT, "to": INSTANT}),
               "type": ["object", "null"]}
LIST_VALIDATOR = compile_schema(LIST_SCHEMA)
REVIEW_SCHEMA = obj({"rating": {"type": "integer", "minimum": 1, "maximum": 5},
                     "comment": string(0, 2000)}, required=("rating",))
REVIEW_EDIT_SCHEMA = obj({"rating": {"type": "integer", "minimum": 1, "maximum": 5},
                          "comment": {"type": ["string", "null"], "maxLength": 2000}}, minProperties=1)
REFUND_SCHEMA = obj({"reason": string(1, 500)})
DISPUTE_SCHEMA = obj({"reason": string(1, 1000)}, required=("reason",))
DISPUTE_COMMAND_SCHEMA = obj({"purchase_id": UUID, "reason": string(1, 1000)}, required=("purchase_id", "reason"))
RESOLVE_SCHEMA = obj({"outcome": {"enum": ["release", "refund"]}, "note": string(1, 1000)},
                     required=("outcome", "note"))
DISPUTES_QUERY = obj({"limit": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE}, "cursor": string(1, 200)})
DISPUTES_VALIDATOR = compile_schema({**DISPUTES_QUERY, "type": ["object", "null"]})
PURCHASE_PATH = {"purchase_id": UUID}
# A link's token: a JWT (base64url parts joined by dots); its length is bounded again by the service.
LINK_PATH = {"token": string(20, service.MAX_LINK_TOKEN, pattern="^[A-Za-z0-9_.-]+$")}
X25519_SCHEMA = obj({"public_key": string(43, 64)}, required=("public_key",))


def _parse_id(request: web.Request, name: str = "purchase_id") -> uuid.UUID:
    return path_uuid(request, name, "no such purchase")


# --- REST ------------------------------------------------------------------------------------------

@routes.post("/api/v1/purchases")
@endpoint(body=START_SCHEMA, auth="user")
async def handle_start_purchase(request: web.Request, identity: Identity, body: dict) -> web.Response:
    """Start buying a DataPod with a payment digest; progress follows on user:<id>."""
    purchase = await service.start_purchase(request.app, identity.user_id, uuid.UUID(body["datapod_id"]),
                                            body["payment_tx_digest"])
    return ok_response(purchase, status=202)


@routes.get("/api/v1/purchases")
@endpoint(auth="user", query=LIST_SCHEMA)
async def handle_list_purchases(request: web.Request, identity: Identity) -> web.Response:
    """The caller's purchases (?limit, ?cursor, ?status, ?datapod_id)."""
    return ok_response(await service.list_purchases(request.app, identity.user_id,
                                                    query_payload(request, LIST_VALIDATOR)))


@routes.get("/api/v1/purchases/{purchase_id}")
@endpoint(auth="user", path=PURCHASE_PATH)
async def handle_get_purchase(request: web.Request, identity: Identity) -> web.Response:
    """One of the caller's purchases."""
    return ok_response(await service.get_purchase(request.app, identity, _parse_id(request)))


@routes.post("/api/v1/purchases/{purchase_id}/confirm")
@endpoint(auth="user", path=PURCHASE_PATH)
async def handle_confirm(request: web.Request, identity: Identity) -> web.Response:
    """The buyer confirms the download; the escrow goes to the seller."""
    return ok_response(await service.confirm_download(request.app, identity, _parse_id(request)))


@routes.post("/api/v1/purchases/{purchase_id}/dispute")
@endpoint(body=DISPUTE_SCHEMA, auth="user", path=PURCHASE_PATH)
async def handle_dispute(request: web.Request, identity: Identity, body: dict) -> web.Response:
    """The buyer disputes within the escrow window: the release freezes until an administrator decides."""
    return ok_response(await escrow.open_dispute(request.app, identity, _parse_id(request), body["reason"]))


@routes.get("/api/v1/purchases/{purchase_id}/escrow")
@endpoint(auth="user", path=PURCHASE_PATH)
async def handle_get_escrow(request: web.Request, identity: Identity) -> web.Response:
    """A purchase's escrow and its steps (its buyer, its seller, or an administrator)."""
    return ok_response(await escrow.escrow_view(request.app, identity, _parse_id(request)))


@routes.get("/api/v1/escrow")
@endpoint()
async def handle_escrow_terms(request: web.Request) -> web.Response:
    """Where to pay for a purchase, the platform fee and the release window."""
    return ok_response(escrow.terms(request.app[SETTINGS], request.app[escrow.ESCROW_ACCOUNTS]))


@routes.get("/api/v1/purchases/{purchase_id}/download")
@endpoint(auth="user", path=PURCHASE_PATH)
async def handle_download(request: web.Request, identity: Identity) -> web.StreamResponse:
    """The decrypted dataset, checked (GCM tag and data_hash) before the first byte is sent."""
    download = await service.open_download(request.app, identity, _parse_id(request))
    response = web.StreamResponse(headers={
        "Content-Type": download.content_type,
        "Content-Disposition": f'attachment; filename="{download.filename}"',
        "X-Content-SHA256": download.data_hash, "Cache-Control": "no-store"})
    response.content_length = download.size
    await response.prepare(request)
    if not await download.write_to(response.write):
        # Headers are out: the only honest signal left is an incomplete body (Content-Length).
        if request.transport is not None:
            request.transport.close()
        return response
    await response.write_eof()
    return response


@routes.get("/api/v1/purchases/{purchase_id}/blob")
@endpoint(auth="user", path=PURCHASE_PATH)
async def handle_blob(request: web.Request, identity: Identity) -> web.StreamResponse:
    """The encrypted blob as stored, for client-side decryption with the key envelope."""
    blob = await service.open_blob(request.app, identity, _parse_id(request))
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream", "Cache-Control": "no-store",
                                           "Content-Disposition": f'attachment; filename="{blob.blob_id}.bin"'})
    started = False
    async for chunk in blob.chunks():
        if not started:
            await response.prepare(request)
            started = True
        await response.write(chunk)
    if not started:
        await response.prepare(request)
    await response.write_eof()
    return response


@routes.get("/api/v1/purchases/{purchase_id}/key")
@endpoint(auth="user", path=PURCHASE_PATH)
async def handle_key(request: web.Request, identity: Identity) -> web.Response:
    """The dataset key sealed to the caller's registered X25519 public key (docs/decrypt.md)."""
    return ok_response(await service.key_envelope(request.app, identity, _parse_id(request)))


@routes.post("/api/v1/purchases/{purchase_id}/review")
@endpoint(body=REVIEW_SCHEMA, auth="user", path=PURCHASE_PATH)
async def handle_review(request: web.Request, identity: Identity, body: dict) -> web.Response:
    """Review a completed purchase (once); the rating triggers update the pod and seller averages."""
    review = await service.add_review(request.app, identity, _parse_id(request), body["rating"], body.get("comment"))
    return ok_response(review, status=201)


@routes.patch("/api/v1/purchases/{purchase_id}/review")
@endpoint(body=REVIEW_EDIT_SCHEMA, auth="user", path=PURCHASE_PATH)
async def handle_edit_review(request: web.Request, identity: Identity, body: dict) -> web.Response:
    """Change one's own review (rating and/or comment; a null or empty comment clears it)."""
    return ok_response(await service.update_review(request.app, identity, _parse_id(request), body))


@routes.delete("/api/v1/purchases/{purchase_id}/review")
@endpoint(auth="user", path=PURCHASE_PATH)
async def handle_delete_review(request: web.Request, identity: Identity) -> web.Response:
    """Delete one's own review; the pod's average follows."""
    return ok_response(await service.delete_review(request.app, identity, _parse_id(request)))


@routes.post("/api/v1/purchases/{purchase_id}/download-link")
@endpoint(auth="user", path=PURCHASE_PATH)
async def handle_download_link(request: web.Request, identity: Identity) -> web.Response:
    """A signed URL for the buyer's completed purchase, valid DOWNLOAD_LINK_TTL seconds (no header needed)."""
    return ok_response(await service.create_download_link(request.app, identity, _parse_id(request)), status=201)


@routes.get("/api/v1/downloads/{token}")
@endpoint(path=LINK_PATH)
async def handle_link_download(request: web.Request) -> web.StreamResponse:
    """The decrypted dataset through a signed link: resumable (one byte range), checked before the first byte."""
    try:
        served = await service.open_link_download(
            request.app, request.match_info["token"], range_header=request.headers.get("Range"),
            if_range=request.headers.get("If-Range"), head=request.method == "HEAD")
    except service.RangeNotSatisfiable as exc:
        refused = error_response(exc)
        refused.set_status(416)
        refused.headers["Content-Range"] = f"bytes */{exc.extra['size']}"
        return refused
    download, byte_range = served.download, served.range
    response = web.StreamResponse(status=206 if byte_range.partial else 200, headers={
        "Content-Type": download.content_type, "Accept-Ranges": "bytes", "ETag": served.etag,
        "Content-Disposition": f'attachment; filename="{download.filename}"',
        "X-Content-SHA256": download.data_hash, "Cache-Control": "private, no-store",
        "Referrer-Policy": "no-referrer"})  # the URL is the credential
    if byte_range.partial:
        response.headers["Content-Range"] = byte_range.content_range(download.size)
    response.content_length = byte_range.end - byte_range.start + 1
    await response.prepare(request)
    if request.method != "HEAD" and not await served.write_to(response.write):
        # Headers are out: the only honest signal left is an incomplete body (Content-Length).
        if request.transport is not None:
            request.transport.close()
        return response
    await response.write_eof()
    return response


@routes.put("/api/v1/me/x25519-key")
@endpoint(body=X25519_SCHEMA, auth="user")
async def handle_set_x25519_key(request: web.Request, identity: Identity, body: dict) -> web.Response:
    """Register the caller's X25519 public key (32 bytes, base64url) for sealed dataset keys."""
    return ok_response(await service.register_x25519_key(request.app, identity.user_id, body["public_key"]))


@routes.delete("/api/v1/me/x25519-key")
@endpoint(auth="user")
async def handle_delete_x25519_key(request: web.Request, identity: Identity) -> web.Response:
    """Forget the caller's X25519 public key (downloads are then decrypted by the server)."""
    return ok_response(await service.forget_x25519_key(request.app, identity.user_id))


@routes.post("/api/v1/admin/purchases/{purchase_id}/refund")
@endpoint(body=REFUND_SCHEMA, auth="admin", path=PURCHASE_PATH)
async def handle_admin_refund(request: web.Request, identity: Identity, body: dict) -> web.Response:
    """Refund a purchase whose escrow still holds the payment (exactly once)."""
    return ok_response(await service.refund_as_admin(request.app, identity, _parse_id(request), body.get("reason")))


@routes.get("/api/v1/admin/escrow/disputes")
@endpoint(auth="admin", query=DISPUTES_QUERY)
async def handle_admin_disputes(request: web.Request, identity: Identity) -> web.Response:
    """Open disputes, oldest first (?limit, ?cursor)."""
    query = query_payload(request, DISPUTES_VALIDATOR)
    return ok_response(await escrow.list_disputes(request.app, query.get("cursor"), query.get("limit", DEFAULT_PAGE)))


@routes.post("/api/v1/admin/purchases/{purchase_id}/resolve")
@endpoint(body=RESOLVE_SCHEMA, auth="admin", path=PURCHASE_PATH)
async def handle_admin_resolve(request: web.Request, identity: Identity, body: dict) -> web.Response:
    """End a dispute: release the payment to the seller or refund the buyer, with a note."""
    return ok_response(await service.resolve_dispute(request.app, identity, _parse_id(request), body["outcome"],
                                                     body["note"]))


# --- Socket.IO -------------------------------------------------------------------------------------

class PurchasesNamespace(HubNamespace):
    """Purchases and their live progress (a signed-in user only)."""

    name = "/purchases"
    allow_anonymous = False
    channels = (ChannelRule(USER_CHANNEL, own_user),)
    # On user:<id>, so /games and /assistant deliver them too to a subscriber of that channel.
    events = (service.PURCHASE_PROGRESSED, service.SALE_COMPLETED, *escrow.EVENTS, kyc.STATUS_CHANGED,
              seller.DATAPOD_VERSION_PUBLISHED)

    @command(START_SCHEMA)
    async def on_start_purchase(self, ctx: Ctx, payload: dict) -> dict:
        """Start a purchase; subscribe to user:<id> for purchase_progressed."""
        return await service.start_purchase(self.app, ctx.user_id, uuid.UUID(payload["datapod_id"]),
                                            payload["payment_tx_digest"])

    @command(LIST_SCHEMA)
    async def on_list_purchases(self, ctx: Ctx, payload: dict) -> dict:
        """A page of the caller's purchases."""
        return await service.list_purchases(self.app, ctx.user_id, payload or {})

    @command(PURCHASE_ID_SCHEMA)
    async def on_get_purchase(self, ctx: Ctx, payload: dict) -> dict:
        """One of the caller's purchases."""
        return await service.get_purchase(self.app, ctx.identity, uuid.UUID(payload["purchase_id"]))  # type: ignore[arg-type]

    @command(PURCHASE_ID_SCHEMA)
    async def on_confirm_download(self, ctx: Ctx, payload: dict) -> dict:
        """Confirm delivery: the escrow is released to the seller."""
        return await service.confirm_download(self.app, ctx.identity, uuid.UUID(payload["purchase_id"]))  # type: ignore[arg-type]

    @command(DISPUTE_COMMAND_SCHEMA)
    async def on_open_dispute(self, ctx: Ctx, payload: dict) -> dict:
        """Dispute a purchase within the escrow window, with a reason."""
        return await escrow.open_dispute(self.app, ctx.identity, uuid.UUID(payload["purchase_id"]),  # type: ignore[arg-type]
                                         payload["reason"])

    @command(PURCHASE_ID_SCHEMA)
    async def on_get_escrow(self, ctx: Ctx, payload: dict) -> dict:
        """A purchase's escrow and its steps."""
        return await escrow.escrow_view(self.app, ctx.identity, uuid.UUID(payload["purchase_id"]))  # type: ignore[arg-type]
