"""Namespace /chain and the chain's REST routes: wallets, signed transfers, blocks, reward pools."""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

import structlog
from aiohttp import web

from db import chain as queries
from db.pool import POOL
from handlers import dao as dao_handlers
from server.core import wallets
from server.core.errors import InvalidPayload, NotFound
from server.core.identity import Identity
from server.core.settings import SETTINGS
from server.edge.namespace import Ctx, HubNamespace, command
from server.edge.rest import endpoint, int_query, ok_response, path_int
from server.edge.schemas import UUID, obj, string
from server.realtime.hub import ChannelAccess, ChannelRule, publish
from server.services import chain as service

log = structlog.get_logger(__name__)
routes = web.RouteTableDef()

MAX_PAGE = 500
ADDRESS = string(44, 44, pattern=wallets.ADDRESS_RE.pattern)
AMOUNT = {"type": "string", "pattern": "^[0-9]{1,12}(\\.[0-9]{1,8})?$"}
SIGNED_DELTA = {"type": "string", "pattern": "^-?[0-9]{1,12}(\\.[0-9]{1,8})?$"}
TX_HASH = string(64, 64, pattern="^[0-9a-f]{64}$")
TRANSFER_SCHEMA = obj({
    "sender": ADDRESS, "receiver": ADDRESS, "amount": AMOUNT,
    "nonce": {"type": "integer", "minimum": 0, "maximum": wallets.MAX_NONCE},
    "signature": string(128, 128, pattern=wallets.SIGNATURE_RE.pattern),
}, required=("sender", "receiver", "amount", "nonce", "signature"))
BLOCKS_SINCE_SCHEMA = obj({"since_height": {"type": "integer", "minimum": 0},
                           "limit": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE}},
                          required=("since_height",))


async def blocks_since(app: web.Application, since_height: int, limit: int) -> dict:
    """The blocks after a height (oldest first, at most `limit`), and the chain's tip."""
    async with app[POOL].acquire() as conn:
        blocks = await queries.blocks_after(conn, since_height, limit + 1)
        latest = await queries.tip_height(conn)
    return {"blocks": [block.to_public() for block in blocks[:limit]], "has_more": len(blocks) > limit,
            "latest_height": latest}


async def catch_up_blocks(access: ChannelAccess, since_height: int, limit: int) -> dict:
    """`subscribe {channel: "chain:blocks", since_height}`: the missed blocks from the database."""
    return await blocks_since(access.app, since_height, limit)


class ChainNamespace(HubNamespace):
    """KVP chain feeds: blocks, transactions, mining, DAO tallies (anyone may watch)."""

    name = "/chain"
    allow_anonymous = True
    channels = (
        ChannelRule("chain:blocks", catch_up=catch_up_blocks),
        ChannelRule("chain:transactions"),
        ChannelRule("chain:mining"),
        ChannelRule("dao:{proposal_id}"),
    )

    @command(TRANSFER_SCHEMA)
    async def on_submit_transaction(self, ctx: Ctx, payload: dict) -> dict:
        """Submit a transfer signed by the caller's wallet key; acked with the pending transaction."""
        return await submit(self.app, ctx.user_id, payload)

    @command(BLOCKS_SINCE_SCHEMA, user=False)
    async def on_blocks_since(self, ctx: Ctx, payload: dict) -> dict:
        """Catch up from the database: exactly the blocks after `since_height`, oldest first."""
        return await blocks_since(self.app, payload["since_height"], payload.get("limit", 100))

    @command(dao_handlers.CREATE_SCHEMA)
    async def on_create_proposal(self, ctx: Ctx, payload: dict) -> dict:
        """Open a DAO proposal (the caller needs a registered wallet); acked with the proposal."""
        return await dao_handlers.create(self.app, ctx.user_id, payload)

    @command(dao_handlers.VOTE_SCHEMA)
    async def on_cast_vote(self, ctx: Ctx, payload: dict) -> dict:
        """Cast a vote signed by the caller's wallet key; acked with the vote and the new tally."""
        return await dao_handlers.vote(self.app, ctx.user_id, payload)

    @command(dao_handlers.GET_SCHEMA, user=False)
    async def on_get_proposal(self, ctx: Ctx, payload: dict) -> dict:
        """A proposal with its tally (and result once closed); `votes: true` adds the signed votes."""
        return await dao_handlers.get(self.app, payload["proposal_id"], payload.get("votes", False))


