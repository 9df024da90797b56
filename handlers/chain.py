"""The KVP chain's /chain commands and feeds, and its REST routes: wallets, signed transfers, blocks,
reward pools, and the read-only explorer (server/services/explorer.py).

The /chain namespace carries the DAO's commands too: handlers/__init__.py composes it from
ChainCommands (here) and DaoCommands (handlers/dao.py).
"""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

from aiohttp import web

from db.pool import POOL
from server.core import wallets
from server.core.errors import InvalidPayload, NotFound
from server.core.identity import Identity
from server.core.settings import SETTINGS
from server.edge.namespace import Ctx, command
from server.edge.rest import endpoint, int_query, ok_response, path_int, path_uuid
from server.edge.schemas import (
    COUNT,
    DEFAULT_PAGE,
    KVP_ADDRESS,
    KVP_AMOUNT,
    KVP_SIGNATURE,
    MAX_INTEGER_ID,
    MAX_PAGE,
    PAGE_LIMIT,
    TX_HASH,
    UUID,
    compile_schema,
    obj,
    string,
    text,
    validate,
)
from server.realtime.hub import ChannelAccess, ChannelRule
from server.services import chain as service
from server.services import explorer

routes = web.RouteTableDef()

MAX_BLOCKS_PAGE = 500
SIGNED_DELTA = {"type": "string", "pattern": "^-?[0-9]{1,12}(\\.[0-9]{1,8})?$"}
TRANSFER_SCHEMA = obj({
    "sender": KVP_ADDRESS, "receiver": KVP_ADDRESS, "amount": KVP_AMOUNT,
    "nonce": {"type": "integer", "minimum": 0, "maximum": wallets.MAX_NONCE},
    "signature": KVP_SIGNATURE,
}, required=("sender", "receiver", "amount", "nonce", "signature"))
HEIGHT = COUNT
BLOCKS_QUERY = obj({"before_height": {"type": "integer", "minimum": 1, "maximum": MAX_INTEGER_ID},
                    "limit": {"type": "integer", "minimum": 1, "maximum": MAX_BLOCKS_PAGE}})
BLOCKS_SINCE_SCHEMA = obj({"since_height": COUNT,
                           "limit": {"type": "integer", "minimum": 1, "maximum": MAX_BLOCKS_PAGE}},
                          required=("since_height",))


# --- explorer vocabulary: keyset cursors and block references ----------------------------------
BLOCK_HASH = string(64, 64, pattern="^[0-9a-fA-F]{64}$")
BLOCK_REF = {"oneOf": [HEIGHT, BLOCK_HASH]}                       # a height or a block hash
BLOCK_REF_PATH = string(1, 64, pattern="^([0-9]{1,10}|[0-9a-fA-F]{64})$")
AFTER = {"type": "integer", "minimum": 0, "maximum": MAX_INTEGER_ID}
BEFORE = {"type": "integer", "minimum": 1, "maximum": MAX_INTEGER_ID}
LEDGER_BEFORE = {"type": "integer", "minimum": 1, "maximum": 2**63 - 1}   # balance_ledger.entry_id is BIGINT
ERAS = {"type": "integer", "minimum": 1, "maximum": explorer.MAX_ERAS}
SEARCH_TEXT = text(100)
BLOCK_PAGE_QUERY = obj({"after": AFTER, "limit": PAGE_LIMIT})
NEWEST_PAGE_QUERY = obj({"before": BEFORE, "limit": PAGE_LIMIT})
LEDGER_PAGE_QUERY = obj({"before": LEDGER_BEFORE, "limit": PAGE_LIMIT})
GET_BLOCK_SCHEMA = obj({"block": BLOCK_REF}, required=("block",))
BLOCK_PAGE_SCHEMA = obj({"block": BLOCK_REF, "after": AFTER, "limit": PAGE_LIMIT}, required=("block",))
ADDRESS_SCHEMA = obj({"address": KVP_ADDRESS}, required=("address",))
ADDRESS_PAGE_SCHEMA = obj({"address": KVP_ADDRESS, "before": BEFORE, "limit": PAGE_LIMIT}, required=("address",))
LEDGER_PAGE_SCHEMA = obj({"address": KVP_ADDRESS, "before": LEDGER_BEFORE, "limit": PAGE_LIMIT},
                         required=("address",))
MINER_PAGE_SCHEMA = obj({"address": KVP_ADDRESS, "user_id": UUID, "before": BEFORE, "limit": PAGE_LIMIT},
                        oneOf=[{"required": ["address"]}, {"required": ["user_id"]}])
