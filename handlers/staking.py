"""Staking REST routes (server/services/staking.py): open a stake, claim its rewards, unstake, list."""

from __future__ import annotations

import uuid
from decimal import Decimal

from aiohttp import web

from db.pool import POOL
from server.core.errors import InvalidPayload
from server.core.identity import Identity
from server.core.settings import SETTINGS
from server.edge.rest import endpoint, int_query, ok_response, path_int
from server.edge.schemas import DEFAULT_PAGE, INTEGER_ID, KVP_AMOUNT, MAX_PAGE, PAGE_LIMIT, UUID, obj
from server.services import staking as service

routes = web.RouteTableDef()

STATUS = {"type": "string", "enum": ["active", "closed"]}
OPEN_SCHEMA = obj({"amount": KVP_AMOUNT, "request_id": UUID}, required=("amount",))
LIST_QUERY = obj({"before": INTEGER_ID, "limit": PAGE_LIMIT, "status": STATUS})


def _config(request: web.Request) -> service.StakingConfig:
    return service.StakingConfig.from_settings(request.app[SETTINGS])


def _stake_id(request: web.Request) -> int:
    return path_int(request, "stake_id", "you have no stake with that id")


@routes.post("/api/v1/me/stakes")
@endpoint(body=OPEN_SCHEMA, auth="user")
async def handle_open_stake(request: web.Request, identity: Identity, body: dict) -> web.Response:
    """Stake KVP from the caller's available balance (a repeated `request_id` returns the same stake)."""
    request_id = uuid.UUID(body["request_id"]) if body.get("request_id") else None
    async with request.app[POOL].acquire() as conn:
        stake, created = await service.open_stake(conn, identity.user_id, Decimal(body["amount"]), _config(request),
                                                  request_id)
    return ok_response(stake, status=201 if created else 200)


@routes.post("/api/v1/me/stakes/{stake_id}/claim")
@endpoint(auth="user", path={"stake_id": INTEGER_ID})
async def handle_claim(request: web.Request, identity: Identity) -> web.Response:
    """Pay a stake's rewards accrued up to the chain's tip, drawn from the staking pool."""
    async with request.app[POOL].acquire() as conn:
        return ok_response(await service.claim(conn, identity.user_id, _stake_id(request), _config(request)))


@routes.post("/api/v1/me/stakes/{stake_id}/unstake")
@endpoint(auth="user", path={"stake_id": INTEGER_ID})
async def handle_unstake(request: web.Request, identity: Identity) -> web.Response:
    """Close an unlocked stake: principal and last rewards back to the balance."""
    async with request.app[POOL].acquire() as conn:
        return ok_response(await service.unstake(conn, identity.user_id, _stake_id(request), _config(request)))


@routes.get("/api/v1/me/stakes")
@endpoint(auth="user", query=LIST_QUERY)
async def handle_list_stakes(request: web.Request, identity: Identity) -> web.Response:
    """The caller's stakes newest first with accrued-but-unpaid rewards (cursor: `before`, a stake id)."""
    before = int_query(request, "before", minimum=1)
    limit = int_query(request, "limit", minimum=1, maximum=MAX_PAGE) or DEFAULT_PAGE
    status = request.query.get("status") or None
    if status is not None and status not in STATUS["enum"]:
        raise InvalidPayload("'status' must be active or closed", field="status")
    async with request.app[POOL].acquire() as conn:
        return ok_response(await service.list_stakes(conn, identity.user_id, before, limit, status))