async def submit(app: web.Application, user_id: uuid.UUID, payload: dict) -> dict:
    """Verify and record a transfer, then announce it (not critical: the block confirms it)."""
    async with app[POOL].acquire() as conn:
        tx = await service.submit_transaction(conn, user_id, payload)
    try:
        await publish(app, service.TRANSACTIONS_CHANNEL, "transaction_pending", service.pending_event(tx))
    except Exception:  # noqa: BLE001 - the transaction is recorded; the feed is best effort
        log.warning("transaction_pending_not_published", hash=tx.hash, exc_info=True)
    return tx.to_public()




# --- wallets and transactions -----------------------------------------------------------------

@routes.put("/api/v1/me/wallet")
@endpoint(body=obj({"public_key": string(64, 64, pattern=wallets.PUBLIC_KEY_RE.pattern)},
                   required=("public_key",)), auth="user")
async def handle_register_wallet(request: web.Request, identity: Identity, body: dict) -> web.Response:
    """Register the caller's Ed25519 wallet key (once); returns the derived address."""
    async with request.app[POOL].acquire() as conn:
        return ok_response(await service.register_wallet(conn, identity.user_id, body["public_key"]))


@routes.get("/api/v1/users/{user_id}/wallet")
@endpoint(auth="user")
async def handle_user_wallet(request: web.Request, identity: Identity) -> web.Response:
    """A user's wallet address (e.g. a DataPod seller's, to pay them); not_found without one."""
    try:
        user_id = uuid.UUID(request.match_info["user_id"])
    except ValueError:
        raise NotFound("no such user", field="user_id") from None
    async with request.app[POOL].acquire() as conn:
        return ok_response(await service.wallet_of_user(conn, user_id))


@routes.post("/api/v1/me/faucet")
@endpoint(auth="user")
async def handle_faucet(request: web.Request, identity: Identity) -> web.Response:
    """Demo funds for the caller's wallet (DEMO_FAUCET; once per user per UTC day)."""
    settings = request.app[SETTINGS]
    if not settings.faucet_enabled:
        raise NotFound("the demo faucet is not enabled on this server")
    async with request.app[POOL].acquire() as conn:
        amount = Decimal(wallets.canonical_amount(settings.demo_faucet_amount))
        paid = await service.claim_faucet(conn, identity.user_id, amount)
    return ok_response(paid, status=201)


@routes.get("/api/v1/wallets/{address}")
@endpoint()
async def handle_wallet(request: web.Request) -> web.Response:
    """A wallet's balance, reserved (pending) amount and next free nonce."""
    async with request.app[POOL].acquire() as conn:
        return ok_response(await service.wallet_summary(conn, request.match_info["address"]))


@routes.post("/api/v1/transactions")
@endpoint(body=TRANSFER_SCHEMA, auth="user")
async def handle_submit_transaction(request: web.Request, identity: Identity, body: dict) -> web.Response:
    """Submit a signed transfer (the REST twin of `submit_transaction`)."""
    return ok_response(await submit(request.app, identity.user_id, body), status=201)


@routes.get("/api/v1/transactions/{hash}")
@endpoint()
async def handle_get_transaction(request: web.Request) -> web.Response:
    """A transaction by hash, with its status and block height once sealed."""
    async with request.app[POOL].acquire() as conn:
        tx = await queries.get_transaction(conn, request.match_info["hash"].lower())
    if tx is None:
        raise NotFound("no transaction has that hash", field="hash")
    return ok_response(tx.to_public())


# --- blocks -----------------------------------------------------------------------------------