SEARCH_SCHEMA = obj({"q": SEARCH_TEXT}, required=("q",))
HALVING_SCHEMA = obj({"eras": ERAS})
BURNS_SCHEMA = NEWEST_PAGE_QUERY
SEARCH_VALIDATOR = compile_schema(SEARCH_SCHEMA)


async def catch_up_blocks(access: ChannelAccess, since_height: int, limit: int) -> dict:
    """`subscribe {channel: "chain:blocks", since_height}`: the missed blocks from the database."""
    async with access.app[POOL].acquire() as conn:
        return await service.blocks_since(conn, since_height, limit)


class ChainCommands:
    """KVP chain feeds and transfers on /chain: blocks, transactions, mining (anyone may watch)."""

    app: web.Application
    channels = (
        ChannelRule(service.BLOCKS_CHANNEL, catch_up=catch_up_blocks),
        ChannelRule(service.TRANSACTIONS_CHANNEL),
        ChannelRule(service.MINING_CHANNEL),
    )
    events = (service.BLOCK_ADDED, service.BLOCKS_BURNED, service.TRANSACTION_PENDING, service.TRANSACTION_CONFIRMED,
              service.TRANSACTION_REJECTED, service.MINING_REWARDED, service.HALVING_SCHEDULED)

    @command(TRANSFER_SCHEMA)
    async def on_submit_transaction(self, ctx: Ctx, payload: dict) -> dict:
        """Submit a transfer signed by the caller's wallet key; acked with the pending transaction."""
        return (await service.submit_transaction(self.app, ctx.user_id, payload)).to_public()

    @command(BLOCKS_SINCE_SCHEMA, user=False)
    async def on_blocks_since(self, ctx: Ctx, payload: dict) -> dict:
        """Catch up from the database: exactly the blocks after `since_height`, oldest first."""
        async with self.app[POOL].acquire() as conn:
            return await service.blocks_since(conn, payload["since_height"], payload.get("limit", 100))

    # --- explorer (read-only, anyone) ---

    @command(GET_BLOCK_SCHEMA, user=False)
    async def on_get_block(self, ctx: Ctx, payload: dict) -> dict:
        """A block by height or hash."""
        async with self.app[POOL].acquire() as conn:
            return await explorer.get_block(conn, payload["block"])

    @command(BLOCK_PAGE_SCHEMA, user=False)
    async def on_block_transactions(self, ctx: Ctx, payload: dict) -> dict:
        """A page of a block's transactions in block order."""
        async with self.app[POOL].acquire() as conn:
            return await explorer.block_transactions(conn, payload["block"], payload.get("after"),
                                                     payload.get("limit", DEFAULT_PAGE))

    @command(BLOCK_PAGE_SCHEMA, user=False)
    async def on_block_mining_rewards(self, ctx: Ctx, payload: dict) -> dict:
        """A page of the rewards paid for a block."""
        async with self.app[POOL].acquire() as conn:
            return await explorer.block_mining_rewards(conn, payload["block"], payload.get("after"),
                                                       payload.get("limit", DEFAULT_PAGE))

    @command(ADDRESS_SCHEMA, user=False)
    async def on_get_address(self, ctx: Ctx, payload: dict) -> dict:
        """An address's balance, pending amount and next nonce."""
        async with self.app[POOL].acquire() as conn:
            return await explorer.get_address(conn, payload["address"])

    @command(ADDRESS_PAGE_SCHEMA, user=False)
    async def on_address_transactions(self, ctx: Ctx, payload: dict) -> dict:
        """A page of an address's transfers, sent and received, newest first."""
        async with self.app[POOL].acquire() as conn:
            return await explorer.address_transactions(conn, payload["address"], payload.get("before"),
                                                       payload.get("limit", DEFAULT_PAGE))

    @command(LEDGER_PAGE_SCHEMA, user=False)
    async def on_address_ledger(self, ctx: Ctx, payload: dict) -> dict:
        """A page of the address owner's balance ledger, newest first."""
        async with self.app[POOL].acquire() as conn:
            return await explorer.address_ledger(conn, payload["address"], payload.get("before"),
                                                 payload.get("limit", DEFAULT_PAGE))

    @command(MINER_PAGE_SCHEMA, user=False)
    async def on_miner_rewards(self, ctx: Ctx, payload: dict) -> dict:
        """A page of a miner's rewards (by `address` or `user_id`), newest first, with totals."""
        user_id = uuid.UUID(payload["user_id"]) if "user_id" in payload else None
        async with self.app[POOL].acquire() as conn:
            return await explorer.user_mining_rewards(conn, user_id=user_id, address=payload.get("address"),
                                                      before=payload.get("before"),
                                                      limit=payload.get("limit", DEFAULT_PAGE))

    @command(SEARCH_SCHEMA, user=False)
    async def on_search(self, ctx: Ctx, payload: dict) -> dict:
        """What a height, hash or address names."""
        async with self.app[POOL].acquire() as conn:
            return await explorer.search(conn, payload["q"])

    @command(HALVING_SCHEMA, user=False)
    async def on_halving_schedule(self, ctx: Ctx, payload: dict) -> dict:
        """The reward schedule and the next halving."""
        async with self.app[POOL].acquire() as conn:
            return await explorer.halving_schedule(conn, payload.get("eras", explorer.DEFAULT_ERAS))

    @command(BURNS_SCHEMA, user=False)
    async def on_burns(self, ctx: Ctx, payload: dict) -> dict:
        """Burn totals and a page of burned blocks."""
        async with self.app[POOL].acquire() as conn:
            return await explorer.burns(conn, payload.get("before"), payload.get("limit", DEFAULT_PAGE))


