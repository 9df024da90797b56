"""The REST routes of NFTs and the NFT marketplace: mint, browse, list, buy, cancel.

The rules live in server/services/nfts.py; live events go on `market:nfts` (declared on
MarketplaceNamespace, handlers/marketplace.py).
"""

from __future__ import annotations

from aiohttp import web

from db.pool import POOL
from server.core.errors import InvalidPayload
from server.core.identity import Identity
from server.core.money import amount_text
from server.edge.rest import endpoint, int_query, ok_response, path_int
from server.edge.schemas import (
    DEFAULT_PAGE,
    INTEGER_ID,
    KVP_ADDRESS,
    KVP_AMOUNT,
    MAX_INTEGER_ID,
    MAX_PAGE,
    compile_schema,
    obj,
    string,
    validate,
)
from server.services import nfts as service

routes = web.RouteTableDef()

ATTRIBUTE = obj({"trait_type": string(1, 50),
                 "value": {"anyOf": [string(0, 200), {"type": "number"}, {"type": "boolean"}]}},
                required=("trait_type", "value"))
METADATA_SCHEMA = obj({
    "name": string(1, 100),
    "description": string(0, 2000),
    "image": string(1, 2048, pattern=r"^(https?|ipfs)://\S+$"),
    "attributes": {"type": "array", "items": ATTRIBUTE, "maxItems": 50},
}, required=("name",))
MINT_SCHEMA = obj({"metadata": METADATA_SCHEMA, "game_id": INTEGER_ID}, required=("metadata",))
LIST_SCHEMA = obj({"nft_id": INTEGER_ID, "price": KVP_AMOUNT}, required=("nft_id", "price"))
_ADDRESS = compile_schema(KVP_ADDRESS)
PAGE_QUERY = {"before_id": INTEGER_ID, "limit": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE}}


def _path_id(request: web.Request, name: str, what: str) -> int:
    return path_int(request, name, f"no such {what}")


def _wallet_query(request: web.Request, name: str) -> str | None:
    raw = request.query.get(name) or None
    if raw is not None:
        try:
            validate(_ADDRESS, raw)
        except InvalidPayload:
            raise InvalidPayload(f"'{name}' must be a wallet address (kvp1 and 40 hex digits)", field=name) from None
    return raw


def _page(request: web.Request) -> tuple[int | None, int]:
    return (int_query(request, "before_id", minimum=1, maximum=MAX_INTEGER_ID),
            int_query(request, "limit", minimum=1, maximum=MAX_PAGE) or DEFAULT_PAGE)


def _next_before(ids: list[int], limit: int) -> int | None:
    return ids[-1] if len(ids) == limit and ids[-1] > 1 else None


@routes.post("/api/v1/nfts")
@endpoint(body=MINT_SCHEMA, auth="user")
async def handle_mint(request: web.Request, identity: Identity, body: dict) -> web.Response:
    """Mint an NFT owned by the caller's wallet; `201` with the NFT."""
    async with request.app[POOL].acquire() as conn:
        nft = await service.mint(conn, identity.user_id, body)
    return ok_response(nft.to_public(), status=201)


@routes.get("/api/v1/nfts")
@endpoint(query=obj({"owner": KVP_ADDRESS, **PAGE_QUERY}))
async def handle_list_nfts(request: web.Request) -> web.Response:
    """NFTs newest first (`owner=<address>`, `before_id`, `limit` up to 100, default 20)."""
    owner = _wallet_query(request, "owner")
    before, limit = _page(request)
    async with request.app[POOL].acquire() as conn:
        nfts = await service.list_nfts(conn, owner, before, limit)
    return ok_response({"nfts": [n.to_public() for n in nfts],
                        "next_before_id": _next_before([n.id for n in nfts], limit)})


@routes.get("/api/v1/nfts/{nft_id}")
@endpoint(path={"nft_id": INTEGER_ID})
async def handle_get_nft(request: web.Request) -> web.Response:
    """One NFT with its open listing (null when not for sale)."""
    async with request.app[POOL].acquire() as conn:
        return ok_response(await service.get_nft(conn, _path_id(request, "nft_id", "NFT")))


@routes.get("/api/v1/nft-listings")
@endpoint(query=obj({"seller": KVP_ADDRESS, **PAGE_QUERY}))
async def handle_list_listings(request: web.Request) -> web.Response:
    """Available listings newest first (`seller=<address>`, `before_id`, `limit` up to 100, default 20)."""
    seller = _wallet_query(request, "seller")
    before, limit = _page(request)
    async with request.app[POOL].acquire() as conn:
        listings = await service.list_listings(conn, seller, before, limit)
    return ok_response({"listings": [item.to_public() for item in listings],
                        "next_before_id": _next_before([item.id for item in listings], limit)})


@routes.post("/api/v1/nft-listings")
@endpoint(body=LIST_SCHEMA, auth="user")
async def handle_create_listing(request: web.Request, identity: Identity, body: dict) -> web.Response:
    """List the caller's NFT for sale; `201` with the listing."""
    async with request.app[POOL].acquire() as conn:
        listing = await service.create_listing(conn, identity.user_id, body["nft_id"], body["price"])
    return ok_response(listing.to_public(), status=201)


@routes.post("/api/v1/nft-listings/{listing_id}/buy")
@endpoint(auth="user", path={"listing_id": INTEGER_ID})
async def handle_buy(request: web.Request, identity: Identity) -> web.Response:
    """Buy an available listing with the caller's KVP balance."""
    async with request.app[POOL].acquire() as conn:
        listing, balance = await service.buy(conn, identity.user_id, _path_id(request, "listing_id", "listing"))
    return ok_response({**listing.to_public(), "buyer_balance": amount_text(balance)})


@routes.post("/api/v1/nft-listings/{listing_id}/cancel")
@endpoint(auth="user", path={"listing_id": INTEGER_ID})
async def handle_cancel(request: web.Request, identity: Identity) -> web.Response:
    """Withdraw the caller's available listing."""
    async with request.app[POOL].acquire() as conn:
        listing = await service.cancel(conn, identity.user_id, _path_id(request, "listing_id", "listing"))
    return ok_response(listing.to_public())