@routes.get("/api/v1/blocks")
@endpoint()
async def handle_blocks(request: web.Request) -> web.Response:
    """Newest blocks first, below `before_height` when given (`limit` up to 500, default 20)."""
    before = int_query(request, "before_height", minimum=1)
    limit = int_query(request, "limit", minimum=1, maximum=MAX_PAGE) or 20
    async with request.app[POOL].acquire() as conn:
        blocks = await queries.list_blocks(conn, before, limit)
        latest = await queries.tip_height(conn)
    next_before = blocks[-1].height if len(blocks) == limit and blocks[-1].height > 1 else None
    return ok_response({"blocks": [block.to_public() for block in blocks], "latest_height": latest,
                        "next_before_height": next_before})


@routes.get("/api/v1/blocks/{height:[0-9]+}")
@endpoint()
async def handle_block(request: web.Request) -> web.Response:
    """One block by height, with its transactions."""
    height = path_int(request, "height", "no block at that height", minimum=0)
    async with request.app[POOL].acquire() as conn:
        block = await queries.get_block(conn, height)
        if block is None:
            raise NotFound("no block at that height", field="height")
        txs = (await queries.block_transactions(conn, [height]))[height]
    by_hash = {tx.hash: tx.to_public() for tx in txs}
    return ok_response({**block.to_public(),
                        "transaction_details": [by_hash[h] for h in block.tx_hashes if h in by_hash]})


# --- reward pools -----------------------------------------------------------------------------

@routes.get("/api/v1/reward-pools")
@endpoint()
async def handle_pools(request: web.Request) -> web.Response:
    """Every reward pool with its total, allocated and remaining tokens."""
    async with request.app[POOL].acquire() as conn:
        return ok_response({"pools": [pool.to_public() for pool in await queries.list_pools(conn)]})


@routes.post("/api/v1/admin/reward-pools")
@endpoint(body=obj({"name": string(1, 50), "total_tokens": AMOUNT}, required=("name", "total_tokens")),
          auth="admin")
async def handle_create_pool(request: web.Request, identity: Identity, body: dict) -> web.Response:
    """Create a reward pool (names are unique)."""
    async with request.app[POOL].acquire() as conn:
        pool = await queries.create_pool(conn, body["name"], Decimal(body["total_tokens"]))
    return ok_response(pool.to_public(), status=201)


def _pool_id(request: web.Request) -> int:
    return path_int(request, "pool_id", "no such reward pool", minimum=0)


@routes.patch("/api/v1/admin/reward-pools/{pool_id}")
@endpoint(body=obj({"delta": SIGNED_DELTA}, required=("delta",)), auth="admin")
async def handle_adjust_pool(request: web.Request, identity: Identity, body: dict) -> web.Response:
    """Add tokens to a pool, or remove unallocated ones with a negative delta."""
    async with request.app[POOL].acquire() as conn:
        pool = await queries.add_tokens(conn, _pool_id(request), Decimal(body["delta"]))
    if pool is None:
        raise NotFound("no such reward pool", field="pool_id")
    return ok_response(pool.to_public())


@routes.post("/api/v1/admin/reward-pools/{pool_id}/allocations")
@endpoint(body=obj({"user_id": UUID, "amount": AMOUNT}, required=("user_id", "amount")), auth="admin")
async def handle_allocate(request: web.Request, identity: Identity, body: dict) -> web.Response:
    """Grant pool tokens to a user; refused (conflict) when the pool has too few left."""
    amount = Decimal(body["amount"])
    if amount <= 0:
        raise InvalidPayload("the amount must be greater than 0", field="amount")
    async with request.app[POOL].acquire() as conn:
        allocation = await service.allocate(conn, _pool_id(request), uuid.UUID(body["user_id"]), amount)
    return ok_response(allocation.to_public(), status=201)


@routes.post("/api/v1/admin/blocks/burn")
@endpoint(body=obj({"miner_id": UUID}, required=("miner_id",)), auth="admin")
async def handle_burn(request: web.Request, identity: Identity, body: dict) -> web.Response:
    """Burn every block a user mined (e.g. before removing the account)."""
    async with request.app[POOL].acquire() as conn:
        result: dict[str, Any] = await service.burn_blocks_of(conn, uuid.UUID(body["miner_id"]))
    return ok_response(result)