# --- wallets and transactions -----------------------------------------------------------------

@routes.get("/api/v1/me/wallet")
@endpoint(auth="user")
async def handle_my_wallet(request: web.Request, identity: Identity) -> web.Response:
    """The caller's wallet address, null before one is registered (a new account's page asks on every load)."""
    async with request.app[POOL].acquire() as conn:
        return ok_response(await service.own_wallet_address(conn, identity.user_id))


@routes.put("/api/v1/me/wallet")
@endpoint(body=obj({"public_key": string(64, 64, pattern=wallets.PUBLIC_KEY_RE.pattern)},
                   required=("public_key",)), auth="user")
async def handle_register_wallet(request: web.Request, identity: Identity, body: dict) -> web.Response:
    """Register the caller's Ed25519 wallet key (once); returns the derived address."""
    async with request.app[POOL].acquire() as conn:
        return ok_response(await service.register_wallet(conn, identity.user_id, body["public_key"]))


@routes.get("/api/v1/users/{user_id}/wallet")
@endpoint(auth="user", path={"user_id": UUID})
async def handle_user_wallet(request: web.Request, identity: Identity) -> web.Response:
    """A user's wallet address (e.g. a DataPod seller's, to pay them); not_found without one."""
    user_id = path_uuid(request, "user_id", "no such user")
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
@endpoint(path={"address": KVP_ADDRESS})
async def handle_wallet(request: web.Request) -> web.Response:
    """A wallet's balance, reserved (pending) amount and next free nonce."""
    async with request.app[POOL].acquire() as conn:
        return ok_response(await service.wallet_summary(conn, request.match_info["address"]))


@routes.post("/api/v1/transactions")
@endpoint(body=TRANSFER_SCHEMA, auth="user")
async def handle_submit_transaction(request: web.Request, identity: Identity, body: dict) -> web.Response:
    """Submit a signed transfer (the REST twin of `submit_transaction`)."""
    tx = await service.submit_transaction(request.app, identity.user_id, body)
    return ok_response(tx.to_public(), status=201)


@routes.get("/api/v1/transactions/{hash}")
@endpoint(path={"hash": TX_HASH})
async def handle_get_transaction(request: web.Request) -> web.Response:
    """A transaction by hash, with its status and block height once sealed."""
    async with request.app[POOL].acquire() as conn:
        tx = await service.get_transaction(conn, request.match_info["hash"])
    return ok_response(tx.to_public())


# --- blocks -----------------------------------------------------------------------------------

@routes.get("/api/v1/blocks")
@endpoint(query=BLOCKS_QUERY)
async def handle_blocks(request: web.Request) -> web.Response:
    """Newest blocks first, below `before_height` when given (`limit` up to 500, default 20)."""
    before = int_query(request, "before_height", minimum=1)
    limit = int_query(request, "limit", minimum=1, maximum=MAX_BLOCKS_PAGE) or 20
    async with request.app[POOL].acquire() as conn:
        return ok_response(await service.blocks_before(conn, before, limit))


@routes.get("/api/v1/blocks/{height:[0-9]+}")
@endpoint(path={"height": HEIGHT})
async def handle_block(request: web.Request) -> web.Response:
    """One block by height, with its transactions."""
    height = path_int(request, "height", "no block at that height", minimum=0)
    async with request.app[POOL].acquire() as conn:
        return ok_response(await service.block_with_transactions(conn, height))


# --- reward pools -----------------------------------------------------------------------------

@routes.get("/api/v1/reward-pools")
@endpoint()
async def handle_pools(request: web.Request) -> web.Response:
    """Every reward pool with its total, allocated and remaining tokens."""
    async with request.app[POOL].acquire() as conn:
        return ok_response({"pools": [pool.to_public() for pool in await service.list_pools(conn)]})


@routes.post("/api/v1/admin/reward-pools")
@endpoint(body=obj({"name": string(1, 50), "total_tokens": KVP_AMOUNT}, required=("name", "total_tokens")),
          auth="admin")
async def handle_create_pool(request: web.Request, identity: Identity, body: dict) -> web.Response:
    """Create a reward pool (names are unique)."""
    async with request.app[POOL].acquire() as conn:
        pool = await service.create_pool(conn, body["name"], Decimal(body["total_tokens"]))
    return ok_response(pool.to_public(), status=201)


def _pool_id(request: web.Request) -> int:
    return path_int(request, "pool_id", "no such reward pool", minimum=0)


@routes.patch("/api/v1/admin/reward-pools/{pool_id}")
@endpoint(body=obj({"delta": SIGNED_DELTA}, required=("delta",)), auth="admin", path={"pool_id": HEIGHT})
async def handle_adjust_pool(request: web.Request, identity: Identity, body: dict) -> web.Response:
    """Add tokens to a pool, or remove unallocated ones with a negative delta."""
    async with request.app[POOL].acquire() as conn:
        pool = await service.adjust_pool(conn, _pool_id(request), Decimal(body["delta"]))
    return ok_response(pool.to_public())


@routes.post("/api/v1/admin/reward-pools/{pool_id}/allocations")
@endpoint(body=obj({"user_id": UUID, "amount": KVP_AMOUNT}, required=("user_id", "amount")), auth="admin",
          path={"pool_id": HEIGHT})
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


# --- explorer ---------------------------------------------------------------------------------

def _limit(request: web.Request) -> int:
    return int_query(request, "limit", minimum=1, maximum=MAX_PAGE) or DEFAULT_PAGE


def _block_ref(request: web.Request) -> str:
    # The route pattern admits only digits or 64 hex characters; resolve_block answers not_found.
    return request.match_info["block"]


@routes.get("/api/v1/chain/blocks/{block}")
@endpoint(path={"block": BLOCK_REF_PATH})
async def handle_explorer_block(request: web.Request) -> web.Response:
    """A block by height or hash."""
    async with request.app[POOL].acquire() as conn:
        return ok_response(await explorer.get_block(conn, _block_ref(request)))


@routes.get("/api/v1/chain/blocks/{block}/transactions")
@endpoint(path={"block": BLOCK_REF_PATH}, query=BLOCK_PAGE_QUERY)
async def handle_explorer_block_transactions(request: web.Request) -> web.Response:
    """A page of a block's transactions in block order (?after, ?limit)."""
    after = int_query(request, "after", minimum=0)
    async with request.app[POOL].acquire() as conn:
        return ok_response(await explorer.block_transactions(conn, _block_ref(request), after, _limit(request)))


@routes.get("/api/v1/chain/blocks/{block}/mining-rewards")
@endpoint(path={"block": BLOCK_REF_PATH}, query=BLOCK_PAGE_QUERY)
async def handle_explorer_block_rewards(request: web.Request) -> web.Response:
    """A page of the rewards paid for a block (?after, ?limit)."""
    after = int_query(request, "after", minimum=0)
    async with request.app[POOL].acquire() as conn:
        return ok_response(await explorer.block_mining_rewards(conn, _block_ref(request), after, _limit(request)))


@routes.get("/api/v1/chain/transactions")
@endpoint(query=NEWEST_PAGE_QUERY)
async def handle_explorer_latest_transactions(request: web.Request) -> web.Response:
    """A page of the chain's transfers, every status, newest first (?before, ?limit)."""
    before = int_query(request, "before", minimum=1)
    async with request.app[POOL].acquire() as conn:
        return ok_response(await explorer.latest_transactions(conn, before, _limit(request)))


@routes.get("/api/v1/chain/mining-rewards")
@endpoint(query=NEWEST_PAGE_QUERY)
async def handle_explorer_latest_rewards(request: web.Request) -> web.Response:
    """A page of every miner's rewards, newest first (?before, ?limit)."""
    before = int_query(request, "before", minimum=1)
    async with request.app[POOL].acquire() as conn:
        return ok_response(await explorer.latest_mining_rewards(conn, before, _limit(request)))


@routes.get("/api/v1/chain/addresses/{address}")
@endpoint(path={"address": KVP_ADDRESS})
async def handle_explorer_address(request: web.Request) -> web.Response:
    """An address's owner, balance, pending amount and next nonce."""
    async with request.app[POOL].acquire() as conn:
        return ok_response(await explorer.get_address(conn, request.match_info["address"]))


@routes.get("/api/v1/chain/addresses/{address}/transactions")
@endpoint(path={"address": KVP_ADDRESS}, query=NEWEST_PAGE_QUERY)
async def handle_explorer_address_transactions(request: web.Request) -> web.Response:
    """A page of an address's transfers, sent and received, newest first (?before, ?limit)."""
    before = int_query(request, "before", minimum=1)
    async with request.app[POOL].acquire() as conn:
        return ok_response(await explorer.address_transactions(conn, request.match_info["address"], before,
                                                               _limit(request)))


@routes.get("/api/v1/chain/addresses/{address}/ledger")
@endpoint(path={"address": KVP_ADDRESS}, query=LEDGER_PAGE_QUERY)
async def handle_explorer_address_ledger(request: web.Request) -> web.Response:
    """A page of the address owner's balance ledger, newest first (?before, ?limit)."""
    before = int_query(request, "before", minimum=1, maximum=LEDGER_BEFORE["maximum"])
    async with request.app[POOL].acquire() as conn:
        return ok_response(await explorer.address_ledger(conn, request.match_info["address"], before,
                                                         _limit(request)))


@routes.get("/api/v1/chain/addresses/{address}/mining-rewards")
@endpoint(path={"address": KVP_ADDRESS}, query=NEWEST_PAGE_QUERY)
async def handle_explorer_address_rewards(request: web.Request) -> web.Response:
    """A page of the mining rewards of the address's owner, newest first, with totals (?before, ?limit)."""
    before = int_query(request, "before", minimum=1)
    async with request.app[POOL].acquire() as conn:
        return ok_response(await explorer.user_mining_rewards(conn, address=request.match_info["address"],
                                                              before=before, limit=_limit(request)))


@routes.get("/api/v1/chain/users/{user_id}/mining-rewards")
@endpoint(path={"user_id": UUID}, query=NEWEST_PAGE_QUERY)
async def handle_explorer_user_rewards(request: web.Request) -> web.Response:
    """A page of a user's mining rewards, newest first, with totals (?before, ?limit)."""
    user_id = path_uuid(request, "user_id", "no such user")
    before = int_query(request, "before", minimum=1)
    async with request.app[POOL].acquire() as conn:
        return ok_response(await explorer.user_mining_rewards(conn, user_id=user_id, before=before,
                                                              limit=_limit(request)))


@routes.get("/api/v1/chain/search")
@endpoint(query=SEARCH_SCHEMA)
async def handle_explorer_search(request: web.Request) -> web.Response:
    """What a height, block or transaction hash, or address names (?q)."""
    payload = validate(SEARCH_VALIDATOR, dict(request.query))
    async with request.app[POOL].acquire() as conn:
        return ok_response(await explorer.search(conn, payload["q"]))


@routes.get("/api/v1/chain/halving")
@endpoint(query=HALVING_SCHEMA)
async def handle_explorer_halving(request: web.Request) -> web.Response:
    """The reward schedule: current era and reward, next halving, the first ?eras eras (default 10)."""
    eras = int_query(request, "eras", minimum=1, maximum=explorer.MAX_ERAS) or explorer.DEFAULT_ERAS
    async with request.app[POOL].acquire() as conn:
        return ok_response(await explorer.halving_schedule(conn, eras))


@routes.get("/api/v1/chain/burns")
@endpoint(query=BURNS_SCHEMA)
async def handle_explorer_burns(request: web.Request) -> web.Response:
    """Burn totals and a page of burned blocks, newest first (?before, ?limit)."""
    before = int_query(request, "before", minimum=1)
    async with request.app[POOL].acquire() as conn:
        return ok_response(await explorer.burns(conn, before, _limit(request)))
